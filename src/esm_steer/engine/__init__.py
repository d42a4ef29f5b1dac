"""Generation engines: the backend-independent interface, the HF backend, and vLLM (lazy).

``load_engine(cfg.model, seed)`` is what stages call; see :mod:`esm_steer.engine.base` for
the ``Engine`` and ``DecodeBatch`` protocols.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from esm_steer.config import ConfigError
from esm_steer.engine.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    DecodeBatch,
    Engine,
    EngineInfo,
    Sample,
    SamplingSpec,
)
from esm_steer.engine.base import VLLM_MISSING as VLLM_MISSING
from esm_steer.engine.hf import HFEngine
from esm_steer.engine.vllm_backend import VLLMEngine  # imports vllm only when it builds an engine


def load_engine(model_cfg, seed: int = 0) -> Engine:
    """The engine named by ``model_cfg.backend`` (a ModelConfig or a DictConfig with its fields)."""
    backend = str(getattr(model_cfg, "backend", "hf") or "hf")
    if backend == "hf":
        return HFEngine.from_config(model_cfg, seed=seed)
    if backend == "vllm":
        # find_spec, not import: vLLM reads its environment at import (set by from_config)
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(VLLM_MISSING)
        return VLLMEngine.from_config(model_cfg, seed=seed)
    raise ValueError(f"model.backend={backend} must be hf or vllm")


def supports_steering(target) -> bool:
    """Whether an engine, a model config or a ``model.backend`` name runs steered step-level
    decoding (``engine.start``: the online ESM policy and its ablations). vLLM does in eager
    mode only (``model.enforce_eager=true``): compiled vLLM ignores the steering hook."""
    if isinstance(target, str):
        return target in ("hf", "vllm")
    if hasattr(target, "backend"):  # a model config
        return str(target.backend) == "hf" or (str(target.backend) == "vllm" and bool(target.enforce_eager))
    return bool(target.supports_steering)


def require_steering(target, methods: Sequence[str]) -> None:
    """Refuse at start, with one line, when `methods` (those that need steered decoding)
    cannot run on the engine, model config or backend, instead of failing every example later."""
    methods = list(methods)
    if not methods or supports_steering(target):
        return
    backend = target if isinstance(target, str) else getattr(target, "backend", None) or target.info.backend
    fix = " in eager mode only: add model.enforce_eager=true" if backend == "vllm" else ": use model.backend=hf"
    raise ConfigError(
        f"method {', '.join(methods)} needs steered step-level decoding, which model.backend={backend} runs{fix}, "
        f"or keep only greedy (eval.methods=[greedy] eval.ablations=[])"
    )


__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "DecodeBatch",
    "Engine",
    "EngineInfo",
    "Sample",
    "SamplingSpec",
    "load_engine",
    "require_steering",
    "supports_steering",
]
