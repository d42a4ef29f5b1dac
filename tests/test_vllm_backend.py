"""vLLM backend. The output mapping is checked with stand-in vLLM objects everywhere; the
real engine tests run only where vLLM is installed (``make install-vllm``)."""

from __future__ import annotations

import importlib.util
import math
import os
from types import SimpleNamespace

import pytest
import torch

from esm_steer.engine import vllm_steer
from esm_steer.engine.base import FINISH_LENGTH, FINISH_STOP, EngineInfo, SamplingSpec

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def need_vllm() -> None:
    """Skip a real-vLLM test where vLLM is missing; fail under make test-vllm (ESM_REQUIRE_VLLM=1)."""
    if HAS_VLLM:
        return
    if os.environ.get("ESM_REQUIRE_VLLM") == "1":
        pytest.fail("ESM_REQUIRE_VLLM=1 but vLLM is not installed here: run it through make test-vllm")
    pytest.skip("needs vLLM (make test-vllm)")


def _engine(tokenizer):
    from esm_steer.engine.vllm_backend import VLLMEngine

    info = EngineInfo("tiny", 2, 64, 1, "float32", "vllm")
    return VLLMEngine(llm=None, tokenizer=tokenizer, info=info, seed=0, eos_token_ids={2})


def _completion(ids, reason, stop_reason=None, text="x"):
    lps = [{t: SimpleNamespace(logprob=-0.5 * (k + 1))} for k, t in enumerate(ids)]
    return SimpleNamespace(
        index=0, token_ids=ids, logprobs=lps, finish_reason=reason, stop_reason=stop_reason, text=text
    )


def test_missing_vllm_error_is_one_line():
    if HAS_VLLM:
        pytest.skip("vLLM is installed")
    from esm_steer.config import ModelConfig
    from esm_steer.engine import load_engine

    with pytest.raises(ImportError, match="make install-vllm"):
        load_engine(ModelConfig(backend="vllm"))


def test_eos_dropped_like_hf_backend(tokenizer):
    eng = _engine(tokenizer)
    s = eng.to_sample(_completion([5, 6, 2], "stop"), num_prompt_tokens=4)
    assert s.token_ids == [5, 6] and s.logprobs == [-0.5, -1.0] and s.finish_reason == FINISH_STOP
    assert s.num_prompt_tokens == 4


def test_stop_string_keeps_completing_token(tokenizer):
    eng = _engine(tokenizer)
    s = eng.to_sample(_completion([5, 2], "stop", stop_reason="\n\n"), num_prompt_tokens=1)
    assert s.token_ids == [5, 2]  # token 2 completed the stop string here, it is not EOS
    s = eng.to_sample(_completion([5, 6], "length"), num_prompt_tokens=1)
    assert s.finish_reason == FINISH_LENGTH and s.token_ids == [5, 6]


def test_vllm_batch_rows_keep_their_steering_ranges(tokenizer):
    """set_steer closes the open range at the first position not yet forwarded; forks copy it."""
    eng = _engine(tokenizer)
    eng.steer_installed = True  # no workers: only the Python side of the batch runs here
    batch = eng.start([[5, 6, 7], [8, 9]], segment_delimiter="\n", max_new_tokens=4)
    r0, r1 = batch.active_rows()
    v, w = torch.ones(64), torch.full((64,), 2.0)
    batch.set_steer(r0, v, 0.5)
    batch._rows[r0].tokens += [11, 12]  # as if two tokens were decoded
    (f,) = batch.fork(r0, 1)
    batch.set_steer(f, w, 3.0)
    batch.set_steer(r0, None)
    assert [(a, b, s) for a, b, _, s in batch.ranges(f)] == [(3, 4, 0.5), (5, vllm_steer.OPEN, 3.0)]
    assert [(a, b) for a, b, _, _ in batch.ranges(r0)] == [(3, 4)] and batch.ranges(r1) == []
    batch.set_steer(f, v, 1.0)  # again at the same position: replaces the range that starts there
    assert [s for *_, s in batch.ranges(f)] == [0.5, 1.0]
    extra = vllm_steer.steer_args(batch.ranges(f), 64)
    # a block under the first range only vs. one across both: keys differ, clipped to the block
    assert vllm_steer.block_keys(extra, 0, 4)[0][1:3] == (3, 3)
    assert [k[1:3] for k in vllm_steer.block_keys(extra, 4, 8)] == [(4, 4), (5, 7)]
    assert vllm_steer.block_keys({}, 0, 4) == [] and vllm_steer.block_keys(extra, 0, 3) == []
    with pytest.raises(ValueError, match="hidden size"):
        batch.set_steer(r1, torch.ones(3))


def test_hidden_states_from_lazy_hf_copy_equal_hf_engine(tmp_path, tokenizer, tiny_model, tiny_engine):
    from esm_steer.config import ModelConfig
    from esm_steer.engine.vllm_backend import VLLMEngine

    tiny_model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    cfg = ModelConfig(name_or_path=str(tmp_path / "tiny"), gguf_file=None, dtype="float32", device="cpu", steer_layer=1)
    eng = VLLMEngine(
        llm=None,
        tokenizer=tokenizer,
        info=EngineInfo("tiny", 2, 64, 1, "float32", "vllm"),
        eos_token_ids={2},
        model_cfg=cfg,
    )
    seqs = [[5, 6, 7, 8, 9], [10, 11], list(range(100, 140))]
    assert eng._hf is None  # nothing loaded until hidden states are asked for
    got, want = eng.hidden_states(seqs), tiny_engine.hidden_states(seqs)
    assert [g.shape for g in got] == [(5, 64), (2, 64), (40, 64)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert not torch.equal(eng.hidden_states(seqs, layer=0)[0], got[0])
    hf = eng._hf
    eng.close()
    assert eng._hf is None and hf.model is None


def test_capture_source_and_its_hf_fallbacks(tmp_path, tokenizer, tiny_model, tiny_engine):
    """model.vllm_hidden_states: auto is capture on an eager engine and hf on a compiled one;
    capture falls back to the HF copy for another layer or a sequence that fills max_model_len."""
    from esm_steer.config import ModelConfig
    from esm_steer.engine.vllm_backend import VLLMEngine

    tiny_model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")

    def engine(**kw):
        cfg = ModelConfig(
            name_or_path=str(tmp_path / "tiny"), gguf_file=None, dtype="float32", device="cpu", steer_layer=1, **kw
        )
        return VLLMEngine(_CountingLLM(), tokenizer, EngineInfo("tiny", 2, 64, 1, "float32", "vllm"), model_cfg=cfg)

    assert engine(enforce_eager=False).hidden_states_source() == "hf"
    with pytest.raises(ValueError, match="capture needs model.enforce_eager=true"):
        engine(enforce_eager=False, vllm_hidden_states="capture").hidden_states_source()
    eng = engine(enforce_eager=True, max_model_len=5)
    assert eng.hidden_states_source() == "capture"
    full, short = [[5, 6, 7, 8, 9]], [[5, 6, 7, 8]]
    torch.testing.assert_close(eng.hidden_states(full)[0], tiny_engine.hidden_states(full)[0])  # HF copy
    torch.testing.assert_close(eng.hidden_states(short, layer=0)[0], tiny_engine.hidden_states(short, layer=0)[0])
    assert eng.llm.calls == 0
    asked = []
    eng._captured_states = lambda seqs: asked.append(seqs) or ["captured"]
    assert eng.hidden_states(short) == ["captured"] and asked == [short]  # layer ℓ, room for one token


class _CountingLLM:
    """Stands for vllm.LLM: counts generate calls (none may happen before a refusal)."""

    def __init__(self):
        self.calls = 0

    def generate(self, *args, **kwargs):
        self.calls += 1
        raise AssertionError("generate called on an engine that should have refused")


def test_require_steering_is_one_line(tokenizer, tiny_engine):
    """Steered methods run on vLLM in eager mode only: a compiled engine or config refuses."""
    from esm_steer.config import ConfigError, ModelConfig
    from esm_steer.engine import require_steering, supports_steering

    eng = _engine(tokenizer)
    eng.supports_steering = False  # what from_config sets for enforce_eager=false
    for target in (eng, ModelConfig(backend="vllm", enforce_eager=False)):
        with pytest.raises(ConfigError) as e:
            require_steering(target, ["esm", "no_probing"])
        msg = str(e.value)
        assert "\n" not in msg and "esm, no_probing" in msg and "model.backend=vllm" in msg
        assert "model.enforce_eager=true" in msg
        require_steering(target, [])  # greedy alone runs on compiled vLLM
    require_steering(tiny_engine, ["esm"])
    require_steering(ModelConfig(backend="vllm", enforce_eager=True), ["esm"])
    assert supports_steering(tiny_engine) and supports_steering("hf") and supports_steering(_engine(tokenizer))


@pytest.mark.parametrize("stage", ["eval", "case"])
def test_eval_and_case_refuse_steered_methods_on_vllm_before_generating(tmp_path, tokenizer, stage):
    from hydra import compose, initialize_config_module

    import esm_steer.cli  # noqa: F401 - registers the schema and resolvers
    from esm_steer.config import ConfigError
    from esm_steer.evaluate import case as case_stage
    from esm_steer.evaluate import eval as eval_stage
    from esm_steer.runs import Run

    eng = _engine(tokenizer)
    eng.llm = _CountingLLM()
    eng.supports_steering = False  # compiled vLLM
    overrides = ["model.backend=vllm", "eval.methods=[greedy,esm]"]
    overrides += ["eval.example_ids=[0]"] if stage == "case" else []
    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        cfg = compose(config_name=stage, overrides=overrides)
    with pytest.raises(ConfigError, match="method esm needs steered"):
        (eval_stage if stage == "eval" else case_stage).run(cfg, Run(tmp_path / "run", cfg), engine=eng)
    assert eng.llm.calls == 0 and not list(tmp_path.rglob("per_example.jsonl"))


def test_cli_eval_on_compiled_vllm_refuses_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "esm-eval"
    args = ["experiment=debug", "model.backend=vllm", "model.enforce_eager=false", f"outputs.root_dir={tmp_path}/out"]
    r = subprocess.run(
        [str(exe), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "needs steered step-level decoding" in lines[0] and "model.backend=vllm" in lines[0]


def test_engine_start_refuses_what_the_hook_does_not_support():
    from esm_steer.engine.vllm_contract import check_before_start

    check_before_start("0.32.0", {})
    check_before_start("0.33.0", {"VLLM_USE_V2_MODEL_RUNNER": "0"})
    with pytest.raises(RuntimeError, match="vLLM 0.34.0 is outside .* install 'vllm>=0.32,<0.34'"):
        check_before_start("0.34.0", {})
    with pytest.raises(RuntimeError, match="selects Model Runner V2"):
        check_before_start("0.33.0", {"VLLM_USE_V2_MODEL_RUNNER": "1"})


def _runner_info(**info):
    return [{"runner": "x.CPUModelRunner", "problem": None, "hashing_patched": True, "pid": 1, **info}]


def test_engine_start_refuses_a_worker_runner_or_process_without_the_patch():
    from esm_steer.engine.vllm_contract import check_workers

    check_workers(_runner_info(), "0.32.0", eager=True)
    check_workers(_runner_info(hashing_patched=False), "0.32.0", eager=False)  # compiled: nothing steered
    with pytest.raises(RuntimeError, match="engine process 7 does not hash .* add esm_steer to it"):
        check_workers(_runner_info(hashing_patched=False, pid=7), "0.32.0", eager=True)
    with pytest.raises(RuntimeError, match="^runs V2$"):
        check_workers(_runner_info(problem="runs V2"), "0.33.0", eager=False)


def test_hf_copy_lowers_the_gpu_reservation_by_its_size(tmp_path, tiny_model):
    from esm_steer.engine.hf.engine import _TOKENS_PER_FORWARD
    from esm_steer.engine.vllm_memory import hf_copy_bytes, lowered_fraction

    tiny_model.save_pretrained(tmp_path / "tiny")
    params = sum(t.numel() for t in tiny_model.parameters())  # tied embeddings: stored once
    c = tiny_model.config
    act = _TOKENS_PER_FORWARD * (4 * c.hidden_size + 3 * c.intermediate_size)
    assert hf_copy_bytes(str(tmp_path / "tiny"), c, "bfloat16") == 2 * (params + act)
    assert hf_copy_bytes(str(tmp_path / "tiny"), c, "float32") == 4 * (params + act)
    gib = 2**30
    assert lowered_fraction(0.85, 8 * gib, 80 * gib) == 0.75  # a 4B model at bf16 on an 80 GB card
    with pytest.raises(RuntimeError, match="set model.enforce_eager=true"):
        lowered_fraction(0.85, 20 * gib, 24 * gib)


# ---------------------------------------------------------------- real vLLM (optional)


@pytest.fixture(scope="module")
def vllm_engine():
    need_vllm()
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
    hf_bf16 = load_engine(ModelConfig(gguf_file="embedded", dtype="bfloat16", backend="hf", device="cpu"))
    seq = hf.encode_chat("Name three colours.")
    ref, a, b = (torch.tensor(e.prompt_logprobs([seq])[0]) for e in (hf, hf_bf16, vllm_engine))
    # bf16 tolerance = how far HF's own bf16 run is from float32 (the far tail, log p < -15, moves ~0.5)
    assert (b - ref).abs().max() <= 2 * (a - ref).abs().max() + 0.05
    assert (b - ref).abs().mean() <= 2 * (a - ref).abs().mean() + 0.01


@pytest.mark.vllm
@pytest.mark.integration
@pytest.mark.parametrize("source", ["hf", "capture"])
def test_vllm_hidden_states_equal_hf_path(vllm_engine, monkeypatch, source):
    """Mining on vLLM: keys and vectors from the HF copy's teacher-forced pass (the HF path's
    values), or from the layer-ℓ hook (the HF path's values within bf16 noise), including a
    prompt that is in the prefix cache (every position must still be captured)."""
    from esm_steer.config import ModelConfig
    from esm_steer.engine import load_engine

    monkeypatch.setattr(vllm_engine.model_cfg, "vllm_hidden_states", source)
    assert vllm_engine.hidden_states_source() == source
    prompt = vllm_engine.encode_chat("What is 4 + 4? Answer with just the number.")
    (rollout,) = vllm_engine.generate([prompt], SamplingSpec(max_new_tokens=12, temperature=1.0))[0]
    seqs = [prompt + rollout.token_ids, prompt, []]
    got = vllm_engine.hidden_states(seqs)
    hf_bf16 = load_engine(ModelConfig(gguf_file="embedded", dtype="bfloat16", backend="hf", device="cpu"))
    hf_f32 = load_engine(ModelConfig(gguf_file="embedded", dtype="float32", backend="hf", device="cpu"))
    assert hf_bf16.steer_layer == vllm_engine.info.steer_layer
    assert got[2].shape == (0, vllm_engine.info.hidden_size)
    for g, same, f32, s in zip(got[:2], hf_bf16.hidden_states(seqs[:2]), hf_f32.hidden_states(seqs[:2]), seqs):
        assert g.shape == (len(s), vllm_engine.info.hidden_size) and g.dtype == torch.float32
        rel = (g - f32).norm(dim=-1) / f32.norm(dim=-1)
        assert float(rel.max()) < 0.15 and float(rel.mean()) < 0.03  # bf16 rounding over ℓ layers vs float32
        if source == "hf":
            torch.testing.assert_close(g, same)  # the same dtype and code: the HF path's values
        else:  # vLLM's bf16 kernels: as far from float32 as HF's own bf16 run, within 2x
            own = (same - f32).norm(dim=-1) / f32.norm(dim=-1)
            assert float(rel.mean()) <= 2 * float(own.mean()) + 0.005
