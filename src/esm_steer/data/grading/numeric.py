"""Number parsing and LaTeX cleaning: ``1,000`` = 1000, ``$5`` = 5, ``\\frac12`` = 0.5, percents,
trailing units; and the canonical string of a LaTeX answer (:func:`strip_math`)."""

from __future__ import annotations

import re
from fractions import Fraction

_UNIT_WORDS = r"[A-Za-z][A-Za-z'\s.\-/²³]*"


def _unwrap_text(s: str) -> str:
    prev = None
    while prev != s:
        prev = s
        s = re.sub(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}", r" \1 ", s)
    return s


def _clean(s: str) -> str:
    s = s.replace("−", "-").replace("\u2009", " ")
    s = _unwrap_text(s)
    for tok in ("\\$", "$", "\\(", "\\)", "\\[", "\\]", "\\!", "\\,", "\\;", "\\:", "~", "\\left", "\\right"):
        s = s.replace(tok, " " if tok in ("\\,", "\\;", "\\:", "~") else "")
    s = s.replace("{,}", ",")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    return s.strip()


def parse_number(s: str | None) -> tuple[Fraction, bool] | None:
    """``(value, was_percent)`` for a plain number answer, else None.

    Accepts signs, thousands commas, decimals, ``a/b``, ``\\frac{a}{b}``, ``\\frac12``, mixed
    ``2\\frac{1}{2}``, a leading ``$`` and trailing unit words / periods, ``x = 5``.
    """
    if s is None:
        return None
    s = _clean(str(s))
    if "=" in s:
        s = s.split("=")[-1]
    s = s.strip().rstrip(".").strip()
    percent = False
    if s.endswith("\\%") or s.endswith("%"):
        percent, s = True, s[:-2] if s.endswith("\\%") else s[:-1]
    s = s.strip()
    m = re.fullmatch(
        r"([-+]?)\s*(\d+)?\s*\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:" + _UNIT_WORDS + r")?",
        s,
    )
    if m:
        sign, whole, n1, n2, d1, d2 = m.groups()
        num, den = int(n1 or n2), int(d1 or d2)
        if den == 0:
            return None
        val = Fraction(num, den) + int(whole or 0)
        return (-val if sign == "-" else val), percent
    m = re.fullmatch(
        r"([-+]?)\s*((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:\s*/\s*(\d+(?:\.\d+)?))?\s*(%|\\%)?\s*(?:"
        + _UNIT_WORDS
        + r")?",
        s,
    )
    if not m:
        return None
    sign, num, den, pct = m.groups()
    val = Fraction(num.replace(",", ""))
    if den is not None:
        if Fraction(den) == 0:
            return None
        val /= Fraction(den)
    return (-val if sign == "-" else val), percent or bool(pct)


def _close(a: Fraction, b: Fraction) -> bool:
    # exact for integers and fractions; 1e-6 relative for rounded decimals (0.333333 = 1/3)
    return a == b or abs(a - b) <= Fraction(1, 10**6) * max(1, abs(b))


def numbers_equal(pred: str | None, gold: str | None) -> bool | None:
    """True/False when both sides are plain numbers, None when either is not."""
    p, g = parse_number(pred), parse_number(gold)
    if p is None or g is None:
        return None
    (pv, pp), (gv, gp) = p, g
    options = {(pv, gv)}
    if pp:
        options.add((pv / 100, gv))
    if gp:
        options.add((pv, gv / 100))
    return any(_close(a, b) for a, b in options)


def strip_math(s: str) -> str:
    """A canonical string for LaTeX answers: no spaces, no ``\\left``/``\\right``, ``dfrac`` ->
    ``frac``, ``\\text{}`` unwrapped, no dollars, degrees or trailing period, ``x = ``
    dropped from ``x = 5``."""
    s = _clean(s)
    s = re.sub(r"^\s*[A-Za-z]\s*=\s*", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s
