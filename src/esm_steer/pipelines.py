"""The stage runner: the two pipelines, their stages in order, and the one place that runs them.

Every stage function has one signature, ``run(cfg, run, engine=None)``: the composed config,
the open run dir (:class:`esm_steer.runs.Run`) and optionally an engine to use instead of
building one (tests pass a tiny model; ``stage=all`` shares one). Stages never call one another:
:func:`run_stage` runs the offline stages that eval or case need first (``eval.run_offline_if_missing``),
and the entrypoints (``esm-<entry>``) go through it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from esm_steer.config import ConfigError
from esm_steer.esm import memory, mine, select
from esm_steer.evaluate import case, offline
from esm_steer.evaluate import eval as evaluate
from esm_steer.runs import RunError
from esm_steer.token2048 import pipeline as token2048

log = logging.getLogger(__name__)

# ESM (docs/method.md): stages I-III offline, then the online evaluations
ESM_OFFLINE = ("mine", "select", "memory")
ESM_ONLINE = ("eval", "case")
TOKEN2048 = token2048.STAGES  # token-2048 best thinking: stage 1..4, each resumable from its parquet

STAGE_FUNCTIONS: dict[str, Callable] = {
    "mine": mine.run,
    "select": select.run,
    "memory": memory.run,
    "eval": evaluate.run,
    "case": case.run,
    "token2048": token2048.run,
}

# entrypoint -> the values of stage.name it accepts (``esm-token2048 stage=all`` runs the four)
ENTRYPOINTS: dict[str, tuple[str, ...]] = {
    **{s: (s,) for s in (*ESM_OFFLINE, *ESM_ONLINE)},
    "token2048": (*TOKEN2048, "all"),
}


def stage_function(entry: str, stage: str | None = None) -> Callable:
    """The ``run(cfg, run, engine=None)`` of esm-<entry>; ConfigError for a stage it lacks."""
    if entry not in ENTRYPOINTS:
        raise ConfigError(f"unknown entrypoint esm-{entry}: one of {', '.join(ENTRYPOINTS)}")
    if stage is not None and stage not in ENTRYPOINTS[entry]:
        raise ConfigError(f"stage={stage!r} is not a stage of esm-{entry}: one of {', '.join(ENTRYPOINTS[entry])}")
    return STAGE_FUNCTIONS[entry]


def run_stage(entry: str, cfg, run, engine=None):
    """esm-<entry>'s stage in ``run``. Before eval or case, the offline stages run into this run
    dir when it lacks the artifacts that their steered methods need and eval.run_offline_if_missing."""
    fn = stage_function(entry, cfg.stage.name)
    if entry in ESM_ONLINE:
        why = offline.offline_stages_due(cfg, run, entry, engine)
        if why:
            log.info("%s: running the offline stages %s into this run dir first", why, " -> ".join(ESM_OFFLINE))
            run_offline(cfg, run, engine=engine)
            if not offline.has_artifacts(run.dir):
                raise RunError(f"the offline stages ran but {run.dir} still lacks library/ or memory/")
    return fn(cfg, run, engine=engine)


def run_offline(cfg, run, engine=None) -> None:
    """Stages I-III (mine -> select -> memory) into ``run``, in order."""
    for stage in ESM_OFFLINE:
        t0 = time.perf_counter()
        stage_function(stage)(cfg, run, engine=engine)
        log.info("offline stage %s done in %.1fs", stage, time.perf_counter() - t0)
