"""``model.dtype=auto``: the engine's dtype from what the device computes fast, and why.

On a CPU, bfloat16 is fast only where torch's kernels can use bf16 matmul units (AMX or
AVX-512-BF16): elsewhere oneDNN emulates it, about 50x slower than float32 (a 32x576 @ 576x1536
matmul, one thread: 0.9 vs 45.2 GFLOPS on an AVX2-only AMD EPYC, FACTS.md). So ``auto`` is
bfloat16 on such a CPU and float32 otherwise; on CUDA it is bfloat16 where the GPU supports it,
else float16. The probe honours the ISA caps torch and oneDNN read from the environment
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``), so an emulated AVX2 run resolves as one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which its bf16 matmul is emulated
_ONEDNN_NO_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class CPUCapability:
    """What the CPU offers torch here: the ATen capability (DEFAULT, AVX2, AVX512, ...) and
    whether its bf16 / fp16 matmuls run on hardware units."""

    isa: str
    bf16_units: bool
    fp16_units: bool = False
    detail: str = ""


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype an engine runs at, the one-line reason, and a warning for a slow explicit choice."""

    name: str
    reason: str
    warning: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def _flag(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)  # private helpers of torch.cpu (cpuinfo), present since 2.2
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # noqa: BLE001 - a build without them: no units
        return False


def probe_cpu() -> CPUCapability:
    """This CPU, as torch sees it (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA caps included)."""
    isa = str(torch.backends.cpu.get_cpu_capability())
    amx, avx512_bf16 = _flag("_is_amx_tile_supported"), _flag("_is_avx512_bf16_supported")
    onednn = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    capped = onednn in _ONEDNN_NO_BF16 or not isa.startswith("AVX512")
    units = [n for n, ok in (("amx", amx), ("avx512_bf16", avx512_bf16)) if ok]
    detail = "+".join(units) or "no amx/avx512_bf16"
    if units and capped:  # an emulated older CPU: the units are there, torch's kernels may not use them
        detail += " unused: " + (f"ONEDNN_MAX_CPU_ISA={onednn}" if onednn else f"capability {isa}")
    bf16 = bool(units) and not capped
    return CPUCapability(isa, bf16, fp16_units=_flag("_is_amx_fp16_supported") and not capped, detail=detail)


def cuda_bf16() -> bool:
    """Whether the current CUDA device has native bf16 (compute capability >= 8.0)."""
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def resolve_device(device: str | None) -> str:
    """``auto`` (or empty) -> cuda when available, else cpu."""
    device = str(device or AUTO)
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == AUTO else device


def resolve_dtype(
    requested: str,
    device: str,
    cpu_probe: Callable[[], CPUCapability] | None = None,
    cuda_probe: Callable[[], bool] | None = None,
) -> DtypeChoice:
    """The dtype ``model.dtype=requested`` runs at on ``device`` (cpu, cuda, cuda:1, ...).
    The probes (default :func:`probe_cpu`, :func:`cuda_bf16`, looked up at call time) are
    injectable, so that a test can stand in for a CPU or GPU it does not have."""
    cpu_probe, cuda_probe = cpu_probe or probe_cpu, cuda_probe or cuda_bf16
    requested = str(requested)
    if requested != AUTO and requested not in DTYPES:
        raise ValueError(f"model.dtype={requested} must be auto or one of {sorted(DTYPES)}")
    if str(device).startswith("cuda"):
        if requested != AUTO:
            return DtypeChoice(requested, f"model.dtype={requested} on {device}")
        if cuda_probe():
            return DtypeChoice("bfloat16", f"bfloat16: {device} supports bf16")
        return DtypeChoice("float16", f"float16: {device} has no native bf16")
    if not str(device).startswith("cpu"):
        return DtypeChoice("float32" if requested == AUTO else requested, f"model.dtype={requested} on {device}")
    cap = cpu_probe()
    where = f"CPU capability {cap.isa}, {cap.detail}" if cap.detail else f"CPU capability {cap.isa}"
    if requested == AUTO:
        if cap.bf16_units:
            return DtypeChoice("bfloat16", f"bfloat16: {where}, bf16 matmul units")
        return DtypeChoice("float32", f"float32: {where}, no bf16 matmul units")
    slow = (requested == "bfloat16" and not cap.bf16_units) or (requested == "float16" and not cap.fp16_units)
    warning = (
        f"model.dtype={requested} on a CPU without {requested} matmul units ({where}): expected much slower "
        "than float32 (about 50x per matmul on an AVX2-only CPU); model.dtype=auto picks float32 here"
        if slow
        else None
    )
    return DtypeChoice(requested, f"model.dtype={requested} on {where}", warning)


def engine_dtype(model_cfg, warn: bool = True) -> DtypeChoice:
    """The dtype an engine for ``model_cfg`` starts at; ``auto`` is logged with its reason, a slow
    explicit choice with a warning (``warn=False``: the caller logs it, with a measured slowdown)."""
    requested = str(getattr(model_cfg, "dtype", AUTO))
    choice = resolve_dtype(requested, resolve_device(getattr(model_cfg, "device", AUTO)))
    if requested == AUTO:
        log.info("model.dtype=auto -> %s", choice.reason)
    if choice.warning and warn:
        log.warning("%s", choice.warning)
    return choice


def matmul_gflops(
    dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 0.2, device: str = "cpu", reps: int = 3
) -> float:
    """GFLOPS of ``[m, k] @ [k, n]`` at ``dtype``: the best of ``reps`` timings of ~``seconds`` each."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b  # warm-up (oneDNN builds its kernel on the first call)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    best, calls = 0.0, 1
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            a @ b
        sync()
        dt = time.perf_counter() - t0
        best = max(best, 2 * m * k * n * calls / dt / 1e9)
        calls = max(1, min(10_000, int(calls * seconds / max(dt, 1e-6))))  # the next timing lasts ~seconds
    return best


def slowdown_note(dtype: torch.dtype, m: int, k: int, n: int) -> str:
    """One matmul of the model's shape at ``dtype`` against float32, measured here (~0.1 s)."""
    slow, fast = (
        matmul_gflops(dtype, m, k, n, seconds=0.02, reps=2),
        matmul_gflops(torch.float32, m, k, n, seconds=0.02, reps=2),
    )
    shape = f"{m}x{k} @ {k}x{n}"
    return f"measured here: a {shape} matmul {fast / slow:.0f}x slower than float32 ({slow:.1f} vs {fast:.1f} GFLOPS)"


def resolve_config(model_cfg) -> DtypeChoice | None:
    """Set ``model.dtype=auto`` of a run's config to the dtype it resolves to here (logged once
    with its reason), so that config_resolved.json and every fingerprint taken from the config
    name the dtype the engine runs at; None when the dtype was explicit."""
    if model_cfg is None or str(getattr(model_cfg, "dtype", "")) != AUTO:
        return None
    choice = resolve_dtype(AUTO, resolve_device(getattr(model_cfg, "device", AUTO)))
    log.info("model.dtype=auto -> %s", choice.reason)
    model_cfg.dtype = choice.name
    return choice
