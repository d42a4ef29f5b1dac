"""Row parsers: one function per file format, a raw row (dict) -> :class:`Example`.

Each follows its dataset's real file format (hub and local copies alike); a row that cannot
become an Example raises :class:`SkipRow`, whose message is the reason counted by the loader.
Which task uses which parser: :data:`ROW_PARSERS` (the task's hub ids, splits, grader and
prompt live in its ``conf/task/<name>.yaml``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from esm_steer.data.example import Example
from esm_steer.data.grading import last_boxed

RowParser = Callable[[dict, str], Example]  # (row, default id) -> Example


class SkipRow(Exception):
    """A row that cannot become an Example; the message is the reason counted."""


def _text(row: dict, *keys: str) -> str:
    """The first non-empty string field among keys; SkipRow names the first key otherwise."""
    for k in keys:
        v = row.get(k)
        if v is not None and not isinstance(v, (dict, list)) and str(v).strip():
            return str(v).strip()
    raise SkipRow(f"missing {keys[0]}")


def _number_text(v: Any) -> str:
    """51.0 -> "51", "023" -> "23", 2.5 -> "2.5"; other strings stripped."""
    if isinstance(v, bool):
        raise SkipRow("bad answer")
    if isinstance(v, (int, float)):
        return str(int(v)) if float(v).is_integer() else repr(float(v))
    s = str(v).strip()
    if re.fullmatch(r"-?\d+", s):
        return str(int(s))
    if re.fullmatch(r"-?\d+\.0+", s):
        return str(int(float(s)))
    return s


def _id(row: dict, key: str, default: str) -> str:
    v = row.get(key)
    return str(v) if v is not None and str(v).strip() else default


# ---------------------------------------------------------------- row -> Example, per format


def gsm8k_row(row: dict, default_id: str) -> Example:
    question = _text(row, "question")
    answer = _text(row, "answer")
    if "####" not in answer:
        raise SkipRow("no #### in answer")
    reasoning, final = answer.rsplit("####", 1)
    gold = final.strip().replace(",", "")
    if not gold:
        raise SkipRow("empty gold")
    solution = re.sub(r"<<[^<>]*>>", "", reasoning).strip()  # calculator annotations
    return Example(default_id, question, gold, solution or None)


def svamp_row(row: dict, default_id: str) -> Example:
    body, q = _text(row, "Body", "body"), _text(row, "Question", "question")
    if row.get("Answer") is None and row.get("answer") is None:
        raise SkipRow("missing Answer")
    gold = _number_text(row["Answer"] if row.get("Answer") is not None else row["answer"])
    meta = {k: row[k] for k in ("Equation", "Type") if row.get(k) is not None}
    return Example(_id(row, "ID", default_id), f"{body} {q}", gold, None, meta=meta)


def arc_row(row: dict, default_id: str) -> Example:
    # `answer` / `response` of the local copy are a host repo's additions: never read them
    question = _text(row, "question")
    ch = row.get("choices")
    if not isinstance(ch, dict) or not ch.get("text") or not ch.get("label"):
        raise SkipRow("missing choices")
    labels, texts = [str(x).strip() for x in ch["label"]], [str(x).strip() for x in ch["text"]]
    if len(labels) != len(texts):
        raise SkipRow("choices label/text mismatch")
    key = _text(row, "answerKey")
    numeric = all(lab.isdigit() for lab in labels)
    if numeric:  # some NYSEDREGENTS items use 1-4: map to letters so grading sees A-E
        to_letter = {lab: "ABCDE"[int(lab) - 1] for lab in labels if 1 <= int(lab) <= 5}
        labels, key = [to_letter.get(lab, lab) for lab in labels], to_letter.get(key, key)
    if key not in labels:
        raise SkipRow("answerKey not among labels")
    choices = [f"{lab}. {txt}" for lab, txt in zip(labels, texts)]
    return Example(_id(row, "id", default_id), question, key, None, choices, {"labels": labels})


_MATH_SUFFIX = re.compile(r"\s*Let's think step by step and output the final answer within \\boxed\{\}\.?\s*$")


def math_row(row: dict, default_id: str) -> Example:
    """MATH / MATH-500 in all their shapes: problem + answer (MATH-500), problem + full solution
    (answer = its last boxed), verl (problem with an instruction suffix, solution =
    reward_model.ground_truth = the bare answer)."""
    problem = _MATH_SUFFIX.sub("", _text(row, "problem", "question"))
    if not problem:
        raise SkipRow("missing problem")
    solution = row.get("solution")
    solution = str(solution).strip() if solution is not None and str(solution).strip() else None
    rm = row.get("reward_model")
    gold = None
    if row.get("answer") is not None and str(row["answer"]).strip():
        gold = str(row["answer"]).strip()
    elif isinstance(rm, dict) and rm.get("ground_truth") is not None and str(rm["ground_truth"]).strip():
        gold = str(rm["ground_truth"]).strip()
    elif solution:
        gold = last_boxed(solution)
    if not gold:
        raise SkipRow("no answer")
    if solution is not None and (solution == gold or isinstance(rm, dict) and "\\boxed" not in solution):
        solution = None  # verl format: the "solution" is only the answer
    meta = {k: row[k] for k in ("level", "type", "subject") if row.get(k) is not None}
    return Example(_id(row, "unique_id", default_id), problem, gold, solution, meta=meta)


def aime_row(row: dict, default_id: str) -> Example:
    problem = _text(row, "problem", "question")
    if row.get("answer") is None or not str(row["answer"]).strip():
        raise SkipRow("missing answer")
    sol = row.get("solution")
    sol = str(sol).strip() if sol is not None and str(sol).strip() else None
    meta = {k: row[k] for k in ("url", "year") if row.get(k) is not None}
    return Example(_id(row, "id", default_id), problem, _number_text(row["answer"]), sol, meta=meta)


def strategyqa_row(row: dict, default_id: str) -> Example:
    question = _text(row, "question")
    ans = row.get("answer")
    if isinstance(ans, str):
        ans = {"true": True, "yes": True, "false": False, "no": False}.get(ans.strip().lower())
    if not isinstance(ans, bool):
        raise SkipRow("missing answer")
    facts = row.get("facts")
    if isinstance(facts, (list, tuple)):
        facts = " ".join(str(f).strip() for f in facts if str(f).strip())
    facts = str(facts).strip() if facts else ""
    gold = "yes" if ans else "no"
    solution = f"{facts} So the answer is {gold}." if facts else None
    meta = {k: row[k] for k in ("term", "description", "decomposition") if row.get(k) is not None}
    return Example(_id(row, "qid", default_id), question, gold, solution, meta=meta)


DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def dapo_problem(content: str) -> str:
    """The bare problem inside a verl DAPO user message (prefix / suffix instruction removed)."""
    s = content.strip()
    if s.startswith(DAPO_PREFIX.strip()[:60]):
        s = s[len(DAPO_PREFIX) :] if s.startswith(DAPO_PREFIX) else s.split("\n\n", 1)[-1]
    if s.endswith(DAPO_SUFFIX.strip()):
        s = s[: -len(DAPO_SUFFIX.strip())]
    return s.strip()


def dapo_row(row: dict, default_id: str) -> Example:
    prompt = row.get("prompt")
    if isinstance(prompt, (list, tuple)):  # verl: [{"role": "user", "content": ...}]
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role", "user") == "user"]
        prompt = users[-1] if users else None
    problem = dapo_problem(str(prompt)) if prompt else None
    if not problem:
        problem = _text(row, "problem", "question")
    rm = row.get("reward_model")
    gold = rm.get("ground_truth") if isinstance(rm, dict) else None
    if gold is None or not str(gold).strip():
        gold = row.get("answer") if row.get("answer") is not None else row.get("solution")
    if gold is None or not str(gold).strip():
        raise SkipRow("missing ground_truth")
    extra = row.get("extra_info")
    default_id = str(extra["index"]) if isinstance(extra, dict) and extra.get("index") is not None else default_id
    meta = {k: row[k] for k in ("data_source",) if row.get(k) is not None}
    return Example(_id(row, "id", default_id), problem, str(gold).strip(), None, meta=meta)


ROW_PARSERS: dict[str, RowParser] = {
    "gsm8k": gsm8k_row,
    "svamp": svamp_row,
    "arc-c": arc_row,
    "math500": math_row,
    "math": math_row,
    "aime_2024": aime_row,
    "strategyqa": strategyqa_row,
    "dapo_math": dapo_row,
}


def parse_rows(rows: Iterable, parse: RowParser, id_prefix: str, dedupe: bool = False) -> tuple[list[Example], Counter]:
    """The usable examples of ``rows`` (default ids ``<id_prefix>-<i>``) and the skip reasons
    counted; ``dedupe`` drops a question seen before (DAPO-Math-17k repeats each problem)."""
    examples, skipped, seen = [], Counter(), set()
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise SkipRow("not an object")
            ex = parse(row, f"{id_prefix}-{i}")
            if not ex.question or not ex.gold:
                raise SkipRow("empty question or gold")
        except SkipRow as s:
            skipped[str(s)] += 1
            continue
        if dedupe:
            if ex.question in seen:
                skipped["duplicate question"] += 1
                continue
            seen.add(ex.question)
        examples.append(ex)
    return examples, skipped
