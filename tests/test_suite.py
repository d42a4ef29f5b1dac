"""Suite aggregation: hand-made job dirs -> suite tables and figure; and a real multirun
(gpu_pool launcher, 2 workers on fake GPUs, a stub eval stage) that reuses one set of
offline artifacts across an online.k_scale sweep and ends in the callback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from esm_steer.evaluate import suite

COLS = [
    "dataset",
    "model",
    "method",
    "T_max",
    "n",
    "accuracy",
    "ci_low",
    "ci_high",
    "mean_tokens",
    "truncation_rate",
    "probe_overhead",
    "wall_s",
    "delta_vs_greedy",
]


def _row(method, acc, dataset="arith", **extra):
    r = dict(
        dataset=dataset,
        model="smollm2",
        method=method,
        T_max=64,
        n=6,
        accuracy=acc,
        ci_low=max(0, acc - 0.2),
        ci_high=min(1, acc + 0.2),
        mean_tokens=40.0,
        truncation_rate=0.0,
        probe_overhead=0.1,
        wall_s=3.0,
        delta_vs_greedy=float("nan"),
    )
    r.update(extra)
    return r


def _job(sweep: Path, num: int, overrides: list[str], main=None, abl=None, error=None, gpu="cpu", config=None):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if config is not None:
        (d / ".hydra" / "config.yaml").write_text(config)
    if gpu is not None:
        (d / "gpu.txt").write_text(gpu + "\n")
    if main is not None:
        (d / "tables").mkdir()
        pd.DataFrame(main).to_csv(d / "tables" / "main_results_single.csv", index=False)
    if abl is not None:
        pd.DataFrame(abl).to_csv(d / "tables" / "ablation.csv", index=False)
    if error is not None:
        (d / "error.txt").write_text(error + "\n\nTraceback (most recent call last):\n  ...\n")
    return d


def test_aggregate_hand_made_job_dirs(tmp_path):
    sweep = tmp_path / "_suite" / "s1"
    ov = lambda d: ["experiment=suite_tiny", f"task.difficulty={d}", "outputs.suite_id='s1'"]  # noqa: E731
    _job(
        sweep,
        0,
        ov(1),
        main=[_row("greedy", 0.5, extra_col="x"), _row("esm", 0.6667)],
        abl=[_row("esm", 0.6667), _row("no_memory", 0.3333)],
        gpu="0",
    )
    _job(
        sweep,
        1,
        ov(2),
        main=[_row("greedy", 0.1667), _row("esm", 0.3333)],
        abl=[_row("esm", 0.3333), _row("no_memory", 0.1667)],
        gpu="1",
    )
    _job(sweep, 2, ov(3), error="esm-eval: task.difficulty=4 is out of range: 1, 2 or 3", gpu="0")
    (sweep / ".gpu_locks").mkdir()  # not a job dir
    (sweep / "multirun.yaml").write_text("{}\n")

    written = suite.aggregate_suite(sweep)
    assert set(written) == {"main", "ablation", "figure"}
    main = pd.read_csv(sweep / "tables" / "suite_main_results.csv")
    abl = pd.read_csv(sweep / "tables" / "suite_ablation_long.csv")
    fig = sweep / "figures" / "suite_accuracy.png"
    assert fig.exists() and fig.stat().st_size > 1000 and fig.read_bytes()[:4] == b"\x89PNG"

    # one row per job x method, plus one row for the failed job
    assert len(main) == 5
    assert list(main.columns[:8]) == [
        "job_num",
        "status",
        "error",
        "gpu",
        "experiment",
        "task.difficulty",
        "outputs.suite_id",
        "overrides",
    ]
    assert main["outputs.suite_id"].unique().tolist() == ["s1"]  # Hydra's quotes dropped
    assert set(COLS) <= set(main.columns) and "extra_col" in main.columns  # extra columns kept
    assert main["job_num"].tolist() == [0, 0, 1, 1, 2]
    assert main["method"].tolist()[:4] == ["greedy", "esm", "greedy", "esm"]
    assert main["task.difficulty"].tolist() == [1, 1, 2, 2, 3]
    assert main["experiment"].unique().tolist() == ["suite_tiny"]
    assert main["gpu"].astype(str).tolist() == ["0", "0", "1", "1", "0"]
    assert main["status"].tolist() == ["ok"] * 4 + ["failed"]
    failed = main[main["job_num"] == 2].iloc[0]
    assert failed["error"] == "esm-eval: task.difficulty=4 is out of range: 1, 2 or 3"
    assert pd.isna(failed["accuracy"]) and pd.isna(failed["method"])
    assert main.loc[main["status"] == "ok", "error"].isna().all()
    assert main.loc[(main.job_num == 1) & (main.method == "esm"), "accuracy"].item() == pytest.approx(0.3333)
    assert main.loc[0, "overrides"] == "experiment=suite_tiny task.difficulty=1 outputs.suite_id='s1'"

    assert len(abl) == 5 and abl["method"].tolist()[:4] == ["esm", "no_memory", "esm", "no_memory"]
    assert abl["status"].tolist() == ["ok"] * 4 + ["failed"]
    assert abl["task.difficulty"].tolist() == [1, 1, 2, 2, 3]


def test_job_without_tables_is_failed_and_others_still_aggregate(tmp_path):
    sweep = tmp_path / "s"
    eval_cfg = "stage:\n  name: eval\ntask:\n  dataset: gsm8k\neval:\n  ablations: [no_memory]\n"
    _job(sweep, 0, ["task=gsm8k"], config=eval_cfg, gpu=None)  # killed: no tables, no error.txt
    _job(
        sweep,
        1,
        ["task=arith"],
        main=[_row("greedy", 0.5), _row("esm", 0.5)],
        config=eval_cfg.replace("gsm8k", "arith"),
    )
    bad = _job(sweep, 2, ["task=svamp"], main=[_row("greedy", 0.5)], config=eval_cfg)
    (bad / "tables" / "main_results_single.csv").write_bytes(b"")  # unreadable
    suite.aggregate_suite(sweep)
    main = pd.read_csv(sweep / "tables" / "suite_main_results.csv")
    assert main["status"].tolist() == ["failed", "ok", "ok", "failed"]
    assert "did not finish" in main.loc[0, "error"] and main.loc[0, "dataset"] == "gsm8k"
    assert "cannot read tables/main_results_single.csv" in main.loc[3, "error"]
    # ablations were asked for: missing ablation.csv is reported per job
    abl = pd.read_csv(sweep / "tables" / "suite_ablation_long.csv")
    assert abl["job_num"].tolist() == [0, 1, 2] and (abl["status"] == "failed").all()
    assert abl.loc[1, "error"] == "no tables/ablation.csv"
    assert (sweep / "figures" / "suite_accuracy.png").exists()


def test_non_eval_jobs_listed_without_tables(tmp_path):
    """token-2048 shards: no result tables; the suite table lists their status only."""
    sweep = tmp_path / "s"
    cfg = "stage:\n  name: continue\n"
    _job(sweep, 0, ["token2048.shard_index=0"], config=cfg)
    _job(sweep, 1, ["token2048.shard_index=1"], config=cfg, error="esm-token2048: CUDA out of memory")
    written = suite.aggregate_suite(sweep)
    assert set(written) == {"main"}  # no ablation table, no figure
    main = pd.read_csv(sweep / "tables" / "suite_main_results.csv")
    assert main["status"].tolist() == ["ok", "failed"]
    assert main["token2048.shard_index"].tolist() == [0, 1]


def test_empty_sweep_and_cli(tmp_path, capsys):
    assert suite.aggregate_suite(tmp_path / "nothing") == {}
    _job(tmp_path / "s", 0, ["seed=1"], main=[_row("greedy", 0.5)])
    assert suite.main([str(tmp_path / "s")]) == 0
    assert "suite_main_results.csv" in capsys.readouterr().out
    assert suite.main([]) == 2


def test_callback_uses_the_sweep_dir(tmp_path):
    from omegaconf import OmegaConf

    _job(tmp_path / "sw", 0, ["seed=1"], main=[_row("greedy", 0.5)])
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sw")}}})
    suite.SuiteCallback().on_multirun_end(config=cfg)
    assert (tmp_path / "sw" / "tables" / "suite_main_results.csv").exists()
    suite.SuiteCallback(enabled=False).on_multirun_end(config=OmegaConf.create({}))  # no-op


def test_callback_exits_1_after_the_tables_when_a_job_failed(tmp_path, capsys):
    from omegaconf import OmegaConf

    _job(tmp_path / "sw", 0, ["seed=1"], main=[_row("greedy", 0.5)])
    _job(tmp_path / "sw", 1, ["seed=2"], error="esm-eval: online.L=0 is out of range: must be >= 1")
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sw")}}})
    with pytest.raises(SystemExit) as e:
        suite.SuiteCallback().on_multirun_end(config=cfg)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "1 of 2 job(s) failed" in err and "job 1: esm-eval: online.L=0" in err
    main = pd.read_csv(tmp_path / "sw" / "tables" / "suite_main_results.csv")  # written before the exit
    assert main["status"].tolist() == ["ok", "failed"]
    suite.SuiteCallback(exit_on_failure=False).on_multirun_end(config=cfg)  # tables only
    assert suite.main([str(tmp_path / "sw")]) == 1  # by hand: the same verdict


def test_a_sweep_with_a_failing_job_exits_nonzero_with_its_row(tmp_path):
    """The real esm-eval: job 1 fails validate(); the sweep still writes the suite table."""
    exe = Path(sys.executable).parent / "esm-eval"
    cmd = [
        str(exe),
        "-m",
        f"outputs.root_dir={tmp_path / 'out'}",
        "outputs.suite_id=bad",
        "eval.methods=[greedy]",
        "eval.ablations=[]",
        "task.max_eval_examples=2",
        "decode.max_new_tokens=2",
        "eval.bootstrap_samples=200,10",
    ]
    out = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "1 of 2 job(s) failed (job 1: esm-eval: eval.bootstrap_samples=10 is out of range" in out.stderr
    main = pd.read_csv(tmp_path / "out" / "_suite" / "bad" / "tables" / "suite_main_results.csv")
    assert main["status"].tolist() == ["ok", "failed"] and main["eval.bootstrap_samples"].tolist() == [200, 10]
    assert main.loc[0, "method"] == "greedy" and main.loc[0, "n"] == 2 and pd.isna(main.loc[1, "method"])


# ------------------------------------------------------------------ a real multirun

STUB_STAGE = """
import csv, json, os, time
from pathlib import Path
from esm_steer.runs import resolve_run_path

def run(cfg, run, engine=None):
    start = time.time()
    k = float(cfg.online.k_scale)
    art = resolve_run_path(cfg.eval.artifact_run_dir)
    assert (art / "library").is_dir() and (art / "memory").is_dir()
    if k == 2.0:
        raise ValueError("k_scale 2 diverged")
    time.sleep(0.3)
    rows = [dict(dataset="arith", model="m", method=m, T_max=64, n=6, accuracy=a, ci_low=a - 0.1,
                 ci_high=a + 0.1, mean_tokens=10.0) for m, a in (("greedy", 0.5), ("esm", 0.5 + 0.1 * k))]
    run.path("tables").mkdir(parents=True, exist_ok=True)
    for name, part in (("main_results_single.csv", rows), ("ablation.csv", rows[1:])):
        with open(run.path("tables", name), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(part)
    run.path("stub.json").write_text(json.dumps(dict(
        pid=os.getpid(), cuda=os.environ.get("CUDA_VISIBLE_DEVICES"), start=start, end=time.time(),
        artifacts=str(art), copied=any(run.dir.glob("library")))))
"""

APP = """
import sys
import hydra
from esm_steer import cli, pipelines

@hydra.main(version_base="1.3", config_path={conf!r}, config_name="eval")
def main(cfg):
    sys.path.insert(0, {stub_dir!r})  # in the worker process too
    import stub_stage

    pipelines.STAGE_FUNCTIONS["eval"] = stub_stage.run
    cli.run_stage("eval", cfg)

if __name__ == "__main__":
    main()
"""


def test_multirun_gpu_pool_artifact_reuse_and_callback(tmp_path):
    import json

    import esm_steer

    conf = str(Path(esm_steer.__file__).parent / "conf")
    (tmp_path / "stub_stage.py").write_text(STUB_STAGE)
    (tmp_path / "app.py").write_text(APP.format(conf=conf, stub_dir=str(tmp_path)))
    root = tmp_path / "outputs"
    art = root / "offline" / "20260101_000000"
    for sub in ("library", "memory"):
        (art / sub).mkdir(parents=True)
    (root / "offline" / "LATEST").write_text(art.name + "\n")

    cmd = [
        sys.executable,
        "app.py",
        "-m",
        "hydra/launcher=gpu_pool",
        'launch.gpus="0,1"',
        f"outputs.root_dir={root}",
        "outputs.suite_id=t1",
        "online.k_scale=0.5,1,2,4",
        f"eval.artifact_run_dir={root}/offline/latest",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 1, out.stderr[-3000:]  # job 2 failed: non-zero, after the tables below
    assert "1 of 4 job(s) failed (job 2: esm-eval: ValueError: k_scale 2 diverged)" in out.stderr

    sweep = root / "_suite" / "t1"
    jobs = sorted(int(p.name) for p in sweep.iterdir() if p.name.isdigit())
    assert jobs == [0, 1, 2, 3]
    assert sorted(p.name for p in (sweep / ".gpu_locks").iterdir()) == ["gpu0.lock", "gpu1.lock"]
    stubs = {j: json.loads((sweep / str(j) / "stub.json").read_text()) for j in (0, 1, 3)}
    for j, s in stubs.items():
        assert s["artifacts"] == str(art) and not s["copied"]  # one set of artifacts, not copied
        assert s["cuda"] == (sweep / str(j) / "gpu.txt").read_text().strip()
    assert (sweep / "2" / "gpu.txt").read_text().strip() in ("0", "1")
    for a in stubs.values():  # never one GPU in two live workers
        for b in stubs.values():
            if a["pid"] != b["pid"] and a["cuda"] == b["cuda"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"]
    pids_of_gpu: dict = {}
    for s in stubs.values():
        pids_of_gpu.setdefault(s["pid"], set()).add(s["cuda"])
    assert all(len(v) == 1 for v in pids_of_gpu.values())

    main = pd.read_csv(sweep / "tables" / "suite_main_results.csv")
    assert main["job_num"].tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert main["online.k_scale"].tolist() == [0.5, 0.5, 1, 1, 2, 2 * 2, 2 * 2]
    assert main["status"].tolist() == ["ok"] * 4 + ["failed"] + ["ok"] * 2
    assert "k_scale 2 diverged" in main.loc[4, "error"]
    assert main["gpu"].astype(str).isin(["0", "1"]).all()
    assert main.loc[(main.job_num == 3) & (main.method == "esm"), "accuracy"].item() == pytest.approx(0.9)
    assert (sweep / "tables" / "suite_ablation_long.csv").exists()
    assert (sweep / "figures" / "suite_accuracy.png").exists()
