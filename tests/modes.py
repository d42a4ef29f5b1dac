"""The seed reading's values (conf/mode/seed.yaml) for the unit tests of its mechanisms: the
schema's defaults are STIR mode, and these tests build configs from the dataclasses."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

import esm_steer

SEED_MODE = Path(esm_steer.__file__).parent / "conf" / "mode" / "seed.yaml"


def seed_mode(section: str) -> dict:
    """conf/mode/seed.yaml's values of one section (online, control_points, offline_memory, ...)."""
    return dict(OmegaConf.to_container(OmegaConf.load(SEED_MODE))[section])


def with_seed_mode(cfg):
    """A structured ESMConfig with conf/mode/seed.yaml merged in, as ``mode=seed`` composes it."""
    return OmegaConf.merge(cfg, OmegaConf.load(SEED_MODE))
