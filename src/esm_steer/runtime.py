"""What every stage that runs a model on a task shares: the engine, the examples of a split,
their prompt ids, the grader, and chunked generation that survives a bad prompt.

Each stage (mine, eval, case, the token-2048 stages) calls these instead of its own copy, so
a change here (a new backend argument, a new task key, a retry rule) reaches all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from esm_steer.config import ConfigError
from esm_steer.data import grading
from esm_steer.data.prompts import AUTO, build_messages
from esm_steer.data.tasks import LOAD_KEYS, SYNTHETIC, Example, kind_for_task
from esm_steer.data.tasks import load_split as load_task_split
from esm_steer.engine import Engine, load_engine
from esm_steer.engine.base import Sample, SamplingSpec, chat_prompt_ids
from esm_steer.engine.registry import engine_class

log = logging.getLogger(__name__)

# a run whose share of finish_reason=length responses exceeds this ends with a warning naming
# the budget key to raise (eval: decode.max_new_tokens; mine: offline_mine.max_new_tokens)
TRUNCATION_WARN_RATE = 0.2


def build_engine(cfg: DictConfig) -> Engine:
    """The configured backend (HF or vLLM) for cfg.model, seeded with cfg.seed."""
    return load_engine(cfg.model, cfg.seed)


# ---------------------------------------------------------------- examples


def load_split(cfg: DictConfig, split: str, max_examples: int | None | str = "auto") -> tuple[list[Example], dict]:
    """(examples, split record) of `split`: task.carve applied, and questions of the later
    splits (test, then val) dropped from the earlier ones, so the three never share a question.
    max_examples "auto": task.max_train_examples for the train split, task.max_eval_examples
    for the val and eval splits, else all."""
    t = cfg.task
    roles = [t.train_split, t.val_split, t.eval_split]
    overlap = bool(cfg.eval.get("allow_mining_overlap")) and t.train_split == t.eval_split != t.val_split
    if len(set(roles)) < 3 and not overlap:
        raise ConfigError(
            f"task.train_split={t.train_split!r}, task.val_split={t.val_split!r} and task.eval_split={t.eval_split!r} "
            "must name three different splits (task.carve carves them out of one source split)"
        )
    if max_examples == "auto":
        limits = {t.train_split: t.max_train_examples, t.val_split: t.max_eval_examples}
        max_examples = limits.get(split, t.max_eval_examples if split == t.eval_split else None)
    carve = t.get("carve")
    if t.dataset == SYNTHETIC and carve:
        raise ConfigError("task.carve must be null for task=arith: its generator has the splits train, val, test")
    return load_task_split(
        t.dataset,
        split,
        data_root=t.data_root,
        max_examples=max_examples,
        take=str(t.get("take") or "random"),
        seed=cfg.seed,
        carve=OmegaConf.to_container(carve) if isinstance(carve, DictConfig) else carve,
        split_seed=int(t.get("split_seed") or 0),
        disjoint_from=roles[roles.index(split) + 1 :]
        if split in roles and t.dataset != SYNTHETIC and not overlap
        else [],
        **{k: t[k] for k in LOAD_KEYS if t.get(k) is not None},
    )


def load_examples(cfg: DictConfig, split: str, max_examples: int | None | str = "auto") -> list[Example]:
    """The examples of :func:`load_split`, without the split record."""
    return load_split(cfg, split, max_examples)[0]


def eval_split(cfg: DictConfig) -> str:
    """The split esm-eval / esm-case score: task.eval_split (eval.split=test) or task.val_split (val)."""
    which = str(cfg.eval.get("split", "test"))
    if which not in ("test", "val"):
        raise ConfigError(f"eval.split={which!r} is out of range: one of test, val")
    return str(cfg.task.val_split if which == "val" else cfg.task.eval_split)


def template_name(cfg: DictConfig) -> str:
    """prompt.template, or the task's own prompt (task.prompt) for ``auto``."""
    return str(cfg.task.prompt if cfg.prompt.template == AUTO else cfg.prompt.template)


def prompt_ids(engine_or_tokenizer: Any, cfg: DictConfig, examples: Sequence[Example]) -> list[list[int]]:
    """Chat-templated prompt token ids (prompt.template, prompt.system) per example."""
    tok = getattr(engine_or_tokenizer, "tokenizer", engine_or_tokenizer)
    template = template_name(cfg)
    return [list(chat_prompt_ids(tok, build_messages(template, ex, system=cfg.prompt.system))) for ex in examples]


# ---------------------------------------------------------------- grading


def grade(response: str, gold: str, grader: str) -> tuple[bool, str | None, str | None]:
    """(is_correct, extracted answer, error) under ``grader`` (task.grader, or a task name). A grader
    crash is an error on that response, never a stop; an empty response is simply wrong
    (verl's math_dapo scores it -1 with pred "[INVALID]")."""
    kind = kind_for_task(grader)
    try:
        if kind == "math_dapo":
            s = grading.compute_score_dapo(response or "", gold)
            return bool(s["acc"]), s["pred"], None
        if not response or not response.strip():
            return False, None, None
        return bool(grading.grade(response, gold, kind)), grading.extract_answer(response, kind), None
    except Exception as e:  # noqa: BLE001 - one bad response must not stop the other thousands
        log.warning("grading failed (%s: %s); counted as incorrect", type(e).__name__, e)
        return False, None, f"grading failed: {type(e).__name__}: {e}"


def grader(name: str) -> tuple[Callable[[str, str], bool], Callable[[str], str | None]]:
    """(response, gold) -> bool and (response) -> extracted answer, for the grader ``name``."""
    return (lambda response, gold: grade(response, gold, name)[0]), (lambda response: grade(response, "", name)[1])


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class Failed:
    """Stands in for the result of an item whose generation raised, alone, after the retry."""

    error: str
    wall_s: float


def generate_with_retry(
    call: Callable[[list[int]], list], n: int, group: int, desc: str
) -> Iterator[tuple[list[int], list]]:
    """Run ``call(indices) -> one result per index`` over range(n), ``group`` indices at a time,
    and yield (indices, results) after each group, so the caller can write them to disk.

    A group that raises is retried one index at a time; an index that still raises yields a
    :class:`Failed` in its place, so one bad prompt costs only its own rows. Only Exceptions are
    caught: a KeyboardInterrupt or a kill still stops the stage (resume picks it up from disk)."""

    def checked(idx: list[int]) -> list:
        res = call(idx)
        if len(res) != len(idx):
            raise RuntimeError(f"engine returned {len(res)} results for {len(idx)} prompts")
        return res

    with tqdm(total=n, desc=desc, unit="prompt", disable=None, leave=False) as bar:
        for start in range(0, n, max(1, group)):
            idx = list(range(start, min(start + max(1, group), n)))
            try:
                results = checked(idx)
            except Exception as e:  # noqa: BLE001 - isolate the failing prompt, keep going
                log.warning(
                    "%s: %d prompt(s) failed (%s: %s); retrying one at a time", desc, len(idx), type(e).__name__, e
                )
                results = [_alone(checked, i, e if len(idx) == 1 else None, desc) for i in idx]
            bar.update(len(idx))
            yield idx, results


def _alone(call: Callable[[list[int]], list], i: int, error: Exception | None, desc: str):
    t0 = time.perf_counter()
    if error is None:
        try:
            return call([i])[0]
        except Exception as e:  # noqa: BLE001
            error = e
    failed = Failed(f"{type(error).__name__}: {error}", time.perf_counter() - t0)
    log.warning("%s: prompt %d recorded as failed: %s", desc, i, failed.error)
    return failed


def generate_samples(
    engine: Engine, prompts: Sequence[list[int]], spec: SamplingSpec, seeds: Sequence[int], group: int, desc: str
) -> list[list[Sample] | str]:
    """``spec.n`` samples per prompt (prompt i seeded ``seeds[i]``), or an error string where
    its generation failed alone (:func:`generate_with_retry`)."""

    def call(idx: list[int]) -> list[list[Sample]]:
        res = engine.generate([prompts[i] for i in idx], spec, [seeds[i] for i in idx])
        if any(len(r) != spec.n for r in res):
            raise RuntimeError(f"engine returned {[len(r) for r in res]} samples for {len(idx)} prompts × n={spec.n}")
        return res

    out: list[list[Sample] | str] = [""] * len(prompts)
    for idx, results in generate_with_retry(call, len(prompts), group, desc):
        for i, r in zip(idx, results):
            out[i] = f"generate failed: {r.error}" if isinstance(r, Failed) else r
    return out


def group_size(cfg: DictConfig, n: int) -> int:
    """Prompts per engine call when each draws ``n`` samples: the backend's own rule."""
    return engine_class(str(cfg.model.backend)).prompts_per_call(cfg.model, n)
