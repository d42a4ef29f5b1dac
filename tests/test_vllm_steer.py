"""Per-request steering in vLLM (engine/vllm_steer.py): the hook's token -> (request, position)
mapping and its capture on stand-in runner objects everywhere; against the HF engine's steered
decode on the real embedded model where vLLM is installed (``make test-vllm``)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from esm_steer.engine import vllm_contract, vllm_steer
from esm_steer.engine.base import SamplingSpec
from test_vllm_backend import need_vllm


def _runner(req_ranges: dict, req_ids: list[str], counts: list[int], positions: list[int], capture=None):
    qsl = [0]
    for c in counts:
        qsl.append(qsl[-1] + c)

    def params(rid, rs):
        extra = {vllm_steer.STEER_KEY: rs} if rs else {}
        if capture and rid in capture:
            extra[vllm_steer.CAPTURE_KEY] = capture[rid]
        return SimpleNamespace(extra_args=extra or None)

    requests = {r: SimpleNamespace(sampling_params=params(r, rs)) for r, rs in req_ranges.items()}
    return SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=req_ids),
        requests=requests,
        query_start_loc=SimpleNamespace(cpu=torch.tensor(qsl)),
        positions=torch.tensor(positions),
    )


def test_hook_adds_each_tokens_range_vector_for_its_request():
    v1, v2, v3 = ([float(k)] * 4 for k in (1, 5, 50))
    # request a: prefill chunk of positions 3..6, ranges [4, 5] -> v1 and [6, 9] -> 2·v2; b: decode at 9,
    # unsteered; c: decode at 2 with a range that starts later
    runner = _runner(
        {"a": [(4, 5, v1, 1.0), (6, 9, v2, 2.0)], "b": [], "c": [(3, 8, v3, 2.0)]},
        ["a", "b", "c"],
        [4, 1, 1],
        [3, 4, 5, 6, 9, 2, 0, 0],
    )  # (two padded tokens at the end)
    hook = vllm_steer._SteerHook(runner)
    hidden, residual = torch.zeros(8, 4), torch.ones(8, 4)
    out, res = hook(None, (), (hidden, residual))
    assert res is residual
    assert out[:, 0].tolist() == [0, 1, 1, 10, 0, 0, 0, 0]
    runner.input_batch.req_ids, runner.query_start_loc.cpu = ["c"], torch.tensor([0, 1])
    runner.positions = torch.tensor([3])
    out, _ = hook(None, (), (torch.zeros(1, 4), torch.zeros(1, 4)))
    assert out[0].tolist() == [100.0] * 4


def test_hook_leaves_unsteered_steps_untouched():
    runner = _runner({"a": [], "b": []}, ["a", "b"], [2, 1], [0, 1, 7])
    assert vllm_steer._SteerHook(runner)(None, (), (torch.zeros(3, 4), torch.zeros(3, 4))) is None
    runner = _runner({}, [], [], [0])  # profile / dummy run: no requests
    assert vllm_steer._SteerHook(runner)(None, (), (torch.zeros(1, 4), torch.zeros(1, 4))) is None


def test_hook_captures_the_pre_steering_stream_at_the_asked_positions():
    runner = _runner({"a": [(0, 9, [1.0] * 4, 1.0)], "b": []}, ["a", "b"], [3, 2], [4, 5, 6, 0, 1], {"a": ["ta", 5, 5]})
    runner.requests["b"].sampling_params.extra_args = {vllm_steer.CAPTURE_KEY: ["tb", 0, 2]}
    hook = vllm_steer._SteerHook(runner)
    hidden, residual = torch.arange(20.0).reshape(5, 4), torch.ones(5, 4)
    out, _ = hook(None, (), (hidden, residual))
    # hidden + residual (the stream) before the vector is added; b is unsteered and still captured
    got = hook.pop()
    assert torch.equal(vllm_steer.captured_span(got, "ta", 5, 5), hidden[1:2] + 1)
    assert torch.equal(out[:3], hidden[:3] + 1) and torch.equal(out[3:], hidden[3:])
    # b's prompt arrives in two chunks (positions 0-1, then 2): the span joins them in order
    with pytest.raises(RuntimeError, match="missed position 2 of request tb"):
        vllm_steer.captured_span(got, "tb", 0, 2)
    runner.input_batch.req_ids, runner.query_start_loc.cpu = ["b"], torch.tensor([0, 1])
    runner.positions = torch.tensor([2])
    hook(None, (), (torch.full((1, 4), 7.0), torch.zeros(1, 4)))
    parts = hook.pop()["tb"]
    joined = {"tb": (torch.cat([got["tb"][0], parts[0]]), torch.cat([got["tb"][1], parts[1]]))}
    span = vllm_steer.captured_span(joined, "tb", 0, 2)
    assert torch.equal(span, torch.stack([hidden[3] + 1, hidden[4] + 1, torch.full((4,), 7.0)]))
    assert hook.pop() == {}  # popped states are forgotten
    with pytest.raises(RuntimeError, match="captured no state for request tc"):
        vllm_steer.captured_span(joined, "tc", 0, 0)


def test_hook_meeting_a_runner_without_an_attribute_it_reads_stops_in_one_line():
    """Model Runner V2 (vLLM 0.32/0.33 on CUDA, 0.34) keeps no per-step batch on the runner: the
    first call must say so, not steer nothing or fail deep in a forward."""
    for attr in ("positions", "query_start_loc", "input_batch", "requests"):
        runner = _runner({"a": [(0, 9, [1.0] * 4, 1.0)]}, ["a"], [2], [0, 1])
        delattr(runner, attr)
        with pytest.raises(RuntimeError, match=rf"has no {attr}\b.*VLLM_USE_V2_MODEL_RUNNER=0") as e:
            vllm_steer._SteerHook(runner)(None, (), (torch.zeros(2, 4), torch.zeros(2, 4)))
        assert "\n" not in str(e.value)
    runner = _runner({"a": [(0, 9, [1.0] * 4, 1.0)]}, ["a"], [2], [0, 1])
    del runner.requests["a"].sampling_params
    with pytest.raises(RuntimeError, match="request state .* has no sampling_params"):
        vllm_steer._SteerHook(runner)(None, (), (torch.zeros(2, 4), torch.zeros(2, 4)))


def test_runner_and_version_checks_name_what_to_do():
    class GPUModelRunner:  # V2's class name, in another module
        pass

    msg = vllm_contract.runner_problem(GPUModelRunner(), "0.33.0")
    assert "vLLM 0.33.0 runs" in msg and "not the V1 model runner" in msg and vllm_contract.FIX in msg
    assert vllm_contract.version_problem("0.34.0") == (
        "vLLM 0.34.0 is outside the range esm-steer's steering hook supports: install 'vllm>=0.32,<0.34'"
    )
    assert vllm_contract.version_problem("0.31.9") is not None
    assert all(vllm_contract.version_problem(v) is None for v in ("0.32.0", "0.33.1.dev4+g1234", "0.32.0+cpu"))
    assert "selects Model Runner V2" in vllm_contract.env_problem({"VLLM_USE_V2_MODEL_RUNNER": "1"})
    assert (
        vllm_contract.env_problem({"VLLM_USE_V2_MODEL_RUNNER": "0"}) is None and vllm_contract.env_problem({}) is None
    )


def test_captured_states_cross_processes_as_bytes_with_dtype_and_shape():
    for t in (torch.randn(3, 5), torch.arange(7), torch.randn(2, 4).bfloat16(), torch.zeros(0, 6)):
        w = vllm_steer.to_wire(t)
        assert isinstance(w[2], bytes) and w[0] == str(t.dtype).removeprefix("torch.")
        back = vllm_steer.from_wire(w)
        assert back.dtype == t.dtype and torch.equal(back, t)
    with pytest.raises(TypeError, match="arrived as list, not bytes"):
        vllm_steer.from_wire(["float32", [2], [1.0, 2.0]])  # what msgpack makes of a raw tensor


def test_block_keys_separate_steering_and_share_equal_prefixes():
    def keys(ranges, start, end):
        return vllm_steer.block_keys(vllm_steer.steer_args(ranges, 2), start, end)

    v = [1.0, 2.0]
    a, b = [(5, 9, v, 1.0)], [(5, 9, v, 1.5)]
    assert keys(a, 0, 5) == [] and keys([], 0, 16) == []  # unsteered blocks hash as in plain vLLM
    assert keys(a, 0, 8) == keys([(5, vllm_steer.OPEN, v, 1.0)], 0, 8)  # an open range = a closed one, clipped
    assert keys(a, 0, 8) != keys(b, 0, 8) and keys(a, 0, 8) != keys([(5, 9, [1.0, 2.5], 1.0)], 0, 8)
    assert keys(a, 8, 16) != keys([(5, 8, v, 1.0)], 8, 16)


# ---------------------------------------------------------------- real vLLM


@pytest.fixture(scope="module")
def engines():
    need_vllm()
    from esm_steer.config import ModelConfig
    from esm_steer.engine import load_engine
    from esm_steer.engine.vllm_backend import VLLMEngine

    hf = load_engine(ModelConfig(gguf_file="embedded", dtype="float32", backend="hf", device="cpu"))
    # KV blocks of 32 tokens (CPU default 128), so that short rollouts fill cached blocks
    v = VLLMEngine.from_config(
        ModelConfig(gguf_file="embedded", dtype="float32", backend="vllm", enforce_eager=True, max_model_len=512),
        block_size=32,
    )
    yield hf, v
    v.close()


def _vectors(hf, prompt, k: int):
    scale = float(hf.hidden_states([prompt])[0][-1].norm()) * 0.5  # large enough to change the greedy tokens
    g = torch.Generator().manual_seed(0)
    return [(lambda x: x / x.norm() * scale)(torch.randn(hf.hidden_size, generator=g)) for _ in range(k)]


def _hf_steered(hf, prompt, switch_at: int, v1, v2, n: int) -> list[int]:
    """HF decode: v1 from the first generated position for `switch_at` tokens, then v2."""
    b = hf.start([prompt], max_new_tokens=n)
    (r,) = b.active_rows()
    b.set_steer(r, v1)
    for _ in range(switch_at):
        b.step()
    b.set_steer(r, v2)
    while b.active_rows():
        b.step()
    return list(b.tokens(r))


@pytest.mark.vllm
@pytest.mark.integration
def test_vllm_steered_equals_hf_steered_decode_with_and_without_prefix_cache(engines):
    assert_steered_equals_hf(*engines)


def assert_steered_equals_hf(hf, v):
    """vLLM's steered decode (two ranges, mixed with an unsteered request, prefix-cache hit and
    miss) gives the HF engine's steered tokens (also run at TP=2, tests/test_vllm_tp.py)."""
    spec = SamplingSpec(max_new_tokens=20)
    prompts = [hf.encode_chat("Name three colours."), hf.encode_chat("What is 7 + 5? Think step by step.")]
    v1, v2 = _vectors(hf, prompts[0], 2)
    ref = [_hf_steered(hf, p, 6, v1, v2, spec.max_new_tokens) for p in prompts]
    plain = [s[0].token_ids for s in hf.generate(prompts, spec)]
    assert ref != plain  # the steering changes the tokens, so equality below means something
    ranges = [[(len(p), len(p) + 5, v1, 1.0), (len(p) + 6, 10**9, v2, 1.0)] for p in prompts]
    # one steered and one unsteered request in the same batch; the prompts are in the prefix cache
    v.generate(prompts, spec)
    mixed = vllm_steer.steered_generate(v, prompts, [ranges[0], []], spec)
    assert mixed[0][0].token_ids == ref[0] and mixed[1][0].token_ids == plain[1]
    hit = vllm_steer.steered_generate(v, prompts, ranges, spec)  # prefix-cache hits
    v.llm.reset_prefix_cache()
    miss = vllm_steer.steered_generate(v, prompts, ranges, spec)  # recomputed from the ranges
    assert [s[0].token_ids for s in hit] == ref and [s[0].token_ids for s in miss] == ref


@pytest.mark.vllm
@pytest.mark.integration
def test_vllm_engine_process_hashes_blocks_with_the_steering_keys(engines):
    """With VLLM_ENABLE_V1_MULTIPROCESSING=1 the worker (and the scheduler) run in EngineCore's
    process, which only the vllm.general_plugins entry point reaches."""
    _, v = engines
    (info,) = v.llm.collective_rpc("esm_runner_info")
    separate = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1"
    assert (info["pid"] != os.getpid()) == separate
    assert info["hashing_patched"] and info["problem"] is None and "CPUModelRunner" in info["runner"]


@pytest.mark.vllm
@pytest.mark.integration
def test_vllm_never_reuses_kv_computed_under_other_steering(engines):
    """A request continuing a steered rollout states its past ranges; an unsteered request on
    the same tokens must not hit the steered KV that the rollout left in the prefix cache."""
    hf, v = engines
    prompt = hf.encode_chat("Name three colours.")
    (v1,) = _vectors(hf, prompt, 1)
    P = len(prompt)
    first = vllm_steer.steered_generate(v, [prompt], [[(P, 10**9, v1, 1.0)]], SamplingSpec(max_new_tokens=48))[0][0]
    head = prompt + first.token_ids[: 64 - P + 8]  # KV blocks 0..31 and 32..63 full, the second one steered
    assert P < 32 + 8 and first.num_tokens >= len(head) - P + 8, "the steered rollout stopped too early"
    n = len(head) - P
    spec = SamplingSpec(max_new_tokens=8)
    cont = vllm_steer.steered_generate(v, [head], [[(P, 10**9, v1, 1.0)]], spec)[0][0].token_ids  # hits both blocks
    assert cont == first.token_ids[n : n + 8]
    unsteered, want = v.generate([head], spec)[0][0], hf.generate([head], spec)[0][0]
    assert unsteered.token_ids == want.token_ids and unsteered.token_ids != cont
    # stale steered KV would move these by far more than float32 kernel noise
    assert max(abs(a - b) for a, b in zip(unsteered.logprobs, want.logprobs)) < 1e-3


def assert_steered_prefill_kv_not_reused_unsteered(hf, v):
    """A range that covers prompt positions steers the prefill: the blocks it leaves in the prefix
    cache must not serve an unsteered request on the same tokens (any model: no rollout length
    needed; tests/test_vllm_tp.py)."""
    prompt = hf.encode_chat(" ".join(["Name three colours and three animals."] * 10))
    assert len(prompt) >= 72, "the prompt must fill two KV blocks of 32 tokens"
    (v1,) = _vectors(hf, prompt, 1)
    spec = SamplingSpec(max_new_tokens=8)
    ranges = [[(8, 10**9, v1, 1.0)]]
    steered = vllm_steer.steered_generate(v, [prompt], ranges, spec)[0][0]
    assert vllm_steer.steered_generate(v, [prompt], ranges, spec)[0][0].token_ids == steered.token_ids  # a hit
    unsteered, want = v.generate([prompt], spec)[0][0], hf.generate([prompt], spec)[0][0]
    assert unsteered.token_ids == want.token_ids
    # the steering moves the logprobs far (a tiny model may keep its tokens); stale KV would move these
    assert max(abs(a - b) for a, b in zip(unsteered.logprobs, steered.logprobs)) > 0.1
    assert max(abs(a - b) for a, b in zip(unsteered.logprobs, want.logprobs)) < 1e-3
