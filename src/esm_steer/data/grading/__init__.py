"""Answer extraction and equivalence: is a model response's final answer the gold one?

Kinds (a task's ``grader`` in its ``conf/task/<name>.yaml``):

- ``numeric``   GSM8K-style numbers: ``1,000`` = 1000, ``$5`` = 5, ``3.0`` = 3, ``1/2`` = 0.5,
                trailing units and periods dropped. Percent: ``50%`` equals both 50 and 0.5
                (the two readings of a percent; the other side decides).
- ``math``      LaTeX answers: the numeric rules, then a normalised string match, then
                math-verify (``parse``/``verify``), then sympy ``simplify(a - b) == 0``.
- ``choice``    a letter A-E.
- ``yesno``     yes / no (true / false accepted as synonyms).
- ``math_dapo`` verl's DAPO reward (:func:`compute_score_dapo`): "Answer:" line of the last
                300 characters, verl's normalisation, exact string match, score +1 / -1.

Modules: :mod:`.extract` (the final answer of a response), :mod:`.numeric` (numbers and LaTeX
cleaning), :mod:`.symbolic` (math-verify / sympy behind a deadline), :mod:`.dapo` (verl's DAPO
port). This module dispatches on the kind; a task name is mapped to its kind by
:func:`esm_steer.data.tasks.kind_for_task` (grading knows no tasks).
"""

from __future__ import annotations

from esm_steer.data.grading.dapo import (
    DAPO_ANSWER_PATTERN,
    DAPO_INVALID,
    DAPO_TAIL_CHARS,
    compute_score_dapo,
    dapo_normalize,
)
from esm_steer.data.grading.extract import (
    _NUMBER_RE,
    KINDS,
    _letter,
    _yes_no_word,
    extract_answer,
    last_boxed,
    last_number,
)
from esm_steer.data.grading.numeric import _clean, numbers_equal, parse_number, strip_math
from esm_steer.data.grading.symbolic import SYMBOLIC_TIMEOUT_S, math_equal, run_bounded


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


def grade(response: str, gold: str, kind: str) -> bool:
    """True when the response's final answer matches gold under the grader ``kind`` (one of
    :data:`KINDS`; a task's kind: :func:`esm_steer.data.tasks.kind_for_task`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; known: {', '.join(KINDS)}")
    if not response or not str(response).strip():
        return False
    if kind == "math_dapo":
        return compute_score_dapo(response, gold)["acc"]
    return is_equiv(extract_answer(response, kind), gold, kind)


__all__ = [
    "DAPO_ANSWER_PATTERN",
    "DAPO_INVALID",
    "DAPO_TAIL_CHARS",
    "KINDS",
    "SYMBOLIC_TIMEOUT_S",
    "compute_score_dapo",
    "dapo_normalize",
    "extract_answer",
    "grade",
    "is_equiv",
    "last_boxed",
    "last_number",
    "math_equal",
    "numbers_equal",
    "parse_number",
    "run_bounded",
    "strip_math",
]
