"""Where eval and case find the offline artifacts (library/ and memory/), read in place.

From ``eval.artifact_run_dir`` (a sweep over one mined library), else this run dir; with
neither, the stage runner (:func:`esm_steer.pipelines.run_stage`) runs the offline stages into
this run dir first when ``eval.run_offline_if_missing`` (:func:`offline_stages_due` says when).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from esm_steer.engine import require_steering
from esm_steer.esm import artifacts
from esm_steer.evaluate.methods import eval_methods, online_methods
from esm_steer.runs import Run, RunError, resolve_run_path

log = logging.getLogger(__name__)

ARTIFACT_DIRS = (artifacts.LIBRARY_DIR, artifacts.MEMORY_DIR)


def missing_artifacts(run_dir: Path) -> list[str]:
    """The artifact dirs (``library/``, ``memory/``) that ``run_dir`` lacks or has empty."""
    return [f"{d}/" for d in ARTIFACT_DIRS if not ((run_dir / d).is_dir() and any((run_dir / d).iterdir()))]


def has_artifacts(run_dir: Path) -> bool:
    return not missing_artifacts(run_dir)


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


def offline_stages_due(cfg: DictConfig, run: Run, entry: str = "eval", engine=None) -> str | None:
    """Why the offline stages must run into this run dir before esm-<entry> (eval or case), as
    one line for the log, or None: steered methods asked for, no eval.artifact_run_dir, the run
    dir lacks library/ or memory/, and eval.run_offline_if_missing. Methods the engine (or
    cfg.model) cannot steer are refused first, in one line, so that nothing is mined for them."""
    methods = online_methods(eval_methods(cfg) if entry == "eval" else list(cfg.eval.methods))
    require_steering(cfg.model if engine is None else engine, methods)
    missing = missing_artifacts(run.dir)
    if not methods or cfg.eval.artifact_run_dir or not missing or not cfg.eval.run_offline_if_missing:
        return None
    return (
        f"eval.run_offline_if_missing=true and {run.dir} lacks {' and '.join(missing)} (needed by {', '.join(methods)})"
    )


def resolve_artifact_dir(cfg: DictConfig, run: Run) -> Path:
    """The dir holding library/ and memory/: eval.artifact_run_dir, else this run dir (where the
    stage runner put them when eval.run_offline_if_missing), else RunError."""
    if cfg.eval.artifact_run_dir:
        return _given_dir(str(cfg.eval.artifact_run_dir), str(cfg.outputs.root_dir))
    if has_artifacts(run.dir):
        return run.dir
    raise RunError(
        f"no library/ and memory/ in {run.dir}: run `esm-mine ... && esm-select ... outputs.run_id=latest && "
        f"esm-memory ... outputs.run_id=latest` first, or set eval.artifact_run_dir=outputs/<run_name>/latest or "
        f"eval.run_offline_if_missing=true (greedy alone needs none: 'eval.methods=[greedy]' 'eval.ablations=[]')"
    )
