"""Helpers shared by the stages that run a model on a task (mine, eval, token2048).

Build the engine, load a split's examples, render their prompt ids, derive per-question
seeds, and check that an artifact exists. Nothing here knows about a particular stage.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from esm_steer.config import ConfigError
from esm_steer.runs import RunError

log = logging.getLogger(__name__)


def build_engine(cfg: DictConfig):
    """The configured backend (HF or vLLM) for cfg.model, seeded with cfg.seed."""
    from esm_steer.engine import load_engine

    return load_engine(cfg.model, cfg.seed)


def load_examples(cfg: DictConfig, split: str, max_examples: int | None | str = "auto") -> list:
    """The task's examples of `split`. max_examples "auto": task.max_train_examples for the
    train split, task.max_eval_examples for the val and eval splits, else all."""
    return load_split(cfg, split, max_examples)[0]


def load_split(cfg: DictConfig, split: str, max_examples: int | None | str = "auto") -> tuple[list, dict]:
    """(examples, split record) of `split`: task.carve applied, and questions of the later
    splits (test, then val) dropped from the earlier ones, so the three never share a question."""
    from esm_steer.data.tasks import load_split as load_task_split

    t = cfg.task
    roles = [t.train_split, t.val_split, t.eval_split]
    if len(set(roles)) < 3:
        raise ConfigError(
            f"task.train_split={t.train_split!r}, task.val_split={t.val_split!r} and task.eval_split={t.eval_split!r} "
            "must name three different splits (task.carve carves them out of one source split)"
        )
    if max_examples == "auto":
        if split == t.train_split:
            max_examples = t.max_train_examples
        elif split in (t.val_split, t.eval_split):
            max_examples = t.max_eval_examples
        else:
            max_examples = None
    kwargs: dict[str, Any] = {}
    if t.dataset == "arith":
        if t.get("carve"):
            raise ConfigError("task.carve must be null for task=arith: its generator has the splits train, val, test")
        kwargs.update(difficulty=t.difficulty, num_synthetic=t.num_synthetic)
    else:
        for k in ("hub_id", "hub_config"):
            if t.get(k):
                kwargs[k] = t[k]
        carve = t.get("carve")
        kwargs.update(
            carve=OmegaConf.to_container(carve) if isinstance(carve, DictConfig) else carve,
            split_seed=int(t.get("split_seed") or 0),
            disjoint_from=roles[roles.index(split) + 1 :] if split in roles else [],
        )
    return load_task_split(t.dataset, split, data_root=t.data_root, max_examples=max_examples, seed=cfg.seed, **kwargs)


def eval_split(cfg: DictConfig) -> str:
    """The split esm-eval / esm-case score: task.eval_split (eval.split=test) or task.val_split (val)."""
    which = str(cfg.eval.get("split", "test"))
    if which not in ("test", "val"):
        raise ConfigError(f"eval.split={which!r} is out of range: one of test, val")
    return str(cfg.task.val_split if which == "val" else cfg.task.eval_split)


def prompt_ids(engine_or_tokenizer: Any, cfg: DictConfig, examples: Sequence) -> list[list[int]]:
    """Chat-templated prompt token ids (cfg.prompt.template, cfg.prompt.system) per example."""
    from esm_steer.data.prompts import build_messages, resolve_template
    from esm_steer.engine.base import chat_prompt_ids

    tok = getattr(engine_or_tokenizer, "tokenizer", engine_or_tokenizer)
    return [
        list(
            chat_prompt_ids(
                tok,
                build_messages(resolve_template(cfg.prompt.template, cfg.task.dataset), ex, system=cfg.prompt.system),
            )
        )
        for ex in examples
    ]


def question_seed(seed: int, question_id: str) -> int:
    """A 31-bit seed from the run seed and a stable hash of the question id (not Python's
    salted hash()), so a resumed run samples a question exactly as the first run did."""
    digest = hashlib.sha256(f"{int(seed)}\x00{question_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def grader(task: str):
    """(response, gold) -> bool and (response) -> extracted answer for the task's grader."""
    from esm_steer.data.grading import extract_answer
    from esm_steer.data.tasks import grade, kind_for_task

    kind = kind_for_task(task)

    def is_correct(response: str, gold: str) -> bool:
        return bool(grade(response, gold, task))

    def pred(response: str) -> str | None:
        try:
            return extract_answer(response, kind)
        except Exception:  # noqa: BLE001 - the prediction is only a diagnostic
            return None

    return is_correct, pred


def require(path: str | os.PathLike, stage: str) -> Path:
    """The path, or RunError naming the missing file and the stage that makes it."""
    p = Path(path)
    if not p.exists():
        raise RunError(f"missing {p} (made by esm-{stage}; run it into this run dir first)")
    return p
