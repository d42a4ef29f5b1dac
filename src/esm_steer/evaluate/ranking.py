"""``tables/suite_ranking.csv`` of a tuning sweep: its finished jobs ranked by the objective of
their esm row (``eval.objective``: accuracy, or delta_vs_greedy), best first, with the paired CI
against greedy. ``eval.best_of=<suite dir>`` runs the rank-1 configuration on the test split.
A grid sweep (Hydra's basic sweeper) breaks ties by the CI's low end; an Optuna sweep
(hparams_search=esm_optuna) by the job number, as Optuna's best trial is the first to reach the
best value, so that rank 1 is the sweeper's best trial.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from esm_steer.config import BASELINE
from esm_steer.esm import artifacts
from esm_steer.evaluate.jobs import (
    MAIN_TABLE,
    Job,
    job_dirs,
    job_setting,
    override_column,
    override_keys,
    read_job,
    varying,
)
from esm_steer.evaluate.report import write_csv

log = logging.getLogger(__name__)

SUITE_RANKING = "suite_ranking.csv"
OPTUNA_RESULTS = "optimization_results.yaml"  # hydra-optuna-sweeper's best trial, in the sweep dir


def objective_of(table: pd.DataFrame, label: str, objective: str) -> float | None:
    """``objective`` (a column: accuracy | delta_vs_greedy) of the row of method ``label``; None when absent."""
    if "method" not in table.columns or objective not in table.columns:
        return None
    hit = table[table["method"] == label]
    if hit.empty or pd.isna(hit.iloc[0][objective]):
        return None
    return float(hit.iloc[0][objective])


def run_objective(run_dir: str | Path, cfg: Any) -> float | None:
    """What an esm-eval run returns to a sweeper: eval.objective of its esm row (online.variant)."""
    path = Path(run_dir) / artifacts.TABLES_DIR / MAIN_TABLE
    if not path.exists():
        return None
    return objective_of(pd.read_csv(path), str(cfg.online.variant), str(cfg.eval.objective))


def sweeper_of(sweep_dir: str | Path) -> str:
    """``optuna`` for a sweep dir made by hydra-optuna-sweeper, else ``basic``."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / OPTUNA_RESULTS).exists():
        return "optuna"
    try:
        target = OmegaConf.select(OmegaConf.load(sweep_dir / "multirun.yaml"), "hydra.sweeper._target_", default="")
    except Exception:  # noqa: BLE001 - no multirun.yaml (a hand-made dir): a grid
        return "basic"
    return "optuna" if "optuna" in str(target).lower() else "basic"


def _check_optuna_best(sweep_dir: Path, best: pd.Series, jobs: list[Job]) -> None:
    """Warn when rank 1 is not the trial that optimization_results.yaml names best."""
    path = sweep_dir / OPTUNA_RESULTS
    if not path.exists():
        return
    params = OmegaConf.to_container(OmegaConf.load(path)).get("best_params") or {}
    job = next(j for j in jobs if j.num == int(best["job_num"]))
    differ = [k for k, v in params.items() if not _same(job.overrides.get(k), v)]
    if differ:
        log.warning("suite ranking: rank 1 (job %d) differs from the sweeper's best trial in %s", job.num, differ)


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


def rank_configurations(sweep_dir: str | Path, jobs: list[Job] | None = None, write: bool = True):
    """``tables/suite_ranking.csv``: one row per finished job, ranked by eval.objective of its esm
    row (labelled online.variant) on the split it ran, best first, with the paired CI against
    greedy (ties: a grid, the higher CI low end, then the lower job number; an Optuna sweep, the
    lower job number). None when no job has one."""
    sweep_dir = Path(sweep_dir)
    jobs = jobs if jobs is not None else [read_job(num, d) for num, d in job_dirs(sweep_dir)]
    keys = varying(jobs, override_keys(jobs))
    sweeper = sweeper_of(sweep_dir)
    objectives = {str(job_setting(j, "eval.objective", "accuracy")) for j in jobs if j.status == "ok"}
    objective = "accuracy" if objectives == set() else sorted(objectives)[0]
    if len(objectives) > 1:
        log.warning("suite ranking: the jobs ran with different eval.objective %s; ranked by %s", objectives, objective)
    rows = []
    for job in jobs:
        path = job.dir / artifacts.TABLES_DIR / MAIN_TABLE
        if job.status != "ok" or not path.exists():
            continue
        try:
            df = pd.read_csv(path)
        except Exception as e:  # noqa: BLE001 - listed as failed in the suite tables already
            log.debug("suite ranking: job %d: %s", job.num, e)
            continue
        if "method" not in df.columns or "accuracy" not in df.columns:
            continue
        label = str(job_setting(job, "online.variant", "esm"))
        hit, greedy = df[df["method"] == label], df[df["method"] == BASELINE]
        if hit.empty:
            continue
        r = hit.iloc[0]
        row: dict[str, Any] = {
            "job_num": job.num,
            **{override_column(k): job.overrides.get(k) for k in keys},
            "overrides": " ".join(job.override_list),
            "split": str(job_setting(job, "eval.split", job_setting(job, "task.eval_split", "?"))),
            "method": label,
            "sweeper": sweeper,
            "objective": objective,
            "objective_value": objective_of(df, label, objective),
        }
        for c in (
            "n",
            "accuracy",
            "ci_low",
            "ci_high",
            "delta_vs_greedy",
            "delta_ci_low",
            "delta_ci_high",
            "mean_tokens",
            "mean_budget",
        ):
            row[c] = r.get(c)
        row["greedy_accuracy"] = greedy.iloc[0]["accuracy"] if not greedy.empty else math.nan
        row["job_dir"] = str(job.dir)
        rows.append(row)
    if not rows:
        return None
    df = pd.DataFrame(rows)
    df["_v"] = df["objective_value"].astype(float).fillna(-math.inf)
    df["_lo"] = df["delta_ci_low"].astype(float).fillna(-math.inf)
    by = ["_v", "_lo", "job_num"] if sweeper == "basic" else ["_v", "job_num"]
    df = df.sort_values(by, ascending=[False] * (len(by) - 1) + [True], kind="stable")
    df = df.drop(columns=["_v", "_lo"]).reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    if sweeper == "optuna":
        _check_optuna_best(sweep_dir, df.iloc[0], jobs)
    if "test" in set(df["split"]):
        log.warning("suite ranking: some jobs ran on the test split; tune on eval.split=val")
    if write:
        write_csv(df, sweep_dir / artifacts.TABLES_DIR / SUITE_RANKING)
    return df
