"""Generation engines: the backend-independent interface, the HF backend, and vLLM (lazy).

``load_engine(cfg.model, seed)`` is what stages call; see :mod:`esm_steer.engine.base` for
the ``Engine`` and ``DecodeBatch`` protocols, and :mod:`esm_steer.engine.registry` for how a
backend registers under its ``model.backend`` name with its capabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

from esm_steer.config import ConfigError
from esm_steer.engine import vllm_backend  # noqa: F401 - registers "vllm"; imports vllm only when it builds one
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
from esm_steer.engine.registry import ENGINES, engine_class


def load_engine(model_cfg, seed: int = 0) -> Engine:
    """The engine named by ``model_cfg.backend`` (a ModelConfig or a DictConfig with its fields)."""
    cls = engine_class(str(getattr(model_cfg, "backend", None) or HFEngine.backend_name))
    cls.check_available()
    return cls.from_config(model_cfg, seed=seed)


def supports_steering(target) -> bool:
    """Whether an engine, a model config or a ``model.backend`` name runs steered step-level
    decoding (``engine.start``: the online ESM policy and its ablations). vLLM does in eager
    mode only (``model.enforce_eager=true``): compiled vLLM ignores the steering hook."""
    if isinstance(target, str):
        return engine_class(target).steers(None)
    if hasattr(target, "backend"):  # a model config
        return engine_class(str(target.backend)).steers(target)
    return bool(target.supports_steering)


def require_steering(target, methods: Sequence[str]) -> None:
    """Refuse at start, with one line, when `methods` (those that need steered decoding)
    cannot run on the engine, model config or backend, instead of failing every example later."""
    methods = list(methods)
    if not methods or supports_steering(target):
        return
    backend = target if isinstance(target, str) else getattr(target, "backend", None) or target.info.backend
    fix = getattr(ENGINES.get(str(backend)), "steering_hint", "") or f": use model.backend={HFEngine.backend_name}"
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
