"""logger=mlflow: every stage run is also an MLflow run; a multirun is a parent run with one
child per job.

A stage run (:func:`start_stage`, then :meth:`StageRun.finish`) carries the resolved config
flattened as params; the stage, run dir, git commit, artifact fingerprints (sha256 of each
offline stage's ``manifest.json``), split and backend as tags; per method the numbers of its
tables (``<method>/accuracy``, ``ci_low``, ``ci_high``, ``delta_vs_greedy`` and its CI,
``mean_tokens``, ``mean_budget``, ``null_rate``, ``n_errors``, ``wall_s``, ...) and the
objective as metrics; ``tables/``, ``figures/``, ``cases/`` and the stage summaries as
artifacts. The suite callback opens the parent (:func:`start_sweep`, which leaves its id in
``<sweep dir>/mlflow_parent.json`` for the jobs, whatever process runs them) and logs the
suite tables to it (:func:`end_sweep`).

Tracking never breaks a run: a missing mlflow, an unreachable server or a failing store gives
one warning, and the run goes on without tracking and writes its files as always.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from esm_steer.esm import artifacts
from esm_steer.evaluate.ranking import SUITE_RANKING
from esm_steer.runs import current_output_dir

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"  # in the sweep dir: the parent run of its jobs
STORE_DIR = "mlflow"  # under outputs.root_dir: mlflow.db and artifacts/
# table columns logged as metrics, per method
METRIC_COLUMNS = (
    "n",
    "T_max",
    "accuracy",
    "ci_low",
    "ci_high",
    "delta_vs_greedy",
    "delta_ci_low",
    "delta_ci_high",
    "mean_tokens",
    "mean_budget",
    "truncation_rate",
    "n_errors",
    "probe_overhead",
    "wall_s",
    "null_rate",
)
ARTIFACT_DIRS = ("tables", "figures", "cases")
SUMMARIES = ("mine/summary.json", "token2048/summary.json", "best_of.json", "error.txt", "config_resolved.json")
FINGERPRINTED = (artifacts.MINE_DIR, artifacts.LIBRARY_DIR, artifacts.MEMORY_DIR)
MAX_PARAM = 6000  # MLflow's limit on a param value
SERVER_TIMEOUT_S = 5.0  # a tracking server that does not answer in time: one warning, the run goes on
EXPERIMENT = "esm-steer"  # every run's experiment; MLflow's MLFLOW_EXPERIMENT_NAME replaces it

_disabled: list[str] = []  # the reason, once warned: one warning per process


def enabled(cfg: Any) -> bool:
    return OmegaConf.select(cfg, "logger.name", default="none") == "mlflow" and not _disabled


def tracking_uri(cfg: Any) -> str:
    """logger.tracking_uri, else the local sqlite store under outputs.root_dir (MLflow's default
    backend since 3.7; the file store is legacy)."""
    if cfg.logger.tracking_uri:
        return str(cfg.logger.tracking_uri)
    return f"sqlite:///{(Path(str(cfg.outputs.root_dir)) / STORE_DIR / 'mlflow.db').resolve()}"


def _disable(what: str, e: BaseException | str) -> None:
    if not _disabled:
        why = e if isinstance(e, str) else f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        log.warning("logger=mlflow: %s failed (%s); the run goes on without tracking", what, why)
        _disabled.append(f"{what}: {why}")


def _reachable(uri: str, timeout: float) -> str | None:
    """None when a server's port answers (or the uri is not a server), else why not."""
    u = urlparse(uri)
    if u.scheme not in ("http", "https"):
        return None
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname or "localhost", port), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {uri} within {timeout:g} s: {e}"
    return None


def _client(cfg: Any):
    """(MlflowClient, experiment id), or None after one warning."""
    uri = tracking_uri(cfg)
    problem = _reachable(uri, SERVER_TIMEOUT_S)
    if problem:
        _disable("the tracking server", problem)
        return None
    # MLflow's REST client retries 7 times with backoff (minutes) and reports telemetry: keep a
    # dead server cheap and compute nodes quiet, unless the user set these
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        # lazy: mlflow is the optional `tracking` extra, and costs seconds to import
        from mlflow import MlflowClient
    except ImportError as e:
        _disable("import mlflow (pip install 'esm-steer[tracking]')", e)
        return None
    try:
        local = uri.startswith("sqlite:///")
        if local:
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        exp = client.get_experiment_by_name(name)
        if exp is None:
            # a local store keeps run files beside it (MLflow's default is ./mlruns of the cwd)
            where = str((Path(str(cfg.outputs.root_dir)) / STORE_DIR / "artifacts").resolve()) if local else None
            try:
                # the UI then opens it on its runs (model training), not on GenAI traces
                tags = {"mlflow.experimentKind": "custom_model_development"}
                return client, client.create_experiment(name, artifact_location=where, tags=tags)
            except Exception:  # noqa: BLE001 - another job created it meanwhile
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        return client, exp.experiment_id
    except Exception as e:  # noqa: BLE001 - any store problem: one warning, the run goes on
        _disable(f"the tracking store {uri}", e)
        return None


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """{"online.k_scale": "1.0", ...}: the config's leaves by dotted key (values cut at MLflow's limit)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return {k: v[:MAX_PARAM] for k, v in out.items()}


def table_metrics(run_dir: Path) -> dict[str, float]:
    """{"<method>/<column>": value} from the run's tables (main, ablation, diagnostics)."""
    tables = Path(run_dir) / artifacts.TABLES_DIR
    out: dict[str, float] = {}
    names = [artifacts.MAIN_TABLE, artifacts.ABLATION_TABLE, *sorted(p.name for p in tables.glob("diagnostics_T*.csv"))]
    for name in names:
        if not (tables / name).exists():
            continue
        df = pd.read_csv(tables / name)
        for _, row in df.iterrows():
            for col in METRIC_COLUMNS:
                key = f"{row.get('method')}/{col}"
                v = row.get(col)
                if key not in out and isinstance(v, (int, float)) and not math.isnan(float(v)):
                    out[key] = float(v)
    return out


def fingerprints(cfg: Any, run_dir: Path) -> dict[str, str]:
    """{"artifacts.<stage>": sha256 of its manifest.json[:16]} for the offline stages this run read or wrote."""
    dirs = [Path(run_dir)]
    given = OmegaConf.select(cfg, "eval.artifact_run_dir", default=None)
    if given:
        p = Path(str(given))
        if p.name == "latest" and (p.parent / "LATEST").exists():
            p = p.parent / (p.parent / "LATEST").read_text().strip()
        dirs.insert(0, p)
    out = {}
    for stage in FINGERPRINTED:
        m = next((d / stage / "manifest.json" for d in dirs if (d / stage / "manifest.json").exists()), None)
        if m is not None:
            out[f"artifacts.{stage}"] = hashlib.sha256(m.read_bytes()).hexdigest()[:16]
    return out


def _hydra_job() -> tuple[Path | None, int | None, list[str]]:
    """(sweep dir, job number, overrides) of this multirun job; (None, None, overrides) otherwise."""
    if not HydraConfig.initialized():
        return None, None, []
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    if hc.mode != RunMode.MULTIRUN:
        return None, None, overrides
    return Path(str(hc.sweep.dir)), int(hc.job.num), overrides


class StageRun:
    """One stage's MLflow run (opened by :func:`start_stage`); finish() logs and closes it."""

    def __init__(self, client=None, run_id: str | None = None, cfg: Any = None) -> None:
        self.client, self.run_id, self.cfg = client, run_id, cfg

    def finish(self, run_dir: str | Path, objective: float | None = None, error: str | None = None) -> None:
        if self.client is None or _disabled:
            return
        run_dir = Path(run_dir)
        try:
            c, rid = self.client, self.run_id
            resolved = run_dir / "config_resolved.json"  # what the run used (eval.best_of rewrites it)
            config = json.loads(resolved.read_text()) if resolved.exists() else _container(self.cfg)
            c.log_batch(rid, params=_params(flat_params(config)), tags=_tags(fingerprints(self.cfg, run_dir)))
            metrics = table_metrics(run_dir)
            if objective is not None:
                metrics["objective"] = float(objective)
            c.log_batch(rid, metrics=_metrics(metrics))
            if error:
                c.set_tag(rid, "error", error[:MAX_PARAM])
            for sub in ARTIFACT_DIRS:
                if (run_dir / sub).is_dir():
                    c.log_artifacts(rid, str(run_dir / sub), sub)
            for rel in SUMMARIES:
                if (run_dir / rel).is_file():
                    c.log_artifact(rid, str(run_dir / rel), str(Path(rel).parent) if "/" in rel else None)
            c.set_terminated(rid, "FAILED" if error else "FINISHED")
        except Exception as e:  # noqa: BLE001 - never break the run
            _disable(f"logging run {self.run_id}", e)


NOT_TRACKED = StageRun()


def start_stage(cfg: DictConfig, stage: str) -> StageRun:
    """Open this stage's MLflow run (a child of the sweep's parent in a multirun); NOT_TRACKED
    when logger=none or tracking is off. Never raises."""
    if not enabled(cfg):
        return NOT_TRACKED
    try:
        sweep_dir, job_num, overrides = _hydra_job()
        tags = {"stage": stage, "git_commit": _git_commit(), "overrides": " ".join(overrides)[:MAX_PARAM]}
        tags.update(split=str(OmegaConf.select(cfg, "eval.split", default="")))
        tags.update(backend=str(OmegaConf.select(cfg, "model.backend", default="")))
        name = f"{stage} {cfg.outputs.run_name}"
        if sweep_dir is not None:
            parent = _read_parent(sweep_dir)
            if parent.get("disabled"):
                _disabled.append(parent["disabled"])  # the sweep already warned
                return NOT_TRACKED
            if parent.get("run_id"):
                tags["mlflow.parentRunId"] = parent["run_id"]
            tags.update(job_num=str(job_num), sweep_dir=str(sweep_dir))
            name = f"{stage} job {job_num}"
        made = _client(cfg)
        if made is None:
            return NOT_TRACKED
        client, exp_id = made
        tags["run_dir"] = str(current_output_dir().resolve())
        run = client.create_run(exp_id, start_time=int(time.time() * 1000), tags=tags, run_name=name)
        log.info("logger=mlflow: run %s in %s", run.info.run_id, tracking_uri(cfg))
        return StageRun(client, run.info.run_id, cfg)
    except Exception as e:  # noqa: BLE001 - never break the run
        _disable("opening the MLflow run", e)
        return NOT_TRACKED


def _read_parent(sweep_dir: Path) -> dict:
    try:
        return json.loads((sweep_dir / PARENT_FILE).read_text())
    except (OSError, ValueError):
        return {}


def start_sweep(config: DictConfig) -> None:
    """on_multirun_start: the parent run of the sweep; its id (or why tracking is off) goes to
    <sweep dir>/mlflow_parent.json, where every job, in whatever process, finds it."""
    if OmegaConf.select(config, "logger.name", default="none") != "mlflow":
        return
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    made = _client(config) if enabled(config) else None
    try:
        if made is not None:
            client, exp_id = made
            sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
            tags = {
                "kind": "sweep",
                "sweep_dir": str(sweep_dir.resolve()),
                "sweeper": "optuna" if "optuna" in sweeper.lower() else "basic",
                "stage": str(OmegaConf.select(config, "stage.name", default="")),
                "git_commit": _git_commit(),
                "overrides": " ".join(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])[:MAX_PARAM],
            }
            run = client.create_run(exp_id, tags=tags, run_name=f"sweep {sweep_dir.name}")
            info = {"run_id": run.info.run_id, "tracking_uri": tracking_uri(config)}
            log.info("logger=mlflow: sweep parent run %s in %s", run.info.run_id, info["tracking_uri"])
    except Exception as e:  # noqa: BLE001 - never break the sweep
        _disable("opening the sweep's MLflow run", e)
    if _disabled:
        info = {"disabled": _disabled[0]}
    (sweep_dir / PARENT_FILE).write_text(json.dumps(info) + "\n")


def end_sweep(config: DictConfig, sweep_dir: Path, written: dict[str, Path], n_jobs: int, n_failed: int) -> None:
    """on_multirun_end, after the suite tables: log them (and the Optuna results) to the parent, close it."""
    parent = _read_parent(sweep_dir)
    if not parent.get("run_id") or not enabled(config):
        return
    made = _client(config)
    if made is None:
        return
    client, rid = made[0], parent["run_id"]
    try:
        metrics = {"n_jobs": float(n_jobs), "n_failed": float(n_failed)}
        ranking = sweep_dir / artifacts.TABLES_DIR / SUITE_RANKING
        if ranking.exists():
            best = pd.read_csv(ranking).iloc[0]
            metrics.update(best_objective=float(best["objective_value"]), best_accuracy=float(best["accuracy"]))
            client.set_tag(rid, "best_job", str(int(best["job_num"])))
            client.set_tag(rid, "best_overrides", str(best["overrides"])[:MAX_PARAM])
        client.log_batch(rid, metrics=_metrics({k: v for k, v in metrics.items() if not math.isnan(v)}))
        for sub in ("tables", "figures"):
            if (sweep_dir / sub).is_dir():
                client.log_artifacts(rid, str(sweep_dir / sub), sub)
        for name in ("optimization_results.yaml", "multirun.yaml"):
            if (sweep_dir / name).is_file():
                client.log_artifact(rid, str(sweep_dir / name))
        client.set_terminated(rid, "FAILED" if n_failed else "FINISHED")
    except Exception as e:  # noqa: BLE001 - the tables are on disk already
        _disable("logging the sweep's MLflow run", e)


def _container(cfg: Any) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's state: as written
        return OmegaConf.to_container(cfg, resolve=False)


def _params(d: dict[str, str]):
    from mlflow.entities import Param  # optional dependency: see _client

    return [Param(k[:250], v) for k, v in d.items()]


def _tags(d: dict[str, str]):
    from mlflow.entities import RunTag  # optional dependency: see _client

    return [RunTag(k, v) for k, v in d.items()]


def _metrics(d: dict[str, float]):
    from mlflow.entities import Metric  # optional dependency: see _client

    now = int(time.time() * 1000)
    return [Metric(k, v, now, 0) for k, v in d.items()]
