"""``eval.best_of=<suite dir>``: run a tuning suite's best configuration once on the test split.

The suite's rank-1 job (``tables/suite_ranking.csv``, by validation accuracy) gives the
overrides; this command's own overrides replace the job's; sweep plumbing and the split are
dropped. ``best_of.json`` records which job won and with what validation numbers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import pandas as pd
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from esm_steer.config import validate
from esm_steer.engine.precision import resolve_config
from esm_steer.esm import artifacts
from esm_steer.evaluate.jobs import read_job
from esm_steer.evaluate.offline import candidate_paths, has_artifacts
from esm_steer.evaluate.ranking import SUITE_RANKING, rank_configurations
from esm_steer.io import atomic_write_json
from esm_steer.runs import Run, RunError

log = logging.getLogger(__name__)

# overrides of a suite job that are sweep plumbing or the split, never carried to the test run
# (hparams_search: an Optuna sweep's preset, which would make the test run a search again)
_BEST_OF_DROP = (
    "hydra",
    "outputs.suite_id",
    "outputs.run_id",
    "launch",
    "eval.split",
    "eval.best_of",
    "hparams_search",
)


def _override_key(item: str) -> str:
    return str(item).partition("=")[0].lstrip("+~")


def best_of_overrides(job_overrides: Sequence[str], current: Sequence[str]) -> list[str]:
    """The winning job's overrides, then this command's (a key given here replaces the job's),
    then ``eval.split=test``; sweep plumbing (hydra.*, launch.*, outputs ids) and the split dropped."""

    def keep(o: str) -> bool:
        k = _override_key(o)
        return "=" in str(o) and not any(k == d or k.startswith((d + ".", d + "/")) for d in _BEST_OF_DROP)

    merged: dict[str, str] = {}
    for o in [*job_overrides, *current]:
        if keep(o):
            merged.pop(_override_key(o), None)  # a later value replaces, in its own place
            merged[_override_key(o)] = str(o)
    return [*merged.values(), "eval.split=test"]


def _command_overrides() -> list[str]:
    """This command's overrides (Hydra's task overrides); [] outside a Hydra app."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def apply_best_of(cfg: DictConfig, run: Run) -> DictConfig:
    """eval.best_of=<suite dir>: the config of the suite's rank-1 job (tables/suite_ranking.csv,
    made from the job dirs when absent), with this command's overrides, on eval.split=test.
    Logs and writes ``best_of.json`` (which job, its validation numbers, the overrides)."""
    given = str(cfg.eval.best_of)
    sweep = next((p for p in candidate_paths(given, str(cfg.outputs.root_dir)) if p.is_dir()), None)
    if sweep is None:
        raise RunError(f"eval.best_of={given}: no such suite dir (give outputs/_suite/<suite_id>)")
    path = sweep / artifacts.TABLES_DIR / SUITE_RANKING
    ranking = pd.read_csv(path) if path.exists() else rank_configurations(sweep)
    if ranking is None or len(ranking) == 0:
        raise RunError(f"eval.best_of={given}: no finished job with an esm row in {sweep} (tables/{SUITE_RANKING})")
    best = ranking.iloc[0]
    if str(best["split"]) == "test":
        raise RunError(f"eval.best_of={given}: the suite was ranked on the test split; tune with eval.split=val")
    job = read_job(int(best["job_num"]), sweep / str(int(best["job_num"])))
    extra = []
    if "eval.artifact_run_dir" not in {_override_key(o) for o in job.override_list} and has_artifacts(job.dir):
        extra = [f"eval.artifact_run_dir={job.dir.resolve()}"]  # the job mined its own artifacts
    overrides = best_of_overrides([*job.override_list, *extra], _command_overrides())
    if GlobalHydra.instance().is_initialized():
        new = compose(config_name="eval", overrides=overrides)
    else:
        with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
            new = compose(config_name="eval", overrides=overrides)
    with open_dict(new):
        new.outputs = copy.deepcopy(cfg.outputs)  # this run's dir and ids
        new.eval.best_of = None
        resolve_config(new.model)  # as start_run does for this run's own config
    validate(new)
    num = lambda k: None if pd.isna(best.get(k)) else float(best[k])  # noqa: E731
    info = {
        "suite_dir": str(sweep.resolve()),
        "ranking": str(path),
        "job_num": int(best["job_num"]),
        "job_dir": str(job.dir),
        "ranked_on_split": str(best["split"]),
        "ranked_jobs": int(len(ranking)),
        "method": str(best["method"]),
        "sweeper": str(best.get("sweeper", "basic")),
        "objective": str(best.get("objective", "accuracy")),
        **{k: num(k) for k in ("accuracy", "delta_vs_greedy", "delta_ci_low", "delta_ci_high", "objective_value")},
        "overrides": overrides,
    }
    atomic_write_json(run.path("best_of.json"), info)
    atomic_write_json(run.path("config_resolved.json"), OmegaConf.to_container(new, resolve=True))
    log.info(
        "eval.best_of: running job %d of %s (%s sweep; rank 1 of %d by %s %s on %s: accuracy %.3f, Δ vs greedy %s) "
        "on the test split with: %s",
        info["job_num"],
        sweep,
        info["sweeper"],
        len(ranking),
        info["method"],
        info["objective"],
        info["ranked_on_split"],
        info["accuracy"],
        "-" if info["delta_vs_greedy"] is None else f"{info['delta_vs_greedy']:+.3f}",
        " ".join(overrides),
    )
    return new
