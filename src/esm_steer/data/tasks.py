"""Tasks: a registry of datasets and one loader that turns their rows into :class:`Example`.

A task is data (lm-evaluation-harness style): hub id / config / split names, the grader
kind, the default prompt template and a row -> Example mapping that follows the real file
formats (see ``shared/data/README.md``). Loading order: a local
``<data_root>/<task>/<split>.jsonl|.parquet|.json`` (or ``<data_root>/<split>.*`` when
data_root is the task folder itself), else ``datasets.load_dataset(hub_id, config, split)``.
Rows missing a required field are skipped and counted, never fatal. A split named in
``carve`` is a seeded share of a source split (see :mod:`esm_steer.splits`).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esm_steer.data import grading
from esm_steer.data.arith import SPLIT_RULE, generate
from esm_steer.data.example import DataError, Example
from esm_steer.data.grading import last_boxed
from esm_steer.splits import carve_assign, carve_source, check_carve, question_hash

log = logging.getLogger(__name__)


class _Skip(Exception):
    """A row that cannot become an Example; the message is the reason counted."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hub_id: str | None
    hub_config: str | None
    grader: str  # numeric | math | choice | yesno | math_dapo
    prompt: str  # default template name in esm_steer.data.prompts.PROMPTS
    row_to_example: Callable[[dict, str], Example] | None  # (row, default id) -> Example
    hub_splits: dict = field(default_factory=dict)  # our split -> hub split (aime: test -> train)
    dedupe: bool = False  # drop repeated questions (DAPO-Math-17k repeats each problem)


# ---------------------------------------------------------------- row helpers


def _text(row: dict, *keys: str) -> str:
    """The first non-empty string field among keys; _Skip names the first key otherwise."""
    for k in keys:
        v = row.get(k)
        if v is not None and not isinstance(v, (dict, list)) and str(v).strip():
            return str(v).strip()
    raise _Skip(f"missing {keys[0]}")


def _number_text(v: Any) -> str:
    """51.0 -> "51", "023" -> "23", 2.5 -> "2.5"; other strings stripped."""
    if isinstance(v, bool):
        raise _Skip("bad answer")
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
        raise _Skip("no #### in answer")
    reasoning, final = answer.rsplit("####", 1)
    gold = final.strip().replace(",", "")
    if not gold:
        raise _Skip("empty gold")
    solution = re.sub(r"<<[^<>]*>>", "", reasoning).strip()  # calculator annotations
    return Example(default_id, question, gold, solution or None)


def svamp_row(row: dict, default_id: str) -> Example:
    body, q = _text(row, "Body", "body"), _text(row, "Question", "question")
    if row.get("Answer") is None and row.get("answer") is None:
        raise _Skip("missing Answer")
    gold = _number_text(row["Answer"] if row.get("Answer") is not None else row["answer"])
    meta = {k: row[k] for k in ("Equation", "Type") if row.get(k) is not None}
    return Example(_id(row, "ID", default_id), f"{body} {q}", gold, None, meta=meta)


def arc_row(row: dict, default_id: str) -> Example:
    # `answer` / `response` of the local copy are a host repo's additions: never read them
    question = _text(row, "question")
    ch = row.get("choices")
    if not isinstance(ch, dict) or not ch.get("text") or not ch.get("label"):
        raise _Skip("missing choices")
    labels, texts = [str(x).strip() for x in ch["label"]], [str(x).strip() for x in ch["text"]]
    if len(labels) != len(texts):
        raise _Skip("choices label/text mismatch")
    key = _text(row, "answerKey")
    numeric = all(lab.isdigit() for lab in labels)
    if numeric:  # some NYSEDREGENTS items use 1-4: map to letters so grading sees A-E
        to_letter = {lab: "ABCDE"[int(lab) - 1] for lab in labels if 1 <= int(lab) <= 5}
        labels, key = [to_letter.get(lab, lab) for lab in labels], to_letter.get(key, key)
    if key not in labels:
        raise _Skip("answerKey not among labels")
    choices = [f"{lab}. {txt}" for lab, txt in zip(labels, texts)]
    return Example(_id(row, "id", default_id), question, key, None, choices, {"labels": labels})


_MATH_SUFFIX = re.compile(r"\s*Let's think step by step and output the final answer within \\boxed\{\}\.?\s*$")


def math_row(row: dict, default_id: str) -> Example:
    """MATH / MATH-500 in all their shapes: problem + answer (MATH-500), problem + full solution
    (answer = its last boxed), verl (problem with an instruction suffix, solution =
    reward_model.ground_truth = the bare answer)."""
    problem = _MATH_SUFFIX.sub("", _text(row, "problem", "question"))
    if not problem:
        raise _Skip("missing problem")
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
        raise _Skip("no answer")
    if solution is not None and (solution == gold or isinstance(rm, dict) and "\\boxed" not in solution):
        solution = None  # verl format: the "solution" is only the answer
    meta = {k: row[k] for k in ("level", "type", "subject") if row.get(k) is not None}
    return Example(_id(row, "unique_id", default_id), problem, gold, solution, meta=meta)


def aime_row(row: dict, default_id: str) -> Example:
    problem = _text(row, "problem", "question")
    if row.get("answer") is None or not str(row["answer"]).strip():
        raise _Skip("missing answer")
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
        raise _Skip("missing answer")
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
        raise _Skip("missing ground_truth")
    extra = row.get("extra_info")
    default_id = str(extra["index"]) if isinstance(extra, dict) and extra.get("index") is not None else default_id
    meta = {k: row[k] for k in ("data_source",) if row.get(k) is not None}
    return Example(_id(row, "id", default_id), problem, str(gold).strip(), None, meta=meta)


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        TaskSpec("gsm8k", "openai/gsm8k", "main", "numeric", "gsm8k_0shot", gsm8k_row),
        TaskSpec("svamp", "ChilleD/SVAMP", None, "numeric", "gsm8k_0shot", svamp_row),
        TaskSpec("arc-c", "allenai/ai2_arc", "ARC-Challenge", "choice", "arc_0shot", arc_row),
        TaskSpec("math500", "HuggingFaceH4/MATH-500", None, "math", "math_0shot", math_row),
        TaskSpec("math", "DigitalLearningGmbH/MATH-lighteval", None, "math", "math_0shot", math_row),
        TaskSpec("aime_2024", "HuggingFaceH4/aime_2024", None, "math", "math_0shot", aime_row, {"test": "train"}),
        TaskSpec("strategyqa", "ChilleD/StrategyQA", None, "yesno", "strategyqa_0shot", strategyqa_row),
        TaskSpec(
            "dapo_math",
            "BytedTsinghua-SIA/DAPO-Math-17k",
            None,
            "math_dapo",
            "dapo",
            dapo_row,
            {"test": "train"},
            dedupe=True,
        ),
        TaskSpec("arith", None, None, "numeric", "arith_3shot", None),
    ]
}

_KWARGS = ("difficulty", "num_synthetic", "hub_id", "hub_config")


def kind_for_task(task: str) -> str:
    """The grader kind of a registered task; a kind name passes through; else "math"."""
    if task in grading.KINDS:
        return task
    spec = TASKS.get(task)
    return spec.grader if spec is not None else "math"


def grade(response: str, gold: str, task: str) -> bool:
    """True when the response's final answer matches gold under the task's grader kind."""
    return grading.grade(response, gold, kind_for_task(task))


# ---------------------------------------------------------------- reading rows


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of rows")
        return data
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def local_candidates(task: str, split: str, data_root: str | Path) -> list[Path]:
    root = Path(data_root).expanduser()
    return [d / f"{split}{ext}" for d in (root / task, root) for ext in (".jsonl", ".parquet", ".json")]


def _read_hub(spec: TaskSpec, split: str, hub_id: str, hub_config: str | None, tried: str) -> list[dict]:
    hub_split = spec.hub_splits.get(split, split)
    try:
        from datasets import load_dataset

        ds = load_dataset(hub_id, hub_config, split=hub_split)
    except Exception as e:  # noqa: BLE001 - offline, missing split, no datasets: one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"task={spec.name} split={split}: no local file ({tried}) and the hub load of "
            f"{hub_id} (config={hub_config}, split={hub_split}) failed: {type(e).__name__}: {msg}"
        ) from None
    return [dict(r) for r in ds]


# ---------------------------------------------------------------- the loader


def _subsample(items: list, max_examples: int | None, seed: int) -> list:
    if max_examples is None or max_examples >= len(items):
        return items
    picked = sorted(random.Random(seed).sample(range(len(items)), max_examples))
    return [items[i] for i in picked]


def load_task(
    name: str,
    split: str,
    data_root: str | Path | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> list[Example]:
    """Examples of task ``name`` / ``split``; ``max_examples`` draws a seeded subsample kept in
    file order. kwargs: ``difficulty``, ``num_synthetic`` (arith), ``hub_id``, ``hub_config``,
    ``carve``, ``split_seed``, ``disjoint_from`` (see :func:`load_split`)."""
    return load_split(name, split, data_root, max_examples, seed, **kwargs)[0]


def load_split(
    name: str,
    split: str,
    data_root: str | Path | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    carve: Mapping | None = None,
    split_seed: int = 0,
    disjoint_from: Sequence[str] = (),
    **kwargs: Any,
) -> tuple[list[Example], dict]:
    """(examples, split record) of task ``name`` / ``split``.

    ``carve`` ({source split: {our split: share}}): a split named there gets the rows of the
    source split whose seeded hash of the normalised question (``split_seed``) falls in its share;
    other splits are read whole. ``disjoint_from``: our other splits whose questions are dropped
    from this one (questions that two source files share). The record says which source file,
    shares, seed and counts were used."""
    spec = TASKS.get(name)
    if spec is None:
        raise DataError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    unknown = sorted(set(kwargs) - set(_KWARGS))
    if unknown:
        raise DataError(f"load_task got unknown argument(s) {', '.join(unknown)}; known: {', '.join(_KWARGS)}")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be >= 1 or None, got {max_examples}")

    if name == "arith":  # the generator's splits are disjoint by construction (arith.split_of)
        difficulty, num = kwargs.get("difficulty") or 1, kwargs.get("num_synthetic") or 1000
        examples = generate(split, seed=seed, difficulty=difficulty, num=num)
        out = _subsample(examples, max_examples, seed)
        record = {
            "task": name,
            "split": split,
            "source": "generator",
            "rule": SPLIT_RULE,
            "seed": seed,
            "difficulty": difficulty,
            "n": len(examples),
            "loaded": len(out),
        }
        log.info("task=%s split=%s: loaded %d, skipped 0 (synthetic)", name, split, len(out))
        return out, record

    check_carve(carve)
    hub = (kwargs.get("hub_id"), kwargs.get("hub_config"))
    cache: dict[str, tuple] = {}
    examples, record = _carved(spec, split, data_root, carve, split_seed, hub, cache)
    reasons = ", ".join(f"{k}: {v}" for k, v in Counter(record["skipped"]).most_common()) or "none"
    log.info(
        "task=%s split=%s: loaded %d, skipped %d (%s) from %s",
        name,
        split,
        len(examples),
        sum(record["skipped"].values()),
        reasons,
        record["source"],
    )
    others = [o for o in disjoint_from if o != split]
    if others:
        taken: set[str] = set()
        for other in others:
            try:
                theirs = _carved(spec, other, data_root, carve, split_seed, hub, cache)[0]
                taken |= {question_hash(e.question) for e in theirs}
            except DataError as e:  # no such split here: nothing to keep apart from
                log.warning("task=%s split=%s: cannot read split %s to keep it disjoint (%s)", name, split, other, e)
        kept = [e for e in examples if question_hash(e.question) not in taken]
        record["dropped_in"] = {"splits": others, "n": len(examples) - len(kept)}
        examples = kept
    if not examples:
        raise DataError(f"task={name} split={split}: no usable rows in {record['source']} (skipped: {reasons})")
    out = _subsample(examples, max_examples, seed)
    record.update(n=len(examples), loaded=len(out))
    if record.get("carve") or record.get("dropped_in", {}).get("n"):
        log.info("task=%s split=%s: %s", name, split, describe_split(record))
    return out, record


def describe_split(record: dict) -> str:
    """One line: where a split's questions came from (carve shares, seed, counts, drops)."""
    parts = [f"{record.get('n')} questions of {record.get('source')}"]
    if record.get("carve"):
        shares = ", ".join(f"{k} {v:g}" for k, v in record["carve"].items())
        counts = ", ".join(f"{k} {v}" for k, v in record["counts"].items())
        seed = record["split_seed"]
        parts.append(f"carved from split {record['source_split']} ({shares}; split_seed {seed}; counts {counts})")
    if record.get("dropped_in", {}).get("n"):
        parts.append(f"{record['dropped_in']['n']} dropped as also in {', '.join(record['dropped_in']['splits'])}")
    return "; ".join(parts)


def _carved(spec: TaskSpec, split: str, data_root, carve, split_seed: int, hub: tuple, cache: dict) -> tuple:
    """The usable examples of our ``split`` (its carve share of the source split, or all of it)."""
    source, shares = carve_source(carve, split)
    if source not in cache:
        cache[source] = read_examples(spec, source, data_root, *hub)
    examples, skipped, where = cache[source]
    record: dict[str, Any] = {"task": spec.name, "split": split, "source_split": source, "source": where}
    record["skipped"] = dict(skipped)
    if shares:
        assigned = carve_assign([e.question for e in examples], shares, split_seed)
        counts = Counter(assigned)
        record.update(
            carve=shares,
            split_seed=int(split_seed),
            source_rows=len(examples),
            counts={**{s: counts.get(s, 0) for s in shares}, **({"unused": counts[None]} if counts.get(None) else {})},
        )
        examples = [e for e, a in zip(examples, assigned) if a == split]
    return examples, record


def read_examples(
    spec: TaskSpec, split: str, data_root: str | Path | None, hub_id: str | None = None, hub_config: str | None = None
) -> tuple[list[Example], Counter, str]:
    """All usable examples of a split, the skip reasons counted, and where they came from."""
    rows, source = None, None
    tried = "no data_root"
    if data_root is not None:
        cands = local_candidates(spec.name, split, data_root)
        found = next((p for p in cands if p.is_file()), None)
        tried = f"{cands[0].parent}/{split}.jsonl|parquet|json, {cands[3].parent}/{split}.*"
        if found is not None:
            rows, source = _read_file(found), str(found)
    if rows is None:
        hub_id, hub_config = hub_id or spec.hub_id, hub_config or spec.hub_config
        rows, source = _read_hub(spec, split, hub_id, hub_config, tried), f"hub:{hub_id}"

    examples, skipped, seen = [], Counter(), set()
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise _Skip("not an object")
            ex = spec.row_to_example(row, f"{spec.name}-{split}-{i}")
            if not ex.question or not ex.gold:
                raise _Skip("empty question or gold")
        except _Skip as s:
            skipped[str(s)] += 1
            continue
        if spec.dedupe:
            if ex.question in seen:
                skipped["duplicate question"] += 1
                continue
            seen.add(ex.question)
        examples.append(ex)
    return examples, skipped, source
