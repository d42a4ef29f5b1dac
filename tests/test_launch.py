"""GPU pool (one GPU per live worker, kept across jobs), the n_jobs resolver, and the Slurm
launcher config composing without a cluster."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esm_steer import launch


def _pool_job(i: int, lock_dir: str, record_dir: str) -> dict:
    """One short job in a worker process: claim (or keep) a GPU, record what it saw."""
    from esm_steer import launch as L

    start = time.time()
    had = L.current_gpu()
    gpu = L.claim_gpu("0,1", lock_dir, wait_s=20, poll_s=0.05)
    L.use_gpu(gpu)
    time.sleep(0.25)
    rec = {
        "job": i,
        "pid": os.getpid(),
        "gpu": gpu,
        "had": had,
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "start": start,
        "end": time.time(),
    }
    Path(record_dir, f"job{i}.json").write_text(json.dumps(rec))
    return rec


def test_gpu_pool_two_workers_five_jobs(tmp_path):
    from joblib import Parallel, delayed

    lock_dir, rec_dir = tmp_path / ".gpu_locks", tmp_path / "records"
    rec_dir.mkdir()
    recs = Parallel(n_jobs=2, backend="loky")(delayed(_pool_job)(i, str(lock_dir), str(rec_dir)) for i in range(5))
    assert len(recs) == 5 and len(list(rec_dir.glob("job*.json"))) == 5
    for r in recs:  # every job recorded its GPU and saw it as its only visible device
        assert r["gpu"] in ("0", "1") and r["cuda_visible"] == r["gpu"]
    gpus_of_pid: dict[int, set] = {}
    for r in recs:
        gpus_of_pid.setdefault(r["pid"], set()).add(r["gpu"])
    assert all(len(g) == 1 for g in gpus_of_pid.values()), gpus_of_pid  # a worker keeps its GPU
    assert len(gpus_of_pid) <= 2
    # a reused worker kept its claim: some job found the GPU already held by its process
    assert any(r["had"] == r["gpu"] for r in recs)
    # never one GPU in two live workers: the two worker processes hold different GPUs, and no
    # two overlapping jobs of different processes used the same GPU
    if len(gpus_of_pid) == 2:
        assert len({next(iter(g)) for g in gpus_of_pid.values()}) == 2
    for a in recs:
        for b in recs:
            if a["pid"] != b["pid"] and a["gpu"] == b["gpu"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)


@pytest.fixture
def no_claim():
    launch.release_gpu()
    yield
    launch.release_gpu()


def _hold(path: Path) -> int:
    """Hold a lock as another worker would (a separate open file description)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"pid 4242 on test\n")
    return fd


def test_claim_skips_held_gpu_and_keeps_claim(tmp_path, no_claim):
    fd = _hold(tmp_path / "gpu0.lock")
    try:
        assert launch.claim_gpu("0,1", tmp_path, wait_s=0) == "1"
        assert launch.claim_gpu("0,1", tmp_path, wait_s=0) == "1"  # kept, not re-claimed
        assert launch.current_gpu() == "1"
    finally:
        os.close(fd)


def test_claim_all_taken_times_out_with_clear_error(tmp_path, no_claim):
    fds = [_hold(tmp_path / f"gpu{g}.lock") for g in ("0", "1")]
    try:
        t0 = time.monotonic()
        with pytest.raises(launch.GPUClaimError, match=r"no free GPU among launch.gpus=0,1 after 0.3 s.*pid 4242"):
            launch.claim_gpu("0,1", tmp_path, wait_s=0.3, poll_s=0.05)
        assert time.monotonic() - t0 >= 0.3
        assert launch.current_gpu() is None
    finally:
        for fd in fds:
            os.close(fd)


def test_claim_waits_for_a_gpu_to_free(tmp_path, no_claim):
    fd = _hold(tmp_path / "gpu0.lock")
    import threading

    threading.Timer(0.2, os.close, args=(fd,)).start()  # the other worker exits
    assert launch.claim_gpu("0", tmp_path, wait_s=5, poll_s=0.05) == "0"


def test_parse_gpus_and_n_jobs():
    assert launch.parse_gpus("0,1") == ["0", "1"]
    assert launch.parse_gpus(" 2, 3 ,2") == ["2", "3"]
    assert launch.parse_gpus("") == [] and launch.parse_gpus(None) == []
    assert launch.parse_gpus(0) == ["0"] and launch.parse_gpus([4, 5]) == ["4", "5"]
    assert launch.n_jobs("0,1", 1) == 2
    assert launch.n_jobs("", 3) == 3
    assert launch.n_jobs("", 0) == 1


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    import esm_steer.cli  # noqa: F401 - schema and resolvers

    with initialize_config_module("esm_steer.conf", version_base="1.3"):
        return compose("eval", overrides=overrides, return_hydra_config=True)


def test_gpu_pool_n_jobs_from_launch_gpus():
    cfg = _compose(["hydra/launcher=gpu_pool", 'launch.gpus="0,1"'])
    assert cfg.hydra.launcher.n_jobs == 2
    assert cfg.hydra.launcher.backend == "loky" and cfg.hydra.launcher.prefer == "processes"
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    cfg = _compose(["hydra/launcher=gpu_pool", 'launch.gpus=""', "launch.cpu_jobs=3"])
    assert cfg.hydra.launcher.n_jobs == 3
    cfg = _compose(["hydra/launcher=gpu_pool"])  # the default: CPU, one job at a time
    assert cfg.hydra.launcher.n_jobs == 1
    cfg = _compose(["experiment=suite_tiny"])
    assert cfg.hydra.launcher.n_jobs == 1 and cfg.hydra.sweeper.params["task"] == "arith,arith_d2"
    assert cfg.eval.run_offline_if_missing is True
    assert cfg.hydra.callbacks.suite._target_ == "esm_steer.evaluate.suite.SuiteCallback"


def test_slurm_launcher_composes_without_a_cluster(tmp_path):
    cfg = _compose(["hydra/launcher=slurm"])
    lc = cfg.hydra.launcher
    assert lc._target_.endswith("SlurmLauncher")
    assert lc.gpus_per_node == 1 and lc.tasks_per_node == 1 and lc.nodes == 1
    assert lc.timeout_min == 240 and lc.mem_gb == 64 and lc.cpus_per_task == 8 and lc.partition is None

    # the real entrypoint, with a fake sbatch on PATH that records any call
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "sbatch_called"
    for tool in ("sbatch", "squeue", "scontrol", "srun"):
        (bin_dir / tool).write_text(f"#!/bin/sh\ntouch {called}\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    exe = Path(sys.executable).with_name("esm-eval")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(
        [str(exe), "--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SlurmLauncher" in out.stdout and "partition: gpu" in out.stdout
    assert "gpus_per_node: ${launch.slurm.gpus_per_node}" in out.stdout
    assert not called.exists()
    assert not (tmp_path / "outputs").exists()


@pytest.fixture
def multirun_job(tmp_path, monkeypatch, no_claim):
    """A composed config with Hydra's runtime set as in job 0 of a multirun under tmp_path."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    for var in (
        "CUDA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "VLLM_WORKER_MULTIPROC_METHOD",
        "SUBMITIT_EXECUTOR",
        "SLURM_JOB_ID",
        "OMP_WAIT_POLICY",
        "CUDA_DEVICE_ORDER",
    ):
        monkeypatch.setenv(var, "")  # records the original value: restored after the test
        monkeypatch.delenv(var)

    def make(overrides: list[str]):
        cfg = _compose(overrides)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(tmp_path)
            cfg.hydra.runtime.output_dir = str(tmp_path / "0")
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield make
    HydraConfig.instance().cfg = None


def test_prepare_job_claims_gpu_and_records_it(tmp_path, multirun_job):
    cfg = multirun_job(['launch.gpus="5,6"'])
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "error.txt").write_text("old failure\n")  # from a previous attempt
    assert launch.prepare_job(cfg) == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert (tmp_path / "0" / "gpu.txt").read_text().strip() == "5"
    assert (tmp_path / ".gpu_locks" / "gpu5.lock").exists()
    assert not (tmp_path / "0" / "error.txt").exists()
    assert launch.prepare_job(cfg) == "5"  # the next job of this worker keeps it


def test_prepare_job_cpu_one_thread_per_job(tmp_path, multirun_job, monkeypatch):
    monkeypatch.setattr(launch, "cores", lambda: 2)  # 2 jobs on 2 cores: one thread each
    cfg = multirun_job(['launch.gpus=""', "launch.cpu_jobs=2"])
    assert launch.prepare_job(cfg) is None
    assert os.environ["OMP_NUM_THREADS"] == "1" and cfg.model.num_threads == 1
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert (tmp_path / "0" / "gpu.txt").read_text().strip() == "cpu"
    cfg = multirun_job(['launch.gpus=""'])  # one job at a time: threads left alone
    os.environ.pop("OMP_NUM_THREADS")
    launch.prepare_job(cfg)
    assert "OMP_NUM_THREADS" not in os.environ and cfg.model.num_threads is None


def test_prepare_job_under_slurm_uses_slurms_gpu(tmp_path, multirun_job, monkeypatch):
    cfg = multirun_job(['launch.gpus="0,1"'])
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert launch.prepare_job(cfg) is None and launch.current_gpu() is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert (tmp_path / "0" / "gpu.txt").read_text().strip() == "3"


def test_prepare_job_outside_multirun_does_nothing(tmp_path):
    from omegaconf import OmegaConf

    assert launch.prepare_job(OmegaConf.create({"launch": {"gpus": "0"}})) is None
    assert launch.current_gpu() is None
