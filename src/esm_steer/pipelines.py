"""The two pipelines, their stages in order, and the function that runs each stage.

Every stage function has one signature, ``run(cfg, run, engine=None)``: the composed config,
the open run dir (:class:`esm_steer.runs.Run`) and optionally an engine to use instead of
building one (tests pass a tiny model; ``stage=all`` shares one). The entrypoints (``esm-<entry>``),
eval's offline step and token-2048's ``stage=all`` all read the order from here.

Targets are "module:function" strings, loaded on use: eval runs the offline stages, so
importing the stage modules here would close an import cycle.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable

from esm_steer.config import ConfigError

log = logging.getLogger(__name__)

# ESM (docs/method.md): stages I-III offline, then the online evaluations
ESM_OFFLINE = ("mine", "select", "memory")
ESM_ONLINE = ("eval", "case")
# token-2048 best thinking: stage 1..4, each resumable from its parquet
TOKEN2048 = ("sample", "prepare", "continue", "select")

STAGE_FUNCTIONS: dict[str, str] = {
    "mine": "esm_steer.esm.mine:run",
    "select": "esm_steer.esm.select:run",
    "memory": "esm_steer.esm.memory:run",
    "eval": "esm_steer.evaluate.eval:run",
    "case": "esm_steer.evaluate.case:run",
    "token2048": "esm_steer.token2048.pipeline:run",
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
    module, func = STAGE_FUNCTIONS[entry].split(":")
    return getattr(importlib.import_module(module), func)


def run_offline(cfg, run, engine=None) -> None:
    """Stages I-III (mine -> select -> memory) into ``run``, in order."""
    for stage in ESM_OFFLINE:
        t0 = time.perf_counter()
        stage_function(stage)(cfg, run, engine=engine)
        log.info("offline stage %s done in %.1fs", stage, time.perf_counter() - t0)
