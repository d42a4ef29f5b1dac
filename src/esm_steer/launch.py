"""One GPU per worker process in a multirun, and the ``esm_n_jobs`` resolver.

``hydra/launcher=gpu_pool`` runs ``n_jobs = len(launch.gpus)`` joblib (loky) worker processes.
Each worker claims one free GPU the first time it runs a job and keeps it for its whole life:
a reused loky worker keeps its CUDA context, so handing it another GPU for a later job would
be wrong. The claim is an OS file lock (``fcntl.flock``, non-blocking) on
``<sweep dir>/.gpu_locks/gpu<id>.lock`` whose descriptor stays open in a module global; the
kernel drops it when the worker dies, so a GPU is never held by two live workers and a dead
worker's GPU becomes free at once. ``CUDA_VISIBLE_DEVICES`` is set before torch or vLLM touch
CUDA, ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` so that vLLM inside a worker does not fork it.

With ``launch.gpus=""`` (CPU) nothing is claimed; when several CPU jobs run at once
(``launch.cpu_jobs > 1``) each gets its share of the cores, ``cores // cpu_jobs`` torch/OpenMP
threads (at least one), so that the jobs together never run more threads than there are cores.
OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, set in ``esm_steer/__init__.py``
before torch loads): a spinning wait collapses when another process holds a core. Every
multirun job logs what it got and writes it to ``<job dir>/gpu.txt``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from esm_steer.io import atomic_write_text

log = logging.getLogger(__name__)

LOCK_DIR = ".gpu_locks"
GPU_FILE = "gpu.txt"
DEFAULT_WAIT_S = 600.0


class GPUClaimError(RuntimeError):
    """No free GPU within the wait; one line naming the GPUs and who holds them."""


def parse_gpus(gpus: Any) -> list[str]:
    """``"0,1"`` / ``0`` / ``[0, 1]`` / ``""`` -> ``["0", "1"]`` / ``["0"]`` / ... / ``[]``."""
    if gpus is None:
        return []
    if isinstance(gpus, (list, tuple)) or OmegaConf.is_list(gpus):
        items: Iterable[Any] = list(gpus)
    else:
        items = str(gpus).replace(" ", ",").split(",")
    out: list[str] = []
    for g in items:
        s = str(g).strip()
        if s and s not in out:
            out.append(s)
    return out


def n_jobs(gpus: Any, cpu_jobs: Any = 1) -> int:
    """Workers of the gpu_pool launcher: one per GPU, or ``launch.cpu_jobs`` on CPU."""
    ids = parse_gpus(gpus)
    return len(ids) if ids else max(1, int(cpu_jobs or 1))


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("esm_n_jobs", n_jobs, replace=True)


register_resolvers()


# ------------------------------------------------------------------ the claim (per process)

_CLAIM: dict | None = None  # {"gpu", "fd", "path", "pid"}: kept for the worker's life


def current_gpu() -> str | None:
    """The GPU this process holds, or None."""
    return _CLAIM["gpu"] if _CLAIM else None


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def claim_gpu(
    gpus: Any,
    lock_dir: str | os.PathLike,
    wait_s: float = DEFAULT_WAIT_S,
    poll_s: float = 0.5,
) -> str:
    """Claim one free GPU of ``gpus`` for the life of this process; return its id.

    A process that already holds one keeps it (whatever it is asked for next). Tries each id
    with a non-blocking flock; when all are held, polls every ``poll_s`` up to ``wait_s``
    seconds, then raises :class:`GPUClaimError`.
    """
    global _CLAIM
    if _CLAIM is not None:
        return _CLAIM["gpu"]
    ids = parse_gpus(gpus)
    if not ids:
        raise GPUClaimError("launch.gpus is empty: nothing to claim")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(0.0, float(wait_s))
    announced = False
    while True:
        for gpu in ids:
            path = lock_dir / f"gpu{gpu}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n".encode())
            _CLAIM = {"gpu": gpu, "fd": fd, "path": str(path), "pid": os.getpid()}
            return gpu
        if time.monotonic() >= deadline:
            held = ", ".join(f"gpu{g}: {_holder(lock_dir / f'gpu{g}.lock')}" for g in ids)
            raise GPUClaimError(
                f"no free GPU among launch.gpus={','.join(ids)} after {wait_s:g} s, each is held by "
                f"another live worker ({held}; locks in {lock_dir}); run at most one job per GPU "
                "(hydra.launcher.n_jobs <= number of GPUs)"
            )
        if not announced:
            log.info("all GPUs of %s are taken; waiting up to %g s for one", ",".join(ids), wait_s)
            announced = True
        time.sleep(poll_s)


def release_gpu() -> None:
    """Drop this process's claim (tests; a worker normally holds its GPU until it exits)."""
    global _CLAIM
    if _CLAIM is not None:
        try:
            fcntl.flock(_CLAIM["fd"], fcntl.LOCK_UN)
        finally:
            os.close(_CLAIM["fd"])
            _CLAIM = None


def use_gpu(gpu: str) -> None:
    """Make ``gpu`` the only visible device of this process (before CUDA is initialised)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized() and os.environ.get("CUDA_VISIBLE_DEVICES") != gpu:
                log.warning(
                    "CUDA was initialised in this process before the GPU claim; "
                    "CUDA_VISIBLE_DEVICES=%s may not take effect",
                    gpu,
                )
        except Exception:  # noqa: BLE001 - a CPU build without torch.cuda details
            pass
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # ids as nvidia-smi numbers them
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def share_cores(cpu_jobs: int, cfg: DictConfig | None = None) -> int:
    """Several CPU jobs at once: give this one ``cores() // cpu_jobs`` threads (at least one) for
    torch, OpenMP and the BLAS libraries, and ``model.num_threads`` when it is unset; returns it."""
    n = max(1, cores() // max(1, int(cpu_jobs)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by a libgomp not loaded yet
    torch = sys.modules.get("torch")  # not imported here otherwise: OMP_NUM_THREADS does it
    if torch is not None:
        torch.set_num_threads(n)
    if cfg is not None and OmegaConf.select(cfg, "model.num_threads") is None:
        try:
            cfg.model.num_threads = n
        except Exception:  # noqa: BLE001 - a read-only config: the env vars still apply
            pass
    return n


def prepare_job(cfg: DictConfig) -> str | None:
    """Called first thing in every job (cli.run_stage). In a multirun: claim this worker's GPU
    (or set one thread per CPU job), log it and write ``<job dir>/gpu.txt``; returns the GPU
    id or None. Outside a multirun it does nothing."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    job_dir = Path(hc.runtime.output_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    stale = job_dir / "error.txt"  # a rerun of this job (same outputs.suite_id)
    if stale.exists():
        stale.unlink()
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

    gpus = parse_gpus(OmegaConf.select(cfg, "launch.gpus"))
    job = f"job {hc.job.num}"
    gpu: str | None = None
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":  # hydra/launcher=slurm: Slurm assigned the GPU
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        what = visible or "cpu"
        log.info(
            "%s: Slurm job %s, CUDA_VISIBLE_DEVICES=%s%s",
            job,
            os.environ.get("SLURM_JOB_ID", "?"),
            visible or "(none)",
            " (launch.gpus ignored)" if gpus else "",
        )
    elif gpus:
        wait_s = float(OmegaConf.select(cfg, "launch.gpu_wait_s", default=DEFAULT_WAIT_S))
        lock_dir = Path(str(hc.sweep.dir)) / LOCK_DIR
        had = current_gpu()
        gpu = claim_gpu(gpus, lock_dir, wait_s=wait_s)
        use_gpu(gpu)
        what = gpu
        log.info("%s: GPU %s (%s, worker pid %d)", job, gpu, "kept" if had else "claimed", os.getpid())
    else:
        cpu_jobs = int(OmegaConf.select(cfg, "launch.cpu_jobs", default=1) or 1)
        threads = share_cores(cpu_jobs, cfg) if cpu_jobs > 1 else None  # one job at a time: torch's default
        what = "cpu"
        log.info(
            "%s: CPU (launch.gpus empty, %d job(s) at once on %d cores, %s thread(s) each, pid %d)",
            job,
            cpu_jobs,
            cores(),
            threads or "default",
            os.getpid(),
        )
    atomic_write_text(job_dir / GPU_FILE, what + "\n")
    return gpu
