"""Answer extraction and equivalence: is a model response's final answer the gold one?

Kinds (a task's :attr:`TaskSpec.grader`):

- ``numeric``   GSM8K-style numbers: ``1,000`` = 1000, ``$5`` = 5, ``3.0`` = 3, ``1/2`` = 0.5,
                trailing units and periods dropped. Percent: ``50%`` equals both 50 and 0.5
                (the two readings of a percent; the other side decides).
- ``math``      LaTeX answers: the numeric rules, then a normalised string match, then
                math-verify (``parse``/``verify``), then sympy ``simplify(a - b) == 0``.
- ``choice``    a letter A-E.
- ``yesno``     yes / no (true / false accepted as synonyms).
- ``math_dapo`` verl's DAPO reward (:func:`compute_score_dapo`): "Answer:" line of the last
                300 characters, verl's normalisation, exact string match, score +1 / -1.

All symbolic work (math-verify, sympy) runs in a daemon worker thread with a deadline
(:data:`SYMBOLIC_TIMEOUT_S`), so grading never hangs and works off the main thread, where
signal-based timeouts (math-verify's own) are unavailable. Inputs that could make a single
C-level big-integer operation run for minutes (which holds the GIL, so no thread deadline
could interrupt it) are refused before they reach sympy.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from fractions import Fraction

log = logging.getLogger(__name__)

KINDS = ("numeric", "math", "choice", "yesno", "math_dapo")
SYMBOLIC_TIMEOUT_S = 5.0  # per math-verify / sympy call (imports excluded)
_MAX_ABANDONED = 2  # stuck worker threads tolerated before symbolic checks are switched off
_abandoned: list[threading.Thread] = []
_warned_off = False

# ---------------------------------------------------------------- extraction helpers


def last_boxed(text: str) -> str | None:
    """Content of the last non-empty ``\\boxed{...}`` / ``\\fbox{...}`` (brace-matched), or of a
    bare ``\\boxed 5``; None when there is none."""
    best: tuple[int, str] | None = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            content = text[m.end() : i - 1].strip()
            if content and (best is None or m.start() >= best[0]):
                best = (m.start(), content)
    for m in re.finditer(r"\\boxed[ \t]+([^\s$]+)", text):
        if best is None or m.start() > best[0]:
            best = (m.start(), m.group(1))
    return best[1] if best else None


_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|(?<![\w.])-?\.\d+")


def last_number(text: str) -> str | None:
    found = _NUMBER_RE.findall(text.replace("−", "-"))
    return found[-1].strip() if found else None


def _cut_sentence(s: str) -> str:
    """The first sentence of an answer phrase: stop at a line end or at a period that ends a
    sentence (not a decimal point); drop a trailing period."""
    s = s.strip().split("\n")[0]
    s = re.split(r"\.(?:\s|$)", s, maxsplit=1)[0]
    return s.strip().rstrip(".").strip()


def _answer_line(text: str) -> str | None:
    found = re.findall(r"(?i)answer\s*:\s*([^\n]+)", text)
    found = [f for f in found if f.strip()]
    if not found:
        return None
    cand = found[-1].strip()
    inner = _answer_is(cand)  # "Final Answer: The final answer is $5$. I hope ..."
    return inner if inner else cand.strip().rstrip(".").strip()


def _answer_is(text: str) -> str | None:
    found = re.findall(r"(?i)\banswer\s+is\s*:?\s*([^\n]+)", text)
    for cand in reversed(found):
        cut = _cut_sentence(cand)
        if cut:
            return cut
    return None


def _candidates(text: str) -> list[str]:
    """Answer phrases in priority order: boxed, "Answer:" line, "the answer is X"."""
    out = []
    for get in (last_boxed, _answer_line, _answer_is):
        c = get(text)
        if c:
            out.append(c)
    return out


_LETTER_IN_PHRASE = re.compile(r"(?<![A-Za-z])\(?([A-Ea-e])\)?(?![A-Za-z])")


def _choice_letter(text: str) -> str | None:
    for cand in _candidates(text):
        cand = re.sub(r"\\text\{([^{}]*)\}", r"\1", cand)
        cand = re.sub(r"(?i)^(?:option|choice)\s*", "", cand.strip())
        m = _LETTER_IN_PHRASE.search(cand)
        if m:
            return m.group(1).upper()
    found = re.findall(r"(?i)\b(?:option|choice)\s*\(?([A-E])\)?(?![A-Za-z])", text)
    if found:
        return found[-1].upper()
    found = re.findall(r"\(([A-E])\)", text)
    if found:
        return found[-1]
    # a standalone capital letter, but not the article "A word"
    found = [
        m.group(1)
        for m in re.finditer(r"(?<![\w'])([A-E])(?![\w'])", text)
        if not (m.group(1) == "A" and re.match(r" [a-z]", text[m.end() :]))
    ]
    return found[-1] if found else None


_YESNO = {"yes": "yes", "no": "no", "true": "yes", "false": "no"}
_YESNO_RE = re.compile(r"(?i)\b(yes|no|true|false)\b")


def _yes_no(text: str) -> str | None:
    for cand in _candidates(text):
        m = _YESNO_RE.search(cand)
        if m:
            return _YESNO[m.group(1).lower()]
    found = _YESNO_RE.findall(text)
    return _YESNO[found[-1].lower()] if found else None


def extract_answer(response: str, kind: str = "math") -> str | None:
    """The final answer in a response, or None.

    Order: last ``\\boxed{}`` (or ``\\fbox{}``), last "Answer:" line, last "the answer is X",
    last number. ``choice`` returns a letter A-E, ``yesno`` "yes"/"no", ``math_dapo`` the raw
    "Answer:" match in the last 300 characters (as verl does).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; known: {', '.join(KINDS)}")
    if not response or not response.strip():
        return None
    if kind == "math_dapo":
        found = re.findall(DAPO_ANSWER_PATTERN, response[-DAPO_TAIL_CHARS:])
        return found[-1] if found else None
    if kind == "choice":
        return _choice_letter(response)
    if kind == "yesno":
        return _yes_no(response)
    cands = _candidates(response)
    if cands:
        return cands[0]
    return last_number(response)


# ---------------------------------------------------------------- numeric normalisation

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


# ---------------------------------------------------------------- math (LaTeX) equivalence


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


def _too_heavy(s: str) -> bool:
    """Inputs that could stall sympy inside one C call (huge integer powers, factorials)."""
    if len(s) > 300:
        return True
    if re.search(r"(?:\^|\*\*)\s*(?:\{[^{}]*|\(?[\w.]+\)?\s*)(?:\^|\*\*)", s):  # towers a^{b^c}, a^b^c
        return True
    if re.search(r"(\^|\*\*)\s*\{?\s*\(?\s*\d{4,}", s):  # exponent >= 1000
        return True
    return bool(re.search(r"\d{5,}\s*!|\\prod|\\sum|\\int", s))  # huge factorials, unbounded series


def run_bounded(fn: Callable, *args, timeout: float | None = None):
    """``fn(*args)`` in a daemon thread; its result, or None on timeout or error.

    A thread that misses its deadline is abandoned (Python cannot kill it); once
    ``_MAX_ABANDONED`` are still alive, symbolic checks are skipped instead of piling up.
    """
    global _warned_off
    timeout = SYMBOLIC_TIMEOUT_S if timeout is None else timeout
    _abandoned[:] = [t for t in _abandoned if t.is_alive()]
    if len(_abandoned) >= _MAX_ABANDONED:
        if not _warned_off:
            log.warning("%d symbolic grading threads are stuck; skipping symbolic checks", len(_abandoned))
            _warned_off = True
        return None
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except Exception as e:  # noqa: BLE001 - any parser failure means "not provably equal"
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="esm-grade-symbolic")
    t.start()
    t.join(timeout)
    if t.is_alive():
        _abandoned.append(t)
        log.warning("symbolic check %s timed out after %.1fs", getattr(fn, "__name__", fn), timeout)
        return None
    if "error" in box:
        log.debug("symbolic check failed: %s", box["error"])
    return box.get("value")


def _import_symbolic() -> None:
    for mod in ("sympy", "latex2sympy2_extended", "math_verify"):
        try:
            __import__(mod)
        except ImportError:
            pass


def _math_verify_equal(pred: str, gold: str) -> bool | None:
    try:
        import math_verify.grader
        import math_verify.parser
        from math_verify import parse, verify
    except ImportError:
        return None
    # its "timeout disabled" warning does not apply: run_bounded is the timeout
    math_verify.grader.TIMEOUT_WARNING_SHOWN = math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    # timeouts off: they use SIGALRM (main thread only); run_bounded bounds this call
    g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not g or not p:
        return None
    return bool(verify(g, p, timeout_seconds=None))


def _sympy_equal(pred: str, gold: str) -> bool | None:
    import sympy

    try:
        from latex2sympy2_extended import latex2sympy
    except ImportError:
        from sympy.parsing.latex import parse_latex as latex2sympy
    a, b = latex2sympy(pred), latex2sympy(gold)
    if not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return None
    return sympy.simplify(a - b) == 0


def math_equal(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None or not str(pred).strip():
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    same = numbers_equal(pred, gold)
    if same is not None:
        return same  # both plain numbers: nothing symbolic left to check
    if strip_math(pred) == strip_math(gold):
        return True
    if _too_heavy(pred) or _too_heavy(gold):
        return False
    _import_symbolic()  # outside the deadline: the first import alone takes seconds
    if run_bounded(_math_verify_equal, pred, gold):
        return True
    return bool(run_bounded(_sympy_equal, strip_math(pred), strip_math(gold)))


# ---------------------------------------------------------------- verl DAPO reward
# Mirrors verl's verl/utils/reward_score/math_dapo.py `compute_score` (non-strict mode,
# itself adapted from lm-evaluation-harness' Minerva math): keep the last 300 characters,
# take the last "Answer:" match, normalise prediction and ground truth with the same
# substitution and removal lists, compare the strings exactly, reward +1 / -1.

DAPO_ANSWER_PATTERN = r"(?i)Answer\s*:\s*([^\n]+)"
DAPO_TAIL_CHARS = 300
DAPO_INVALID = "[INVALID]"

DAPO_SUBSTITUTIONS = [
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    (r"\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
]

DAPO_REMOVED_EXPRESSIONS = [
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    r"\mathrm{th}",
    r"^\circ",
    r"^{\circ}",
    r"\;",
    r",\!",
    "{,}",
    '"',
    "\\dots",
]


def dapo_normalize(answer: str) -> str:
    """verl's ``normalize_final_answer``: right of the last ``=``, the substitutions and
    removals above, ``$..$`` / ``\\text{}`` / ``\\textbf{}`` / ``\\overline{}`` / ``\\boxed{}``
    unwrapped, ``\\fracab`` -> ``\\frac{a}{b}``, ``\\sqrta`` -> ``\\sqrt{a}``, no dollars,
    commas dropped from plain integers."""
    s = answer.split("=")[-1]
    for old, new in DAPO_SUBSTITUTIONS:
        s = s.replace(old, new)
    for expr in DAPO_REMOVED_EXPRESSIONS:
        s = s.replace(expr, "")
    s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", s)
    for macro in ("text", "textbf", "overline"):
        s = re.sub(r"(\\" + macro + r"\{)(.*?)(\})", "\\2", s)
    s = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", s)
    s = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", s)
    s = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def compute_score_dapo(response: str, gold: str) -> dict:
    """verl DAPO reward: ``{"score": 1.0 | -1.0, "acc": bool, "pred": normalised answer}``."""
    tail = (response or "")[-DAPO_TAIL_CHARS:]
    found = re.findall(DAPO_ANSWER_PATTERN, tail)
    pred = dapo_normalize(found[-1] if found else DAPO_INVALID)
    acc = pred == dapo_normalize(str(gold))
    return {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}


# ---------------------------------------------------------------- public API


def _letter(s: str) -> str | None:
    m = re.fullmatch(r"\s*\(?\s*([A-Ea-e])\s*[).]?\s*", s)
    if m:
        return m.group(1).upper()
    return _choice_letter(s)


def _yes_no_word(s: str) -> str | None:
    m = _YESNO_RE.search(str(s))
    return _YESNO[m.group(1).lower()] if m else None


def is_equiv(pred: str | None, gold: str, kind: str = "math") -> bool:
    """Whether an extracted answer equals the gold one under the rules of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; known: {', '.join(KINDS)}")
    if pred is None or not str(pred).strip():
        return False
    pred, gold = str(pred), str(gold)
    if kind == "choice":
        return _letter(pred) is not None and _letter(pred) == _letter(gold)
    if kind == "yesno":
        return _yes_no_word(pred) is not None and _yes_no_word(pred) == _yes_no_word(gold)
    if kind == "math_dapo":
        return dapo_normalize(pred) == dapo_normalize(gold)
    if kind == "numeric":
        same = numbers_equal(pred, gold)
        if same is not None:
            return same
        if parse_number(gold) is not None:
            num = last_number(_clean(pred))  # "18 dollars and 0 cents" style phrases
            return num is not None and bool(numbers_equal(num, gold)) and _single_number(pred)
    return math_equal(pred, gold)


def _single_number(s: str) -> bool:
    return len(_NUMBER_RE.findall(_clean(s))) == 1


def kind_for_task(task: str) -> str:
    """The grader kind of a registered task; a kind name passes through; else "math"."""
    if task in KINDS:
        return task
    from esm_steer.data.tasks import TASKS

    spec = TASKS.get(task)
    return spec.grader if spec is not None else "math"


def grade(response: str, gold: str, task: str) -> bool:
    """True when the response's final answer matches gold under the task's grader."""
    kind = kind_for_task(task)
    if not response or not str(response).strip():
        return False
    if kind == "math_dapo":
        return compute_score_dapo(response, gold)["acc"]
    return is_equiv(extract_answer(response, kind), gold, kind)
