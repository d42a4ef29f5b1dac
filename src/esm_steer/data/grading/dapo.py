"""verl's DAPO reward, ported.

Mirrors verl's verl/utils/reward_score/math_dapo.py `compute_score` (non-strict mode,
itself adapted from lm-evaluation-harness' Minerva math): keep the last 300 characters,
take the last "Answer:" match, normalise prediction and ground truth with the same
substitution and removal lists, compare the strings exactly, reward +1 / -1.
"""

from __future__ import annotations

import re

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
