"""Greedy records shared by the jobs of a sweep over one set of offline artifacts.

Greedy does not depend on ``online.*``: with ``eval.artifact_run_dir`` set, the first job
generates it into ``<artifact dir>/eval/greedy_<split>_T<T>_<fingerprint hash>/`` under a file
lock, and every job copies its examples from there into its own records.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig

from esm_steer import runtime
from esm_steer.esm import artifacts
from esm_steer.evaluate import records as R
from esm_steer.io import JsonlAppender
from esm_steer.runs import Run

log = logging.getLogger(__name__)


@contextlib.contextmanager
def locked(directory: Path):
    """An exclusive (blocking) flock on ``<directory>/.lock``: one writer at a time across jobs."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def shared_greedy_dir(cfg: DictConfig, run: Run, artifact_dir: Path | None) -> Path | None:
    """The shared store when eval.artifact_run_dir points at another run; None: this run's
    own records only."""
    if not cfg.eval.artifact_run_dir or artifact_dir is None or Path(artifact_dir).resolve() == run.dir.resolve():
        return None
    fp = R.fingerprint(cfg, ["greedy"], None)
    digest = hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:8]
    name = f"greedy_{runtime.eval_split(cfg)}_T{int(cfg.decode.max_new_tokens)}_{digest}"
    return Path(artifact_dir) / artifacts.EVAL_DIR / name


def sync_shared_greedy(
    shared: Path,
    fp: dict,
    appender: JsonlAppender,
    ids: Sequence[str],
    generate_missing: Callable[[JsonlAppender], float] | None = None,
) -> float:
    """Under the shared dir's lock: generate what the shared store lacks (when asked), then copy
    this run's examples from it into the run's own records. Returns the generation seconds."""
    with locked(shared):
        store = R.open_records(shared / artifacts.PER_EXAMPLE, fp)
        wall = generate_missing(store) if generate_missing is not None else 0.0
        have = {r["id"]: r for r in store.records}
        new = [have[i] for i in ids if i in have and i not in appender.done_keys]
        if new:
            appender.extend(new)
            log.info("eval greedy: %d records taken from the shared %s", len(new), shared)
    return wall
