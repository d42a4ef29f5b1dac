"""Generation engines: the backend-independent interface, the HF backend, and vLLM (lazy).

``load_engine(cfg.model, seed)`` is what stages call; see :mod:`esm_steer.engine.base` for
the ``Engine`` and ``DecodeBatch`` protocols.
"""

from __future__ import annotations

import importlib.util

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


__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "DecodeBatch",
    "Engine",
    "EngineInfo",
    "Sample",
    "SamplingSpec",
    "load_engine",
]
