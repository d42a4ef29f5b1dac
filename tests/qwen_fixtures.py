"""Where the Qwen fixtures (``make fixtures``: scripts/build_fixtures.py) and the shared benchmark
data live. A test that needs one and does not find it fails with one line naming the fix: the
Qwen tests never skip (CI builds the fixtures before the tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("ESM_FIXTURES", ROOT / ".cache" / "fixtures"))
QWEN3 = "qwen3-tiny"  # Qwen3ForCausalLM, real Qwen3 tokenizer and ChatML template
R1 = "qwen2-r1-tiny"  # Qwen2ForCausalLM, R1-distill-like tokenizer and <think> template
# the shared data folder beside the clone (CI: ../shared), or ESM_SHARED_DATA
DATA_CANDIDATES = [os.environ.get("ESM_SHARED_DATA"), ROOT.parent / "shared" / "data", "/work/shared/data"]


def fixture_dir(name: str) -> Path:
    d = FIXTURES / name
    if not (d / "fixture.json").is_file():
        pytest.fail(f"Qwen fixture {d} is missing: run `make fixtures`", pytrace=False)
    return d


def shared_data() -> Path:
    for c in DATA_CANDIDATES:
        if c and (Path(c) / "gsm8k" / "train.jsonl").is_file() and (Path(c) / "math500" / "test.jsonl").is_file():
            return Path(c)
    pytest.fail(
        "no shared benchmark data (gsm8k/, math500/) at ../shared/data: set ESM_SHARED_DATA=<dir>", pytrace=False
    )


def hf_engine(name: str, steer_layer: int = 2, batch_size: int = 16):
    """The seed's model config pointed at a tiny fixture, float32 on CPU (the HF backend)."""
    from esm_steer.config import ModelConfig
    from esm_steer.engine import load_engine

    cfg = ModelConfig(
        name_or_path=str(fixture_dir(name)),
        gguf_file=None,
        dtype="float32",
        backend="hf",
        device="cpu",
        steer_layer=steer_layer,
        batch_size=batch_size,
    )
    return load_engine(cfg)
