"""Run directories: ``outputs/<run_name>/<run_id>/``, LATEST pointers, logging.

``outputs.run_id`` is a timestamp by default; ``latest`` resolves through
``outputs/<run_name>/LATEST`` (written atomically by the offline stages). Artifact paths
such as ``eval.artifact_run_dir: outputs/<run_name>/latest`` resolve the same way.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from esm_steer.engine.precision import resolve_config
from esm_steer.io import RunError, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

LATEST = "LATEST"
_STAMP = time.strftime("%Y%m%d_%H%M%S")  # one timestamp per process: every resolution agrees


def read_latest(root_dir: str | os.PathLike, run_name: str) -> str:
    pointer = Path(root_dir) / run_name / LATEST
    if not pointer.exists():
        raise RunError(
            f"outputs.run_id=latest: {pointer} does not exist; run esm-mine (or esm-select) first, "
            "or set outputs.run_id to a run id"
        )
    run_id = pointer.read_text().strip()
    if not run_id:
        raise RunError(f"outputs.run_id=latest: {pointer} is empty; set outputs.run_id to a run id")
    return run_id


def write_latest(run_dir: str | os.PathLike) -> None:
    """Point outputs/<run_name>/LATEST at this run (atomic rename)."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir.parent / LATEST, run_dir.name + "\n")


def resolve_run_id(root_dir: str, run_name: str, run_id: str | None) -> str:
    if run_id is None or str(run_id) in ("", "None", "null"):
        return _STAMP
    if str(run_id) == "latest":
        try:
            return read_latest(root_dir, run_name)
        except RunError:
            return "latest"  # the stage wrapper removes this dir and reports in one line
    return str(run_id)


def resolve_run_path(path: str | os.PathLike) -> Path:
    """A run dir path; a last component ``latest`` resolves through the sibling LATEST."""
    p = Path(path)
    if p.name == "latest":
        p = p.parent / read_latest(p.parent.parent, p.parent.name)
    if not p.is_dir():
        raise RunError(f"run directory {p} does not exist")
    return p


def _suite_id(suite_id: str | None) -> str:
    return _STAMP if suite_id in (None, "", "None", "null") else str(suite_id)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("esm_run_id", resolve_run_id, replace=True)
    # cached: launcher workers (loky, submitit) re-compose the job config and would otherwise
    # resolve their own timestamp; with the cache Hydra copies the launcher's value into jobs
    OmegaConf.register_new_resolver("esm_suite_id", _suite_id, replace=True, use_cache=True)


register_resolvers()


@dataclass
class Run:
    """The run directory of one job and the config it ran with."""

    dir: Path
    cfg: DictConfig

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)


def current_output_dir() -> Path:
    """Hydra's output dir for this job (run dir, or sweep subdir in a multirun)."""
    return Path(HydraConfig.get().runtime.output_dir)


def add_file_logging(run_dir: Path) -> Path:
    """Also log to <run dir>/logs/run.log (appending: a resumed stage adds to it)."""
    logfile = run_dir / "logs" / "run.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and getattr(h, "_esm_run_log", False):
            root.removeHandler(h)
            h.close()
    handler = logging.FileHandler(logfile, encoding="utf-8")
    handler._esm_run_log = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return logfile


def start_run(cfg: DictConfig, run_dir: str | os.PathLike | None = None, stage: str | None = None) -> Run:
    """Create the run dir, add run.log, write config_resolved.json (with the real run_id)."""
    run_dir = Path(run_dir) if run_dir is not None else current_output_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    add_file_logging(run_dir)
    with open_dict(cfg):
        if cfg.outputs.run_id in (None, "latest"):
            cfg.outputs.run_id = run_dir.name
        resolve_config(cfg.get("model"))  # model.dtype=auto -> the dtype of this machine, recorded
    resolved = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_json(run_dir / "config_resolved.json", resolved)
    if stage:
        atomic_write_json(run_dir / "configs" / f"{stage}.json", resolved)
    log.info("run dir: %s", run_dir)
    return Run(dir=run_dir, cfg=cfg)
