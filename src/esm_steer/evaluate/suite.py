"""Suite aggregation: a Hydra callback that, when a multirun ends, gathers every job's tables.

Reads each job dir ``<sweep dir>/<job_num>/`` (``tables/main_results_single.csv``,
``tables/ablation.csv``, ``.hydra/overrides.yaml``, ``.hydra/config.yaml``, ``error.txt``,
``gpu.txt``) and writes, atomically,

- ``<sweep dir>/tables/suite_main_results.csv``: one row per job × method, the job's
  overrides as columns, plus ``job_num``, ``status`` (ok | failed), ``error``, ``gpu``;
- ``<sweep dir>/tables/suite_ablation_long.csv``: the same for the ablation tables (written
  when some job ran ablations);
- ``<sweep dir>/tables/suite_ranking.csv``: the finished jobs ranked (:mod:`esm_steer.evaluate.ranking`);
- ``<sweep dir>/figures/suite_accuracy.png``: accuracy with its CI per job × method.

A failed job (``error.txt``, or no tables where esm-eval should have written them) is one row
with its error; it never stops the aggregation. After the tables are written, a sweep with a
failed job exits 1 with one line naming the first failure (``exit_on_failure=false`` keeps 0).
Jobs of other entrypoints (token-2048 shards, mine) write no tables: they are listed with
their status only. Enabled for every multirun in
``conf/config.yaml`` (``hydra.callbacks.suite``); to aggregate a sweep dir again by hand:
``python -m esm_steer.evaluate.suite outputs/_suite/<suite_id>``.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from esm_steer.esm import artifacts
from esm_steer.evaluate.jobs import MAIN_TABLE, Job, job_dirs, override_column, override_keys, read_job, varying
from esm_steer.evaluate.ranking import rank_configurations
from esm_steer.evaluate.report import write_csv
from esm_steer.io import atomic_save
from esm_steer.tracking import end_sweep, start_sweep

log = logging.getLogger(__name__)

ABLATION_TABLE = artifacts.ABLATION_TABLE
SUITE_MAIN = "suite_main_results.csv"
SUITE_ABLATION = "suite_ablation_long.csv"
SUITE_FIGURE = "suite_accuracy.png"


def _job_table(jobs: list[Job], table: str, override_keys: list[str], ablation: bool):
    """Concatenate one table over the jobs, job columns first."""
    frames = []
    for job in jobs:
        path = job.dir / artifacts.TABLES_DIR / table
        df = None
        status, error = job.status, job.error
        if path.exists():
            try:
                df = pd.read_csv(path)
            except Exception as e:  # noqa: BLE001 - a broken file is this job's error
                status, error = "failed", f"cannot read tables/{table}: {type(e).__name__}: {e}"
        elif ablation and job.status == "ok":
            if not job.expects_ablation:
                continue  # this job ran no ablations
            status, error = "failed", f"no tables/{table}"
        if df is None or len(df) == 0:
            df = pd.DataFrame([{}])
            if job.dataset is not None:
                df["dataset"] = job.dataset
        meta = {"job_num": job.num, "status": status, "error": error, "gpu": job.gpu}
        for key in override_keys:
            meta[override_column(key)] = job.overrides.get(key)
        meta["overrides"] = " ".join(job.override_list)
        for col in list(meta)[::-1]:
            if col in df.columns:
                df = df.rename(columns={col: f"table.{col}"})
        for i, (k, v) in enumerate(meta.items()):
            df.insert(i, k, [v] * len(df))
        frames.append(df)
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True, sort=False)


def plot_suite(df, jobs: list[Job], path: str | Path) -> Path | None:
    """Grouped bars: one group per job, one bar per method, 95% CI error bars."""
    if df is None or "accuracy" not in df.columns or "method" not in df.columns:
        return None
    ok = df[df["accuracy"].notna()]
    if ok.empty:
        return None
    multi_t = "T_max" in ok.columns and ok["T_max"].nunique() > 1

    def series(row) -> str:
        return f"{row['method']} T={int(row['T_max'])}" if multi_t else str(row["method"])

    names: list[str] = []
    for _, row in ok.iterrows():
        if series(row) not in names:
            names.append(series(row))
    vary = varying(jobs, override_keys(jobs))
    labels = []
    for job in jobs:
        parts = [f"{k.split('.')[-1]}={job.overrides.get(k)}" for k in vary]
        label = f"#{job.num}" + ("\n" + "\n".join(parts) if parts else "")
        labels.append(label + ("\n(failed)" if job.status != "ok" else ""))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(jobs))
    fig = Figure(figsize=(max(6.0, 1.0 + len(jobs) * (0.4 + 0.35 * len(names))), 4.5))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10"]
    for s, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, job in enumerate(jobs):
            rows = ok[(ok["job_num"] == job.num) & (ok.apply(series, axis=1) == name)]
            if rows.empty:
                continue
            row = rows.iloc[0]
            acc = float(row["accuracy"])
            cl = float(row["ci_low"]) if "ci_low" in row and not _nan(row["ci_low"]) else acc
            ch = float(row["ci_high"]) if "ci_high" in row and not _nan(row["ci_high"]) else acc
            xs.append(x[j] - 0.4 + width * (s + 0.5))
            ys.append(acc)
            lo.append(max(0.0, acc - cl))
            hi.append(max(0.0, ch - acc))
        ax.bar(xs, ys, width=width * 0.95, yerr=[lo, hi], capsize=3, label=name, color=cmap(s % 10))
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("accuracy (95% CI)")
    top = ok["ci_high"].max() if "ci_high" in ok.columns else ok["accuracy"].max()
    ax.set_ylim(0, max(1.0, float(top) if not _nan(top) else 1.0) * 1.05)
    ax.set_title(f"suite: {len(jobs)} jobs ({sum(j.status == 'ok' for j in jobs)} ok)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_save(path, lambda p: fig.savefig(p, dpi=120))


def _nan(v: Any) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def aggregate_suite(sweep_dir: str | Path, figure: bool = True) -> dict[str, Path]:
    """Write the suite tables (and figure) of a sweep dir; returns {name: path} of what it wrote."""
    return aggregate_jobs(sweep_dir, figure)[0]


def aggregate_jobs(sweep_dir: str | Path, figure: bool = True) -> tuple[dict[str, Path], list[Job]]:
    """aggregate_suite, also returning the jobs read (their status says which failed)."""
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(num, d) for num, d in job_dirs(sweep_dir)]
    if not jobs:
        log.warning("suite: no job dirs under %s; nothing to aggregate", sweep_dir)
        return {}, []
    keys = override_keys(jobs)
    written: dict[str, Path] = {}
    main = _job_table(jobs, MAIN_TABLE, keys, ablation=False)
    written["main"] = write_csv(main, sweep_dir / artifacts.TABLES_DIR / SUITE_MAIN)
    if any(j.expects_ablation or (j.dir / artifacts.TABLES_DIR / ABLATION_TABLE).exists() for j in jobs):
        abl = _job_table(jobs, ABLATION_TABLE, keys, ablation=True)
        if abl is not None:
            written["ablation"] = write_csv(abl, sweep_dir / artifacts.TABLES_DIR / SUITE_ABLATION)
    rank_configurations(sweep_dir, jobs)  # tables/suite_ranking.csv (eval.best_of reads it)
    if figure:
        try:
            fig = plot_suite(main, jobs, sweep_dir / "figures" / SUITE_FIGURE)
            if fig is not None:
                written["figure"] = fig
        except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the tables
            log.warning("suite figure failed: %s: %s", type(e).__name__, e)
    n_ok = sum(j.status == "ok" for j in jobs)
    log.info(
        "suite: %d job(s), %d ok, %d failed; %s",
        len(jobs),
        n_ok,
        len(jobs) - n_ok,
        ", ".join(str(p) for p in written.values()),
    )
    for j in jobs:
        if j.status != "ok":
            log.warning("suite: job %d failed: %s", j.num, j.error)
    return written, jobs


def failure_line(jobs: list[Job], written: dict[str, Path]) -> str | None:
    """One line for a sweep with failed jobs (None when all are ok)."""
    failed = [j for j in jobs if j.status != "ok"]
    if not failed:
        return None
    where = written.get("main", "the suite tables")
    return (
        f"suite: {len(failed)} of {len(jobs)} job(s) failed (job {failed[0].num}: {failed[0].error}); "
        f"every job's row, failed ones with their error, is in {where}"
    )


class SuiteCallback(Callback):
    """``hydra.callbacks.suite`` in conf/config.yaml: aggregate every multirun when it ends."""

    def __init__(self, enabled: bool = True, figure: bool = True, exit_on_failure: bool = True) -> None:
        self.enabled = enabled
        self.figure = figure
        self.exit_on_failure = exit_on_failure

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse an Optuna search of esm-eval on the test split (one line, exit 2: tuning reads
        val only); open the sweep's MLflow parent run (logger=mlflow)."""
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
        split = OmegaConf.select(config, "eval.split", default=None)
        if "optuna" in sweeper.lower() and OmegaConf.select(config, "stage.name") == "eval" and split != "val":
            print(
                f"esm-eval: eval.split={split}: an Optuna search tunes on the validation split (eval.split=val)",
                file=sys.stderr,
            )
            sys.exit(2)
        start_sweep(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Aggregate; then, when a job failed (or the aggregation did), exit 1 with one line.
        SystemExit passes Hydra's callback guard, which would turn an exception into a warning."""
        if not self.enabled:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        written, jobs = {}, []
        try:
            written, jobs = aggregate_jobs(sweep_dir, figure=self.figure)
            problem = failure_line(jobs, written)
        except Exception:  # noqa: BLE001 - the jobs are done and on disk; say how to redo it
            log.exception(
                "suite aggregation of %s failed; rerun it with: python -m esm_steer.evaluate.suite %s",
                sweep_dir,
                sweep_dir,
            )
            problem = f"suite: the aggregation of {sweep_dir} failed (see the log)"
        end_sweep(config, sweep_dir, written, len(jobs), sum(j.status != "ok" for j in jobs))  # logger=mlflow
        if problem and self.exit_on_failure:
            print(problem, file=sys.stderr)
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m esm_steer.evaluate.suite <sweep dir, e.g. outputs/_suite/<suite_id>>", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] %(message)s")
    written, jobs = aggregate_jobs(argv[0])
    for name, path in written.items():
        print(f"{name}: {path}")
    problem = failure_line(jobs, written)
    if problem:
        print(problem, file=sys.stderr)
    return 0 if written and not problem else 1


if __name__ == "__main__":
    sys.exit(main())
