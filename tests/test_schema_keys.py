"""No silently ignored key: every leaf of the schema (esm_steer.config.ESMConfig) is read
somewhere in src/ (outside config.py, whose checks do not count as use).

Grep-like: a key counts as read when its name occurs as an attribute (``cfg.online.L``,
``om.K``), a string key (``"num_threads"``, ``getattr(m, "cache_dir")``) or the end of a
dotted path (``"decode.top_p"``). A key name that is also an attribute of something else (as
``logprobs`` is of an engine Sample) passes by that alone, so such keys are checked by hand
when added. Keys that only Hydra reads, through a ``${...}`` interpolation in conf/, are in
READ_BY_INTERPOLATION with the reason; the test checks that each really is interpolated.
"""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

import esm_steer
from esm_steer.config import ESMConfig

SRC = Path(esm_steer.__file__).parent
CONF = SRC / "conf"

READ_BY_INTERPOLATION = {
    "outputs.run_name": "conf/config.yaml hydra.run.dir (and the esm_run_id resolver's argument)",
    **{
        f"launch.slurm.{k}": "conf/hydra/launcher/slurm.yaml passes it to the submitit launcher"
        for k in (
            "partition",
            "account",
            "qos",
            "timeout_min",
            "mem_gb",
            "cpus_per_task",
            "gpus_per_node",
            "array_parallelism",
        )
    },
}


def leaf_keys(cls=ESMConfig, prefix: str = "") -> list[str]:
    out: list[str] = []
    for f in fields(cls):
        sub = f.default_factory if f.default_factory is not None and is_dataclass(f.default_factory) else None
        out.extend(leaf_keys(sub, f"{prefix}{f.name}.") if sub is not None else [prefix + f.name])
    return out


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in SRC.rglob("*.py") if p.name != "config.py"}


def is_read(key: str, sources: dict[Path, str]) -> bool:
    name = re.escape(key.rsplit(".", 1)[-1])
    pat = re.compile(rf"\.{name}\b(?!\s*\()|[\"'.]{name}[\"']")
    return any(pat.search(text) for text in sources.values())


def _interpolated(key: str) -> bool:
    pat = re.compile(r"\$\{[^}]*\b" + re.escape(key) + r"\b")
    return any(pat.search(p.read_text()) for p in CONF.rglob("*.yaml"))


def test_every_schema_key_is_read_somewhere():
    sources = _sources()
    unread = [k for k in leaf_keys() if k not in READ_BY_INTERPOLATION and not is_read(k, sources)]
    assert not unread, f"schema keys nothing in src/ reads (use or remove them): {unread}"


@pytest.mark.parametrize("key", sorted(READ_BY_INTERPOLATION))
def test_allow_listed_keys_exist_and_are_interpolated(key):
    assert key in leaf_keys()
    assert _interpolated(key), f"{key}: no ${{{key}}} in conf/**/*.yaml; drop it from the allow-list"


def test_the_grep_sees_an_unread_key():
    fake = {Path("a.py"): "x = cfg.decode.top_p\nlog.info('online.k_scale')\n"}
    assert is_read("decode.top_p", fake) and is_read("online.k_scale", fake)
    assert not is_read("eval.max_error_rate", fake) and not is_read("decode.top", fake)


def test_removed_keys_are_gone():
    assert "decode.logprobs" not in leaf_keys()
    for p in CONF.rglob("*.yaml"):
        assert not re.search(r"^\s*logprobs\s*:", p.read_text(), re.M), p
