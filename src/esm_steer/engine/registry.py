"""The engine registry: each backend registers its class under its ``model.backend`` name, with
the capabilities that stages ask instead of comparing the name:

- ``steers(model_cfg)``: whether ``start`` gives a steerable DecodeBatch for that config (the
  online policy, its ablations and esm-case need one);
- ``steering_hint``: what to change when it does not, for the one-line refusal;
- ``prompts_per_call(model_cfg, n)``: how many prompts one ``generate`` call takes when each
  draws ``n`` samples;
- ``check_available()``: raise ImportError with the install command when the backend's package
  is missing.

An instance also says ``supports_steering`` and ``hidden_states_source()`` (where mining's
hidden states are computed).
"""

from __future__ import annotations

from collections.abc import Callable

from esm_steer.config import ConfigError

ENGINES: dict[str, type] = {}


def register_engine(name: str) -> Callable[[type], type]:
    """Class decorator: register an engine class under its ``model.backend`` name."""

    def register(cls: type) -> type:
        if ENGINES.get(name, cls) is not cls:
            raise ValueError(f"engine {name!r} is already registered ({ENGINES[name].__qualname__})")
        cls.backend_name = name
        ENGINES[name] = cls
        return cls

    return register


def engine_class(name: str) -> type:
    """The engine registered under ``name``; one line naming model.backend and the options if none."""
    if name not in ENGINES:
        raise ConfigError(f"model.backend={name!r} is not a registered engine: one of {', '.join(ENGINES)}")
    return ENGINES[name]
