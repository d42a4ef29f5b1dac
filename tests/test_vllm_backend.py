"""vLLM backend. The output mapping is checked with stand-in vLLM objects everywhere; the
real engine tests run only where vLLM is installed (``make install-vllm``)."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import pytest

from esm_steer.engine.base import FINISH_LENGTH, FINISH_STOP, EngineInfo, SamplingSpec

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _engine(tokenizer):
    from esm_steer.engine.vllm_backend import VLLMEngine

    info = EngineInfo("tiny", 2, 64, 1, "float32", "vllm")
    return VLLMEngine(llm=None, tokenizer=tokenizer, info=info, seed=0, eos_token_ids={2})


def _completion(ids, reason, stop_reason=None, text="x"):
    lps = [{t: SimpleNamespace(logprob=-0.5 * (k + 1))} for k, t in enumerate(ids)]
    return SimpleNamespace(index=0, token_ids=ids, logprobs=lps, finish_reason=reason, stop_reason=stop_reason, text=text)


def test_missing_vllm_error_is_one_line():
    if HAS_VLLM:
        pytest.skip("vLLM is installed")
    from esm_steer.config import ModelConfig
    from esm_steer.engine import load_engine

    with pytest.raises(ImportError, match="make install-vllm"):
        load_engine(ModelConfig(backend="vllm"))


def test_eos_dropped_like_hf_backend(tokenizer):
    eng = _engine(tokenizer)
    s = eng._to_sample(_completion([5, 6, 2], "stop"), num_prompt_tokens=4)
    assert s.token_ids == [5, 6] and s.logprobs == [-0.5, -1.0] and s.finish_reason == FINISH_STOP
    assert s.num_prompt_tokens == 4


def test_stop_string_keeps_completing_token(tokenizer):
    eng = _engine(tokenizer)
    s = eng._to_sample(_completion([5, 2], "stop", stop_reason="\n\n"), num_prompt_tokens=1)
    assert s.token_ids == [5, 2]  # token 2 completed the stop string here, it is not EOS
    s = eng._to_sample(_completion([5, 6], "length"), num_prompt_tokens=1)
    assert s.finish_reason == FINISH_LENGTH and s.token_ids == [5, 6]


def test_hf_only_parts_raise(tokenizer):
    eng = _engine(tokenizer)
    with pytest.raises(NotImplementedError, match="HF backend"):
        eng.hidden_states([[1, 2]])
    with pytest.raises(NotImplementedError, match="HF backend"):
        eng.start([[1, 2]])


# ---------------------------------------------------------------- real vLLM (optional)


@pytest.fixture(scope="module")
def vllm_engine():
    pytest.importorskip("vllm")
    from esm_steer.config import ModelConfig
    from esm_steer.engine import load_engine

    cfg = ModelConfig(gguf_file="embedded", dtype="bfloat16", backend="vllm", enforce_eager=True, max_model_len=1024)
    eng = load_engine(cfg, seed=0)
    yield eng
    eng.close()


@pytest.mark.vllm
@pytest.mark.integration
def test_vllm_generate_and_prompt_logprobs(vllm_engine):
    prompt = vllm_engine.encode_chat("What is 2 + 3? Answer with just the number.")
    (greedy,) = vllm_engine.generate([prompt], SamplingSpec(max_new_tokens=16))[0]
    assert "5" in greedy.text and greedy.finish_reason == FINISH_STOP
    assert len(greedy.logprobs) == greedy.num_tokens and 2 not in greedy.token_ids
    samples = vllm_engine.generate([prompt] * 2, SamplingSpec(max_new_tokens=8, temperature=1.0, n=4))
    assert [len(s) for s in samples] == [4, 4]
    assert all(s.num_tokens <= 8 for r in samples for s in r)
    lp = vllm_engine.prompt_logprobs([prompt + greedy.token_ids])[0]
    assert len(lp) == len(prompt) + greedy.num_tokens - 1 and all(math.isfinite(x) and x <= 0 for x in lp)


@pytest.mark.vllm
@pytest.mark.integration
def test_vllm_matches_hf_prompt_logprobs(vllm_engine):
    from esm_steer.config import ModelConfig
    from esm_steer.engine import load_engine

    hf = load_engine(ModelConfig(gguf_file="embedded", dtype="float32", backend="hf", device="cpu"))
    seq = hf.encode_chat("Name three colours.")
    a, b = hf.prompt_logprobs([seq])[0], vllm_engine.prompt_logprobs([seq])[0]
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.3  # bf16 vs float32
