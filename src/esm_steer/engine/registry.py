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

from esm_steer.config import ConfigError
from esm_steer.registry import registrar

ENGINES: dict[str, type] = {}


# class decorator: register an engine class under its ``model.backend`` name
register_engine = registrar(ENGINES, "engine", "backend_name")


def engine_class(name: str) -> type:
    """The engine registered under ``name``; one line naming model.backend and the options if none."""
    if name not in ENGINES:
        raise ConfigError(f"model.backend={name!r} is not a registered engine: one of {', '.join(ENGINES)}")
    return ENGINES[name]
