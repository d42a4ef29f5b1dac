"""Where eval and case find the offline artifacts (library/ and memory/), read in place.

From ``eval.artifact_run_dir`` (a sweep over one mined library), else this run dir; with
neither, the offline stages run into this run dir when ``eval.run_offline_if_missing``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from esm_steer import pipelines
from esm_steer.esm import artifacts
from esm_steer.evaluate.methods import eval_methods, online_methods
from esm_steer.runs import Run, RunError, resolve_run_path

log = logging.getLogger(__name__)

ARTIFACT_DIRS = (artifacts.LIBRARY_DIR, artifacts.MEMORY_DIR)


def has_artifacts(run_dir: Path) -> bool:
    return all((run_dir / d).is_dir() and any((run_dir / d).iterdir()) for d in ARTIFACT_DIRS)


def candidate_paths(path: str, root_dir: str) -> list[Path]:
    """``outputs/<name>/latest`` as given (relative to the cwd), and under outputs.root_dir
    when root_dir is elsewhere (its first component then stands for the root)."""
    p = Path(path)
    cands = [p]
    if not p.is_absolute() and len(p.parts) > 1:
        cands.append(Path(root_dir) / Path(*p.parts[1:]))
    return cands


def _given_dir(given: str, root_dir: str) -> Path:
    err: Exception | None = None
    for cand in candidate_paths(given, root_dir):
        try:
            d = resolve_run_path(cand)
        except RunError as e:
            err = err or e
            continue
        if has_artifacts(d):
            return d
        raise RunError(
            f"eval.artifact_run_dir={given} ({d}) has no {' and '.join(ARTIFACT_DIRS)}/; "
            f"make them with esm-mine, esm-select, esm-memory into that run"
        )
    raise RunError(str(err) if err else f"eval.artifact_run_dir={given} does not resolve")


def resolve_artifact_dir(cfg: DictConfig, run: Run, run_offline: Callable[[], None] | None = None) -> Path:
    """The dir holding library/ and memory/: eval.artifact_run_dir, else this run dir; with
    neither, run the offline stages here when eval.run_offline_if_missing, else RunError."""
    if cfg.eval.artifact_run_dir:
        return _given_dir(str(cfg.eval.artifact_run_dir), str(cfg.outputs.root_dir))
    if has_artifacts(run.dir):
        return run.dir
    if not cfg.eval.run_offline_if_missing:
        raise RunError(
            f"no library/ and memory/ in {run.dir}: run `esm-mine ... && esm-select ... outputs.run_id=latest && "
            f"esm-memory ... outputs.run_id=latest` first, or set eval.artifact_run_dir=outputs/<run_name>/latest or "
            f"eval.run_offline_if_missing=true (greedy alone needs none: 'eval.methods=[greedy]' 'eval.ablations=[]')"
        )
    missing = [f"{d}/" for d in ARTIFACT_DIRS if not ((run.dir / d).is_dir() and any((run.dir / d).iterdir()))]
    log.info(
        "eval.run_offline_if_missing=true and %s lacks %s (needed by %s): running the offline stages %s "
        "into this run dir first",
        run.dir,
        " and ".join(missing),
        ", ".join(online_methods(eval_methods(cfg))),
        " -> ".join(pipelines.ESM_OFFLINE),
    )
    (run_offline or (lambda: pipelines.run_offline(cfg, run)))()
    if not has_artifacts(run.dir):
        raise RunError(f"the offline stages ran but {run.dir} still lacks library/ or memory/")
    return run.dir
