"""Answer extraction: the final answer of a response (boxed, "Answer:" line, "the answer is X",
last number), a choice letter or a yes/no word. See :mod:`esm_steer.data.grading` for the kinds."""

from __future__ import annotations

import re

from esm_steer.data.grading.dapo import DAPO_ANSWER_PATTERN, DAPO_TAIL_CHARS

KINDS = ("numeric", "math", "choice", "yesno", "math_dapo")


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


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def strip_thinking(response: str) -> str:
    """The response after its reasoning: the text after the last ``</think>``; an unclosed
    ``<think>`` (thinking cut off by the budget) keeps only what came before it. R1-style
    models write their scratch work there, and its numbers are not the final answer."""
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in response:
        return response.split(THINK_OPEN, 1)[0]
    return response


def extract_answer(response: str, kind: str = "math") -> str | None:
    """The final answer in a response, or None.

    Order: last ``\\boxed{}`` (or ``\\fbox{}``), last "Answer:" line, last "the answer is X",
    last number. ``choice`` returns a letter A-E, ``yesno`` "yes"/"no", ``math_dapo`` the raw
    "Answer:" match in the last 300 characters (as verl does). Except for ``math_dapo`` (verl
    reads the raw tail), ``<think>...</think>`` content is not searched (:func:`strip_thinking`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; known: {', '.join(KINDS)}")
    if not response or not response.strip():
        return None
    if kind == "math_dapo":
        found = re.findall(DAPO_ANSWER_PATTERN, response[-DAPO_TAIL_CHARS:])
        return found[-1] if found else None
    response = strip_thinking(response)
    if not response.strip():
        return None
    if kind == "choice":
        return _choice_letter(response)
    if kind == "yesno":
        return _yes_no(response)
    cands = _candidates(response)
    if cands:
        return cands[0]
    return last_number(response)


def _letter(s: str) -> str | None:
    m = re.fullmatch(r"\s*\(?\s*([A-Ea-e])\s*[).]?\s*", s)
    if m:
        return m.group(1).upper()
    return _choice_letter(s)


def _yes_no_word(s: str) -> str | None:
    m = _YESNO_RE.search(str(s))
    return _YESNO[m.group(1).lower()] if m else None
