"""esm-token2048: sample -> prepare -> continue -> select (``stage=all`` runs the four).

Files go to ``<run dir>/<token2048.out_dir>/``. Every stage resumes: one whose output exists
(with matching provenance) is skipped, and sample / continue redo only missing chunks.

Several processes (one per GPU), all in the same run dir (``outputs.run_id=<id>`` or
``token2048.run_dir``): ``stage=sample token2048.shard_index=i token2048.num_shards=k`` per
process (the last to finish merges stage 1), ``stage=prepare`` once, ``stage=continue`` with
the same shard keys per process, then ``stage=select``. With ``stage=all`` and k > 1, shard i
does its stage-1 chunks and stops while other shards' stage-1 parts are missing (launch it
again once they are there), then its continue chunks; the last shard to finish merges and
selects.
"""

from __future__ import annotations

import logging
from pathlib import Path

from esm_steer import runtime
from esm_steer.engine.loading import load_tokenizer, model_path
from esm_steer.runs import RunError, resolve_run_path
from esm_steer.token2048.continue_ import run_continue
from esm_steer.token2048.prepare import run_prepare
from esm_steer.token2048.sample import run_sample
from esm_steer.token2048.select import run_select

log = logging.getLogger(__name__)

# token-2048 best thinking: stage 1..4, each resumable from its parquet
STAGES = ("sample", "prepare", "continue", "select")


class _Lazy:
    """Load the model only for the stages that generate, and only once for stage=all."""

    def __init__(self, cfg, engine=None):
        self.cfg, self._engine, self.owned = cfg, engine, False

    def engine(self):
        if self._engine is None:
            self._engine = runtime.build_engine(self.cfg)
            self.owned = True
        return self._engine

    def tokenizer(self):
        if self._engine is not None:
            return self._engine.tokenizer
        return load_tokenizer(model_path(self.cfg.model)[0])

    def close(self) -> None:
        if self.owned and self._engine is not None:
            self._engine.close()


def run(cfg, run, engine=None) -> dict | None:
    """Run ``cfg.stage.name`` in ``run.dir``; returns select's summary when select ran."""
    t = cfg.token2048
    base = resolve_run_path(t.run_dir) if t.run_dir else Path(run.dir)
    out = base / t.out_dir
    out.mkdir(parents=True, exist_ok=True)
    stage = cfg.stage.name
    todo = STAGES if stage == "all" else (stage,)
    if stage not in STAGES + ("all",):
        raise RunError(f"stage={stage!r} is not a token2048 stage: one of {', '.join(STAGES + ('all',))}")
    lazy = _Lazy(cfg, engine)
    summary = None
    try:
        for s in todo:
            log.info("token2048: stage %s (out: %s)", s, out)
            if s == "sample":
                if not run_sample(cfg, out, lazy.engine) and stage == "all":
                    log.info("token2048: other shards' stage-1 parts still missing; run this again once they are done")
                    return None
            elif s == "prepare":
                run_prepare(cfg, out, lazy.tokenizer())
            elif s == "continue":
                if not run_continue(cfg, out, lazy.engine) and stage == "all":
                    log.info("token2048: other shards still running; run stage=select once they are done")
                    return None
            else:
                summary = run_select(cfg, out)
    finally:
        lazy.close()
    return summary
