"""``tables/suite_ranking.csv`` of a tuning sweep: its finished jobs ranked by the accuracy of
their esm row, best first, with the paired CI against greedy. ``eval.best_of=<suite dir>``
runs the rank-1 configuration on the test split.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

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


def rank_configurations(sweep_dir: str | Path, jobs: list[Job] | None = None, write: bool = True):
    """``tables/suite_ranking.csv``: one row per finished job, ranked by the accuracy of its esm
    row (labelled online.variant) on the split it ran, best first, with the paired CI against
    greedy (ties: the higher CI low end, then the lower job number). None when no job has one."""
    sweep_dir = Path(sweep_dir)
    jobs = jobs if jobs is not None else [read_job(num, d) for num, d in job_dirs(sweep_dir)]
    keys = varying(jobs, override_keys(jobs))
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
    df["_lo"] = df["delta_ci_low"].astype(float).fillna(-math.inf)
    df = df.sort_values(["accuracy", "_lo", "job_num"], ascending=[False, False, True], kind="stable")
    df = df.drop(columns="_lo").reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    if "test" in set(df["split"]):
        log.warning("suite ranking: some jobs ran on the test split; tune on eval.split=val")
    if write:
        write_csv(df, sweep_dir / artifacts.TABLES_DIR / SUITE_RANKING)
    return df
