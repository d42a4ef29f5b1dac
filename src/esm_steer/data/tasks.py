"""Tasks: each is one yaml (``conf/task/<name>.yaml``) plus its row parser (:mod:`.rows`).

The yaml, over the schema's defaults (:class:`esm_steer.config.TaskConfig`), holds the hub id /
config, the hub split names, the grader kind, the default prompt template, the carve and the
token budget: lm-evaluation-harness style, a task is data. :data:`TASKS` reads them once.
Rows come from a local file, else the hub (:mod:`.sources`); rows missing a required field are
skipped and counted, never fatal. A split named in ``carve`` is a seeded share of a source
split (:mod:`esm_steer.splits`).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from esm_steer.config import TaskConfig
from esm_steer.data import grading
from esm_steer.data.arith import SPLIT_RULE, generate
from esm_steer.data.example import DataError, Example
from esm_steer.data.rows import (
    DAPO_PREFIX,  # noqa: F401 - an old name, see the end
    DAPO_SUFFIX,  # noqa: F401
    ROW_PARSERS,
    RowParser,
    dapo_row,  # noqa: F401
    parse_rows,
)
from esm_steer.data.sources import read_hub, read_local
from esm_steer.splits import carve_assign, carve_source, check_carve, question_hash

log = logging.getLogger(__name__)

SYNTHETIC = "arith"  # the generated task (no rows, no parser: esm_steer.data.arith)


@dataclass(frozen=True)
class TaskSpec:
    """A task as its yaml says (over the schema's defaults), with its row parser."""

    name: str
    hub_id: str | None
    hub_config: str | None
    grader: str  # a kind of esm_steer.data.grading.KINDS
    prompt: str  # default template name in esm_steer.data.prompts.PROMPTS
    row_to_example: RowParser | None  # None: the synthetic task
    hub_splits: dict = field(default_factory=dict)  # our split -> hub split (aime: test -> train)
    dedupe: bool = False  # drop repeated questions (DAPO-Math-17k repeats each problem)


def read_task_yaml(name: str) -> TaskSpec:
    """The TaskSpec of ``conf/task/<name>.yaml`` merged over the schema's TaskConfig."""
    path = files("esm_steer.conf") / "task" / f"{name}.yaml"
    raw = OmegaConf.create(path.read_text(encoding="utf-8"))
    t = OmegaConf.merge(OmegaConf.structured(TaskConfig), raw)
    if t.dataset != name:
        raise DataError(f"conf/task/{name}.yaml: dataset={t.dataset!r}, expected {name!r}")
    if t.grader not in grading.KINDS:
        raise DataError(f"conf/task/{name}.yaml: grader={t.grader!r}; known: {', '.join(grading.KINDS)}")
    return TaskSpec(
        name=name,
        hub_id=t.hub_id,
        hub_config=t.hub_config,
        grader=t.grader,
        prompt=t.prompt,
        row_to_example=ROW_PARSERS.get(name),
        hub_splits=dict(t.hub_splits),
        dedupe=bool(t.dedupe),
    )


TASKS: dict[str, TaskSpec] = {name: read_task_yaml(name) for name in [*ROW_PARSERS, SYNTHETIC]}

# the task keys load_split takes (pass {k: cfg.task[k] for k in LOAD_KEYS}): arith's two, then
# the yaml's values that override TASKS[name] (a command-line task.hub_id=... reaches the loader)
LOAD_KEYS = ("difficulty", "num_synthetic", "hub_id", "hub_config", "hub_splits", "dedupe")


def kind_for_task(task: str) -> str:
    """The grader kind of a registered task; a kind name passes through; else "math"."""
    if task in grading.KINDS:
        return task
    spec = TASKS.get(task)
    return spec.grader if spec is not None else "math"


def grade(response: str, gold: str, task: str) -> bool:
    """True when the response's final answer matches gold under the task's grader kind."""
    return grading.grade(response, gold, kind_for_task(task))


def subsample(items: list, max_examples: int | None, seed: int, take: str = "random") -> list:
    """A seeded subsample of ``max_examples`` items, kept in their order (all when None or more);
    ``take="first"``: the first ``max_examples`` (task.take)."""
    if max_examples is None or max_examples >= len(items):
        return items
    if take == "first":
        return items[:max_examples]
    picked = sorted(random.Random(seed).sample(range(len(items)), max_examples))
    return [items[i] for i in picked]


def load_task(name: str, split: str, *args: Any, **kwargs: Any) -> list[Example]:
    """The examples of :func:`load_split` (same arguments), without the split record."""
    return load_split(name, split, *args, **kwargs)[0]


def load_split(
    name: str,
    split: str,
    data_root: str | Path | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    carve: Mapping | None = None,
    split_seed: int = 0,
    disjoint_from: Sequence[str] = (),
    take: str = "random",
    **kwargs: Any,
) -> tuple[list[Example], dict]:
    """(examples, split record) of task ``name`` / ``split``.

    ``carve`` ({source split: {our split: share}}): a split named there gets the rows of the
    source split whose seeded hash of the normalised question (``split_seed``) falls in its share;
    other splits are read whole. ``disjoint_from``: our other splits whose questions are dropped
    from this one (questions that two source files share). The record says which source file,
    shares, seed and counts were used. ``max_examples`` draws a seeded subsample kept in file
    order (``take="first"``: the first ones). kwargs: ``difficulty``, ``num_synthetic`` (arith);
    ``hub_id``, ``hub_config``, ``hub_splits``, ``dedupe`` (the task yaml's values, e.g. from the
    composed ``cfg.task``)."""
    spec = TASKS.get(name)
    if spec is None:
        raise DataError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    unknown = sorted(set(kwargs) - set(LOAD_KEYS))
    if unknown:
        raise DataError(f"load_task got unknown argument(s) {', '.join(unknown)}; known: {', '.join(LOAD_KEYS)}")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be >= 1 or None, got {max_examples}")

    if name == SYNTHETIC:  # the generator's splits are disjoint by construction (arith.split_of)
        difficulty = kwargs.get("difficulty") or TaskConfig.difficulty
        num = kwargs.get("num_synthetic") or TaskConfig.num_synthetic
        examples = generate(split, seed=seed, difficulty=difficulty, num=num)
        out = subsample(examples, max_examples, seed, take)
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
    spec = replace(spec, **{k: kwargs[k] for k in LOAD_KEYS[2:] if kwargs.get(k) is not None})
    cache: dict[str, tuple] = {}
    examples, record = _carved(spec, split, data_root, carve, split_seed, cache)
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
                theirs = _carved(spec, other, data_root, carve, split_seed, cache)[0]
                taken |= {question_hash(e.question) for e in theirs}
            except DataError as e:  # no such split here: nothing to keep apart from
                log.warning("task=%s split=%s: cannot read split %s to keep it disjoint (%s)", name, split, other, e)
        kept = [e for e in examples if question_hash(e.question) not in taken]
        record["dropped_in"] = {"splits": others, "n": len(examples) - len(kept)}
        examples = kept
    if not examples:
        raise DataError(f"task={name} split={split}: no usable rows in {record['source']} (skipped: {reasons})")
    out = subsample(examples, max_examples, seed, take)
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


def _carved(spec: TaskSpec, split: str, data_root, carve, split_seed: int, cache: dict) -> tuple:
    """The usable examples of our ``split`` (its carve share of the source split, or all of it)."""
    source, shares = carve_source(carve, split)
    if source not in cache:
        cache[source] = read_examples(spec, source, data_root)
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


def read_examples(spec: TaskSpec, split: str, data_root: str | Path | None) -> tuple[list[Example], Counter, str]:
    """All usable examples of a split, the skip reasons counted, and where they came from."""
    rows, source = read_local(spec.name, split, data_root)
    if rows is None:
        hub_split = spec.hub_splits.get(split, split)
        rows = read_hub(spec.name, split, spec.hub_id, spec.hub_config, hub_split, tried=source)
        source = f"hub:{spec.hub_id}"
    examples, skipped = parse_rows(rows, spec.row_to_example, f"{spec.name}-{split}", dedupe=spec.dedupe)
    return examples, skipped, source
