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

VLLM_MISSING = "model.backend=vllm needs vLLM: make install-vllm (CPU) or pip install vllm (GPU)"


def load_engine(model_cfg, seed: int = 0) -> Engine:
    """The engine named by ``model_cfg.backend`` (a ModelConfig or a DictConfig with its fields)."""
    backend = str(getattr(model_cfg, "backend", "hf") or "hf")
    if backend == "hf":
        from esm_steer.engine.hf import HFEngine

        return HFEngine.from_config(model_cfg, seed=seed)
    if backend == "vllm":
        # find_spec, not import: vLLM reads its environment at import (set by from_config)
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(VLLM_MISSING)
        from esm_steer.engine.vllm_backend import VLLMEngine

        return VLLMEngine.from_config(model_cfg, seed=seed)
    raise ValueError(f"model.backend={backend} must be hf or vllm")


def supports_steering(engine_or_backend) -> bool:
    """Whether an engine (or a ``model.backend`` name) runs steered step-level decoding
    (``engine.start``: the online ESM policy and its ablations)."""
    if isinstance(engine_or_backend, str):
        if engine_or_backend == "vllm":
            from esm_steer.engine.vllm_backend import VLLMEngine  # vllm itself is not imported

            return VLLMEngine.supports_steering
        return True
    return bool(getattr(engine_or_backend, "supports_steering", True))


def require_steering(engine_or_backend, methods: Sequence[str]) -> None:
    """Refuse at start, with one line, when `methods` (those that need steered decoding)
    cannot run on the engine or backend, instead of failing every example later."""
    methods = list(methods)
    if not methods or supports_steering(engine_or_backend):
        return
    backend = engine_or_backend if isinstance(engine_or_backend, str) else engine_or_backend.info.backend
    raise ConfigError(
        f"method {', '.join(methods)} needs steered step-level decoding, which model.backend={backend} "
        f"does not run yet: use model.backend=hf, or keep only greedy (eval.methods=[greedy] eval.ablations=[])"
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
