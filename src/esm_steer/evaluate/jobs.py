"""The job dirs of a multirun sweep (``<sweep dir>/<job_num>/``): each job's overrides, composed
config, GPU, and whether it finished (``error.txt``, or no tables where esm-eval writes them).
Read by the suite tables (:mod:`esm_steer.evaluate.suite`) and the ranking
(:mod:`esm_steer.evaluate.ranking`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from esm_steer.esm import artifacts

log = logging.getLogger(__name__)

MAIN_TABLE = artifacts.MAIN_TABLE
JOB_COLUMNS = ["job_num", "status", "error", "gpu"]
TABLE_STAGES = ("eval",)  # jobs whose stage writes tables/main_results_single.csv


@dataclass
class Job:
    """One job dir of a sweep, as :func:`read_job` finds it."""

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
    elif job.expects_tables and not (job_dir / artifacts.TABLES_DIR / MAIN_TABLE).exists():
        job.status = "failed"
        job.error = f"no tables/{MAIN_TABLE} (the job did not finish)"
    return job


_OVERRIDE_CLASH = set(JOB_COLUMNS) | {"overrides"}


def override_column(key: str) -> str:
    """The suite-table column of an override key (prefixed where it would clash with a job column)."""
    return f"override.{key}" if key in _OVERRIDE_CLASH else key


def override_keys(jobs: list[Job]) -> list[str]:
    """Every override key of the jobs, in first-seen order."""
    keys: list[str] = []
    for job in jobs:
        for k in job.overrides:
            if k not in keys:
                keys.append(k)
    return keys


def varying(jobs: list[Job], keys: list[str]) -> list[str]:
    """The keys whose value differs between the jobs."""
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def job_setting(job: Job, key: str, default: Any = None) -> Any:
    """A value of the job's composed config (.hydra/config.yaml); ``default`` when unreadable."""
    try:
        v = OmegaConf.select(OmegaConf.load(job.dir / ".hydra" / "config.yaml"), key, default=default)
    except Exception:  # noqa: BLE001 - a missing file or an interpolation needing a resolver
        return default
    return default if v is None else v
