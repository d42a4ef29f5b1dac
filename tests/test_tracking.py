"""logger=mlflow: a multirun read back from the store (one parent, one child per job, each child's
numbers those of its job's tables), an unreachable server (one warning, the run goes on), and the
pieces: flattened params, table metrics, the ranking of grid and Optuna sweep dirs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from esm_steer import tracking
from esm_steer.config import ConfigError, ESMConfig, validate
from esm_steer.evaluate.best_of import best_of_overrides
from esm_steer.evaluate.ranking import rank_configurations
from test_suite import _job, _row

BIN = Path(sys.executable).parent
TINY = [
    "eval.methods=[greedy]",
    "eval.ablations=[]",
    "task.max_eval_examples=3",
    "eval.bootstrap_samples=200",
]


def _eval(tmp_path: Path, *args: str, multirun: bool = False) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "esm-eval"), *(["-m"] if multirun else []), f"outputs.root_dir={tmp_path / 'out'}", *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


def test_multirun_is_a_parent_run_with_one_child_per_job(tmp_path):
    import mlflow

    _eval(tmp_path, "logger=mlflow", "decode.max_new_tokens=2,12", "outputs.suite_id=mf", multirun=True)
    sweep = tmp_path / "out" / "_suite" / "mf"
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow' / 'mlflow.db'}"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()  # not MLflow's cwd default
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["esm-steer"])
    parents = runs[runs["tags.kind"] == "sweep"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    parent_id = parents.iloc[0]["run_id"]
    children = runs[runs["tags.mlflow.parentRunId"] == parent_id]
    assert len(runs) == 3 and sorted(children["tags.job_num"]) == ["0", "1"]
    for _, child in children.iterrows():
        job = sweep / child["tags.job_num"]
        main = pd.read_csv(job / "tables" / "main_results_single.csv").set_index("method")
        assert child["metrics.greedy/accuracy"] == pytest.approx(main.loc["greedy", "accuracy"])
        assert child["metrics.greedy/mean_tokens"] == pytest.approx(main.loc["greedy", "mean_tokens"])
        assert child["metrics.greedy/T_max"] == main.loc["greedy", "T_max"]
        assert child["params.decode.max_new_tokens"] == str(main.loc["greedy", "T_max"])
        assert child["tags.stage"] == "eval" and child["tags.split"] == "test" and child["tags.backend"] == "hf"
        assert Path(child["tags.run_dir"]) == job.resolve() and child["status"] == "FINISHED"
        assert len(child["tags.git_commit"]) == 40
        files = {a.path for a in mlflow.MlflowClient().list_artifacts(child["run_id"], "tables")}
        assert "tables/main_results_single.csv" in files
    # the two jobs differ (T_max 2 and 12): each child carries its own job's numbers
    assert children["metrics.greedy/T_max"].nunique() == 2
    suite_files = {a.path for a in mlflow.MlflowClient().list_artifacts(parent_id, "tables")}
    assert "tables/suite_main_results.csv" in suite_files
    assert parents.iloc[0]["metrics.n_jobs"] == 2 and parents.iloc[0]["metrics.n_failed"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_gives_one_warning_and_the_run_goes_on(tmp_path):
    port = _free_port()  # closed again: nothing listens there
    res = _eval(tmp_path, "logger=mlflow", f"logger.tracking_uri=http://127.0.0.1:{port}", "decode.max_new_tokens=2")
    out = res.stdout + res.stderr
    warnings = [line for line in out.splitlines() if "logger=mlflow" in line and "WARNING" in line]
    assert len(warnings) == 1, out[-3000:]
    assert f"cannot reach http://127.0.0.1:{port}" in warnings[0] and "goes on without tracking" in warnings[0]
    tables = list((tmp_path / "out" / "arith").glob("*/tables/main_results_single.csv"))
    assert len(tables) == 1 and pd.read_csv(tables[0])["n"].tolist() == [3]
    assert not (tmp_path / "out" / "mlflow").exists()


def test_logger_none_never_imports_mlflow():
    code = "import sys, esm_steer.cli, esm_steer.evaluate.suite; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_bad_logger_name_is_one_line_naming_the_key():
    cfg = OmegaConf.structured(ESMConfig)
    cfg.logger.name = "wandb"
    with pytest.raises(ConfigError, match=r"^logger.name='wandb' is out of range: one of none, mlflow$"):
        validate(cfg)


def test_flat_params_dotted_keys_lists_as_json_and_cut_at_the_limit():
    got = tracking.flat_params({"online": {"k_scale": 0.5, "L": 3}, "eval": {"methods": ["greedy", "esm"]}, "x": None})
    assert got == {"online.k_scale": "0.5", "online.L": "3", "eval.methods": '["greedy", "esm"]', "x": "None"}
    assert len(tracking.flat_params({"a": "y" * 10000})["a"]) == tracking.MAX_PARAM


def test_table_metrics_per_method_from_main_ablation_and_diagnostics(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    main = [_row("greedy", 0.5), _row("esm", 0.75, delta_vs_greedy=0.25, delta_ci_low=-0.1, n_errors=1)]
    pd.DataFrame(main).to_csv(tables / "main_results_single.csv", index=False)
    pd.DataFrame([_row("no_memory", 0.25)]).to_csv(tables / "ablation.csv", index=False)
    pd.DataFrame([{"method": "esm", "null_rate": 0.4}]).to_csv(tables / "diagnostics_T64.csv", index=False)
    m = tracking.table_metrics(tmp_path)
    assert m["esm/accuracy"] == 0.75 and m["greedy/accuracy"] == 0.5 and m["no_memory/accuracy"] == 0.25
    assert m["esm/delta_vs_greedy"] == 0.25 and m["esm/delta_ci_low"] == -0.1 and m["esm/n_errors"] == 1
    assert m["esm/null_rate"] == 0.4 and m["esm/wall_s"] == 3.0
    assert "greedy/delta_vs_greedy" not in m  # NaN: not logged


def _tied_sweep(root: Path, optuna: bool, objective: str = "accuracy") -> Path:
    """Three jobs; 1 and 2 tie on accuracy, job 2 with the higher CI low end and job 0 the best delta."""
    sweep = root / ("optuna" if optuna else "grid")
    config = f"eval:\n  split: val\n  objective: {objective}\n"
    rows = [(0.5, 0.4, 0.0), (0.75, 0.1, -0.3), (0.75, 0.2, -0.1)]  # (esm accuracy, delta, delta_ci_low)
    for num, (acc, delta, lo) in enumerate(rows):
        main = [_row("greedy", 0.1), _row("esm", acc, delta_vs_greedy=delta, delta_ci_low=lo)]
        _job(sweep, num, [f"online.k_scale={num + 1}", "eval.split=val"], main=main, config=config)
    if optuna:
        target = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
        (sweep / "multirun.yaml").write_text(f"hydra:\n  sweeper:\n    _target_: {target}\n")
    return sweep


def test_ranking_breaks_ties_by_ci_on_a_grid_and_by_trial_on_an_optuna_sweep(tmp_path):
    grid = rank_configurations(_tied_sweep(tmp_path, optuna=False))
    assert grid["job_num"].tolist() == [2, 1, 0] and set(grid["sweeper"]) == {"basic"}
    opt = rank_configurations(_tied_sweep(tmp_path, optuna=True))
    assert opt["job_num"].tolist() == [1, 2, 0] and set(opt["sweeper"]) == {"optuna"}  # Optuna: first to reach it
    by_delta = rank_configurations(_tied_sweep(tmp_path / "d", optuna=True, objective="delta_vs_greedy"))
    assert by_delta["job_num"].tolist() == [0, 2, 1] and by_delta["objective_value"].tolist() == [0.4, 0.2, 0.1]


def test_ranking_warns_when_rank_1_is_not_the_sweepers_best(tmp_path, caplog):
    sweep = _tied_sweep(tmp_path, optuna=True)
    (sweep / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  online.k_scale: 2\nbest_value: 0.75\n"
    )
    rank_configurations(sweep)
    assert "differs from the sweeper" not in caplog.text
    (sweep / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  online.k_scale: 3\nbest_value: 0.75\n"
    )
    rank_configurations(sweep)
    assert "rank 1 (job 1) differs from the sweeper's best trial in ['online.k_scale']" in caplog.text


def test_best_of_drops_the_search_preset():
    got = best_of_overrides(["hparams_search=esm_optuna", "online.k_scale=0.3", "eval.split=val"], ["seed=1"])
    assert got == ["online.k_scale=0.3", "seed=1", "eval.split=test"]


def test_sweep_parent_file_says_why_tracking_is_off(tmp_path, monkeypatch):
    """An unreachable server at the sweep's start: one warning, and the jobs read that they need not try."""
    monkeypatch.setattr(tracking, "_disabled", [])
    port = _free_port()
    cfg = OmegaConf.create(
        {
            "logger": {**OmegaConf.to_container(OmegaConf.structured(ESMConfig).logger), "name": "mlflow"},
            "outputs": {"root_dir": str(tmp_path)},
            "hydra": {"sweep": {"dir": str(tmp_path / "sw")}},
        }
    )
    cfg.logger.tracking_uri = f"http://127.0.0.1:{port}"
    tracking.start_sweep(cfg)
    info = json.loads((tmp_path / "sw" / tracking.PARENT_FILE).read_text())
    assert "cannot reach" in info["disabled"] and len(tracking._disabled) == 1
    tracking.end_sweep(cfg, tmp_path / "sw", {}, 1, 0)  # nothing to close: no error, no second warning
    assert len(tracking._disabled) == 1
