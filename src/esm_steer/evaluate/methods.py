"""The methods eval and case run, and the resumable generation of their per-example records.

A method is greedy, or an online strategy registered in :mod:`esm_steer.esm.strategies`
(esm, an ablation, static) run by the one :class:`~esm_steer.esm.online.OnlinePolicy`.
Records are appended one engine-batch chunk at a time, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from esm_steer import provenance
from esm_steer.config import BASELINE
from esm_steer.engine.base import SamplingSpec
from esm_steer.esm.library import Library
from esm_steer.esm.memory_index import Memory
from esm_steer.esm.online import OnlinePolicy
from esm_steer.esm.strategies import strategy_class
from esm_steer.evaluate import records as R
from esm_steer.io import JsonlAppender
from esm_steer.runtime import Failed, generate_with_retry

log = logging.getLogger(__name__)

ESM = "esm"  # the method of eval.methods that runs as (and is labelled) online.variant


def method_label(cfg: DictConfig, method: str) -> str:
    """The row a method runs as: ``esm`` runs (and is labelled) ``online.variant``; the others are themselves."""
    return str(cfg.online.variant) if method == ESM else method


def check_methods(cfg: DictConfig, keys: Sequence[str] = ("eval.methods", "eval.ablations")) -> None:
    """One line naming the key for a method that is neither greedy nor a registered strategy."""
    strategy_class(str(cfg.online.variant), "online.variant")
    for key in keys:
        for m in OmegaConf.select(cfg, key) or []:
            if not (m == BASELINE and key != "eval.ablations"):
                strategy_class(str(m), key)


def online_methods(methods: Sequence[str]) -> list[str]:
    """The methods that steer (every one but greedy): they need the artifacts and a steering engine."""
    return [m for m in methods if m != BASELINE]


def eval_methods(cfg: DictConfig) -> list[str]:
    """The methods to run, as row labels (method esm -> online.variant), without repeats."""
    check_methods(cfg)
    return list(dict.fromkeys(method_label(cfg, m) for m in [*cfg.eval.methods, *cfg.eval.ablations]))


def online_cfg_for(cfg: DictConfig, variant: str) -> DictConfig:
    """A copy of cfg.online with ``variant`` (a method label: esm, an ablation, static) set."""
    oc = copy.deepcopy(cfg.online)
    with open_dict(oc):
        oc.variant = variant
    return oc


def make_policy(engine, artifact_dir: Path, cfg: DictConfig, variant: str, cache: dict) -> OnlinePolicy:
    """OnlinePolicy for one variant; library and memory are loaded once per run (``cache``)."""
    if "library" not in cache:
        cache["library"] = Library.load(artifact_dir)
        cache["memory"] = Memory.load(artifact_dir, engine.info.model_id, engine.info.steer_layer)
    mined = cache["library"].meta.get("dtype")  # states mined at one dtype, queried at another: refuse
    provenance.check_same(
        {"dtype": mined} if mined else {},
        {"dtype": engine.info.dtype},
        f"the library in {artifact_dir}",
        f"set model.dtype={mined} (as it was mined) or mine it again at {engine.info.dtype}",
        shared=True,
    )
    return OnlinePolicy(engine, cache["library"], cache["memory"], online_cfg_for(cfg, variant), cfg.control_points)


def greedy_generate(engine, prompts: Sequence[list[int]], t_max: int) -> list:
    return [s[0] for s in engine.generate(list(prompts), SamplingSpec(max_new_tokens=t_max, temperature=0.0))]


def make_generator(method: str, engine, cfg: DictConfig, artifact_dir: Path | None, cache: dict):
    """(prompts) -> list of results, and the result -> record converter, for one method."""
    t_max = int(cfg.decode.max_new_tokens)
    if method == BASELINE:
        return (lambda prompts: greedy_generate(engine, prompts, t_max)), R.record_from_sample
    policy = make_policy(engine, artifact_dir, cfg, method, cache)
    return (lambda prompts: policy.run(list(prompts), max_new_tokens=t_max)), R.record_from_online


def generate_records(
    examples: Sequence,
    prompts: Sequence[list[int]],
    generate: Callable[[list[list[int]]], list],
    to_record: Callable,
    appender: JsonlAppender,
    grader: str,
    batch_size: int,
    method: str | None = None,
    key: Callable[[object], object] | None = None,
    desc: str = "",
) -> float:
    """Generate the examples the appender lacks, a chunk at a time, appending after each chunk.

    A chunk that raises is retried one example at a time; an example that still raises is
    recorded as an error (wrong) and the run goes on (eval stops when errors pass
    eval.max_error_rate). ``grader``: task.grader. Returns the generation wall seconds."""
    key = key or (lambda ex: str(ex.id))
    todo = [(ex, p) for ex, p in zip(examples, prompts) if key(ex) not in appender.done_keys]
    if len(todo) < len(examples):
        log.info(
            "%s: %d of %d examples already in %s; resuming",
            desc,
            len(examples) - len(todo),
            len(examples),
            appender.path,
        )
    extra = {"method": method} if method else {}

    def call(idx: list[int]) -> list[dict]:
        t0 = time.perf_counter()
        results = generate([todo[i][1] for i in idx])
        if len(results) != len(idx):
            raise RuntimeError(f"generator returned {len(results)} results for {len(idx)} prompts")
        wall = (time.perf_counter() - t0) / len(idx)
        return [to_record(todo[i][0], res, grader, wall_s=wall, **extra) for i, res in zip(idx, results)]

    total = 0.0
    for idx, recs in generate_with_retry(call, len(todo), batch_size, desc):
        recs = [
            R.error_record(todo[i][0], grader, r.error, wall_s=r.wall_s, **extra) if isinstance(r, Failed) else r
            for i, r in zip(idx, recs)
        ]
        total += sum(r["wall_s"] for r in recs)
        appender.extend(recs)
    return total
