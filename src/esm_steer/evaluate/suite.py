"""Suite aggregation: a Hydra callback that, when a multirun ends, gathers every job's tables.

Reads each job dir ``<sweep dir>/<job_num>/`` (``tables/main_results_single.csv``,
``tables/ablation.csv``, ``.hydra/overrides.yaml``, ``.hydra/config.yaml``, ``error.txt``,
``gpu.txt``) and writes, atomically,

- ``<sweep dir>/tables/suite_main_results.csv``: one row per job × method, the job's
  overrides as columns, plus ``job_num``, ``status`` (ok | failed), ``error``, ``gpu``;
- ``<sweep dir>/tables/suite_ablation_long.csv``: the same for the ablation tables (written
  when some job ran ablations);
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from esm_steer.io import atomic_save

log = logging.getLogger(__name__)

MAIN_TABLE = "main_results_single.csv"
ABLATION_TABLE = "ablation.csv"
SUITE_MAIN = "suite_main_results.csv"
SUITE_ABLATION = "suite_ablation_long.csv"
SUITE_FIGURE = "suite_accuracy.png"
SUITE_RANKING = "suite_ranking.csv"
JOB_COLUMNS = ["job_num", "status", "error", "gpu"]
TABLE_STAGES = ("eval",)  # jobs whose stage writes tables/main_results_single.csv


@dataclass
class Job:
    num: int
    dir: Path
    overrides: dict[str, str] = field(default_factory=dict)
    override_list: list[str] = field(default_factory=list)
    status: str = "ok"
    error: str = ""
    gpu: str = ""
    dataset: str | None = None
    expects_tables: bool = True
    expects_ablation: bool = False


def parse_overrides(items: list[Any]) -> dict[str, str]:
    """``["task.difficulty=2", "+x=1", "experiment=suite_tiny"]`` -> {key: value}."""
    out: dict[str, str] = {}
    for item in items:
        s = str(item)
        key, eq, value = s.partition("=")
        if not eq:
            continue
        out[key.lstrip("+~")] = _unquote(value)
    return out


def _unquote(value: str) -> str:
    """Hydra writes some string values quoted (``outputs.suite_id='kscale'``): drop the quotes."""
    v = value.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        try:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            parsed = OverridesParser.create().parse_override(f"k={v}").value()
            if isinstance(parsed, str):
                return parsed
        except Exception:  # noqa: BLE001 - not Hydra syntax: keep it as written
            pass
    return value


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def job_dirs(sweep_dir: str | Path) -> list[tuple[int, Path]]:
    """The numbered job dirs of a sweep dir (``hydra.sweep.subdir = ${hydra.job.num}``)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    found = [(int(p.name), p) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found)


def read_job(num: int, job_dir: Path) -> Job:
    from omegaconf import OmegaConf

    job = Job(num=num, dir=job_dir)
    ov = job_dir / ".hydra" / "overrides.yaml"
    if ov.exists():
        try:
            items = OmegaConf.to_container(OmegaConf.load(ov)) or []
            job.override_list = [str(x) for x in items]
            job.overrides = parse_overrides(job.override_list)
        except Exception as e:  # noqa: BLE001 - listed, not fatal
            log.warning("job %d: cannot read %s: %s", num, ov, e)
    cfg_file = job_dir / ".hydra" / "config.yaml"
    if cfg_file.exists():
        try:
            cfg = OmegaConf.load(cfg_file)
            stage = OmegaConf.select(cfg, "stage.name", throw_on_missing=False)
            job.expects_tables = stage is None or str(stage) in TABLE_STAGES
            abl = OmegaConf.select(cfg, "eval.ablations", throw_on_missing=False)
            job.expects_ablation = job.expects_tables and bool(abl)
            ds = OmegaConf.select(cfg, "task.dataset", throw_on_missing=False)
            job.dataset = None if ds is None else str(ds)
        except Exception as e:  # noqa: BLE001 - interpolations that need resolvers etc.
            log.debug("job %d: cannot read %s: %s", num, cfg_file, e)
    gpu = job_dir / "gpu.txt"
    if gpu.exists():
        job.gpu = gpu.read_text(errors="replace").strip()
    err = job_dir / "error.txt"
    if err.exists():
        job.status = "failed"
        job.error = _first_line(err.read_text(errors="replace")) or "failed (empty error.txt)"
    elif job.expects_tables and not (job_dir / "tables" / MAIN_TABLE).exists():
        job.status = "failed"
        job.error = f"no tables/{MAIN_TABLE} (the job did not finish)"
    return job


def _read_csv(path: Path):
    import pandas as pd

    return pd.read_csv(path)


def _job_table(jobs: list[Job], table: str, override_keys: list[str], ablation: bool):
    """Concatenate one table over the jobs, job columns first."""
    import pandas as pd

    frames = []
    for job in jobs:
        path = job.dir / "tables" / table
        df = None
        status, error = job.status, job.error
        if path.exists():
            try:
                df = _read_csv(path)
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
            meta[_ov_col(key)] = job.overrides.get(key)
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


_OVERRIDE_CLASH = set(JOB_COLUMNS) | {"overrides"}


def _ov_col(key: str) -> str:
    return f"override.{key}" if key in _OVERRIDE_CLASH else key


def _override_keys(jobs: list[Job]) -> list[str]:
    keys: list[str] = []
    for job in jobs:
        for k in job.overrides:
            if k not in keys:
                keys.append(k)
    return keys


def _varying(jobs: list[Job], keys: list[str]) -> list[str]:
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def plot_suite(df, jobs: list[Job], path: str | Path) -> Path | None:
    """Grouped bars: one group per job, one bar per method, 95% CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
    vary = _varying(jobs, _override_keys(jobs))
    labels = []
    for job in jobs:
        parts = [f"{k.split('.')[-1]}={job.overrides.get(k)}" for k in vary]
        label = f"#{job.num}" + ("\n" + "\n".join(parts) if parts else "")
        labels.append(label + ("\n(failed)" if job.status != "ok" else ""))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(jobs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + len(jobs) * (0.4 + 0.35 * len(names))), 4.5))
    cmap = plt.get_cmap("tab10")
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
    try:
        return atomic_save(path, lambda p: fig.savefig(p, dpi=120))
    finally:
        plt.close(fig)


def _nan(v: Any) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def _write_csv(df, path: Path) -> Path:
    return atomic_save(path, lambda p: df.to_csv(p, index=False, float_format="%.6g"))


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
    keys = _override_keys(jobs)
    written: dict[str, Path] = {}
    main = _job_table(jobs, MAIN_TABLE, keys, ablation=False)
    written["main"] = _write_csv(main, sweep_dir / "tables" / SUITE_MAIN)
    if any(j.expects_ablation or (j.dir / "tables" / ABLATION_TABLE).exists() for j in jobs):
        abl = _job_table(jobs, ABLATION_TABLE, keys, ablation=True)
        if abl is not None:
            written["ablation"] = _write_csv(abl, sweep_dir / "tables" / SUITE_ABLATION)
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


def _job_setting(job: Job, key: str, default: Any = None) -> Any:
    """A value of the job's composed config (.hydra/config.yaml); ``default`` when unreadable."""
    from omegaconf import OmegaConf

    try:
        v = OmegaConf.select(OmegaConf.load(job.dir / ".hydra" / "config.yaml"), key, default=default)
    except Exception:  # noqa: BLE001 - a missing file or an interpolation needing a resolver
        return default
    return default if v is None else v


def rank_configurations(sweep_dir: str | Path, jobs: list[Job] | None = None, write: bool = True):
    """``tables/suite_ranking.csv``: one row per finished job, ranked by the accuracy of its esm
    row (labelled online.variant) on the split it ran, best first, with the paired CI against
    greedy (ties: the higher CI low end, then the lower job number). None when no job has one."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    jobs = jobs if jobs is not None else [read_job(num, d) for num, d in job_dirs(sweep_dir)]
    keys = _varying(jobs, _override_keys(jobs))
    rows = []
    for job in jobs:
        path = job.dir / "tables" / MAIN_TABLE
        if job.status != "ok" or not path.exists():
            continue
        try:
            df = _read_csv(path)
        except Exception as e:  # noqa: BLE001 - listed as failed in the suite tables already
            log.debug("suite ranking: job %d: %s", job.num, e)
            continue
        if "method" not in df.columns or "accuracy" not in df.columns:
            continue
        label = str(_job_setting(job, "online.variant", "esm"))
        hit, greedy = df[df["method"] == label], df[df["method"] == "greedy"]
        if hit.empty:
            continue
        r = hit.iloc[0]
        row: dict[str, Any] = {
            "job_num": job.num,
            **{_ov_col(k): job.overrides.get(k) for k in keys},
            "overrides": " ".join(job.override_list),
            "split": str(_job_setting(job, "eval.split", _job_setting(job, "task.eval_split", "?"))),
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
        _write_csv(df, sweep_dir / "tables" / SUITE_RANKING)
    return df


class SuiteCallback(Callback):
    """``hydra.callbacks.suite`` in conf/config.yaml: aggregate every multirun when it ends."""

    def __init__(self, enabled: bool = True, figure: bool = True, exit_on_failure: bool = True) -> None:
        self.enabled = enabled
        self.figure = figure
        self.exit_on_failure = exit_on_failure

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Aggregate; then, when a job failed (or the aggregation did), exit 1 with one line.
        SystemExit passes Hydra's callback guard, which would turn an exception into a warning."""
        if not self.enabled:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
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
