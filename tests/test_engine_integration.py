"""The real embedded model (SmolLM2-135M-Instruct GGUF, via its cached safetensors
conversion) through ``load_engine``, bfloat16 on CPU."""

from __future__ import annotations

import re

import pytest

from esm_steer.config import ModelConfig
from esm_steer.engine import FINISH_STOP, SamplingSpec, load_engine

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine():
    cfg = ModelConfig(gguf_file="embedded", dtype="bfloat16", backend="hf", device="cpu", num_threads=1)
    eng = load_engine(cfg, seed=0)
    yield eng
    eng.close()


def test_embedded_model_answers_arithmetic(engine):
    assert engine.info.num_layers == 30 and engine.info.hidden_size == 576
    assert engine.info.steer_layer == 15 and engine.info.dtype == "bfloat16"
    assert engine.info.model_id.endswith(".gguf")
    prompt = engine.encode_chat("What is 2 + 3? Answer with just the number.")
    (sample,) = engine.generate([prompt], SamplingSpec(max_new_tokens=16))[0]
    assert sample.finish_reason == FINISH_STOP  # <|im_end|>
    # greedy answers "2 + 3 = 5": right, if not "just the number"
    assert re.findall(r"-?\d+", sample.text)[-1] == "5", sample.text


def test_embedded_model_hidden_states_match_decoding(engine):
    prompt = engine.encode_chat("Name a colour.")
    batch = engine.start([prompt])
    row = batch.active_rows()[0]
    batch.step()
    h_dec = batch.last_hidden(row)
    (h_tf,) = engine.hidden_states([prompt + batch.tokens(row)])
    # bf16: the cached and the full forward round differently
    rel = (h_dec - h_tf[-1]).norm() / h_tf[-1].norm()
    assert rel < 0.02, rel
