"""The online policy on vLLM against the HF path (docs/method.md, "Online"): at float32 on the
embedded model, on the debug preset's eval questions, greedy / esm / no_memory / no_probing /
static keep the same tokens and choose the same tool at every step; a prefix-cache miss
(the cache evicted before every request) changes nothing.

The library and memory are built here from the model's own states (3 tools, 2 entries each,
vectors ~0.3 of ‖h_ℓ‖ so that they change tokens), not mined: the parity under test is the
decode path's, and mining on vLLM has its own test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from esm_steer import runtime
from esm_steer.config import ControlPointsConfig, ModelConfig, OnlineConfig
from esm_steer.engine.base import SamplingSpec
from esm_steer.esm.library import Library, Tool
from esm_steer.esm.memory_index import Memory, build_memory, l2_normalise
from esm_steer.esm.online import OnlinePolicy
from modes import seed_mode
from test_vllm_backend import need_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.integration]
N_QUESTIONS = 16
T_MAX = 40
MAX_DIFFERING = 1  # of 16: float noise may flip a near-tie; the test names the example
# the debug preset's control points, from m = 0 as the seed reading steers
CP = ControlPointsConfig(segment_delimiter="\n", M=3, **seed_mode("control_points"))


@pytest.fixture(scope="module")
def setup():
    need_vllm()
    import esm_steer.cli  # noqa: F401 - registers the schema and resolvers
    from esm_steer.engine import load_engine

    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["experiment=debug", "model.dtype=float32"])
    hf = load_engine(ModelConfig(gguf_file="embedded", dtype="float32", backend="hf", device="cpu", batch_size=16))
    v = load_engine(
        ModelConfig(gguf_file="embedded", dtype="float32", backend="vllm", enforce_eager=True, max_model_len=1024)
    )
    examples = runtime.load_examples(cfg, runtime.eval_split(cfg), N_QUESTIONS)
    prompts = runtime.prompt_ids(hf, cfg, examples)
    greedy = [s[0].token_ids for s in hf.generate(prompts, SamplingSpec(max_new_tokens=T_MAX))]
    yield hf, v, prompts, _artifacts(hf, prompts), greedy
    v.close()


def _artifacts(hf, prompts):
    g = torch.Generator().manual_seed(0)
    last = torch.stack([h[-1] for h in hf.hidden_states(prompts[:3])])
    scale = float(last.norm(dim=-1).mean())
    d = last.shape[1]
    tools, keys, entries = [], [], []
    for i, q in enumerate([0.5, 0.3, 0.8]):
        vec = torch.randn(d, generator=g)
        noise = 0.05 * scale / d**0.5
        states = torch.stack([last[(i + j) % 3] + noise * torch.randn(d, generator=g) for j in range(2)])
        tools.append(Tool(f"t{i}", f"q{i}", 0, q, 0.3 * scale * vec / vec.norm(), states.mean(0), states))
        for s in states:
            entries.append({"entry_id": len(entries), "tool_id": f"t{i}", "question_id": f"q{i}", "m": 0, "Q": q})
            keys.append(s.numpy())
    return Library(tools, {"hidden_size": d}), Memory(l2_normalise(np.stack(keys)), entries, {"normalised": True})


def test_captured_hidden_states_equal_hf_at_float32(setup):
    """Mining's states from the vLLM hook (model.vllm_hidden_states=auto on an eager engine)
    equal the HF path's teacher-forced states at float32, prompts + greedy answers, every position."""
    hf, v, prompts, _, greedy = setup
    assert v.hidden_states_source() == "capture"
    seqs = [p + g for p, g in zip(prompts[:4], greedy[:4])]
    for got, want in zip(v.hidden_states(seqs), hf.hidden_states(seqs)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    assert v._hf is None  # no HF copy was loaded


def _online(variant: str) -> OnlineConfig:
    return OnlineConfig(
        **seed_mode("online")
        | dict(variant=variant, k_retrieve=4, L=2, probe_tokens=4, beta=1.0, rho=1.0, tau_null=0.0, min_sim=-1.0)
    )


def _run(engine, artifacts, prompts, variant):
    library, memory = artifacts
    return OnlinePolicy(engine, library, memory, _online(variant), CP).run(prompts, T_MAX)


def _assert_same(name, hf_results, v_results):
    differ = [
        i
        for i, (a, b) in enumerate(zip(hf_results, v_results))
        if a.token_ids != b.token_ids or [s["chosen"] for s in a.steps] != [s["chosen"] for s in b.steps]
    ]
    assert len(differ) <= MAX_DIFFERING, f"{name}: examples {differ} differ between HF and vLLM"
    if differ:
        print(f"{name}: example {differ[0]} differs between HF and vLLM (float noise, within the bound)")
    return differ


def test_greedy_same_tokens(setup):
    _, v, prompts, _, greedy = setup
    b = [s[0].token_ids for s in v.generate(prompts, SamplingSpec(max_new_tokens=T_MAX))]
    differ = [i for i, (x, y) in enumerate(zip(greedy, b)) if x != y]
    assert len(differ) <= MAX_DIFFERING, f"greedy: examples {differ} differ"


@pytest.mark.parametrize("variant", ["esm", "no_memory", "no_probing", "static"])
def test_online_policy_same_tokens_and_choices(setup, variant):
    hf, v, prompts, artifacts, greedy = setup
    a = _run(hf, artifacts, prompts, variant)
    b = _run(v, artifacts, prompts, variant)
    steps = [s for r in a for s in r.steps]
    # the tools act (tokens differ from greedy's), so equality means something
    assert any(s["chosen"] is not None for s in steps) and [r.token_ids for r in a] != greedy
    if variant == "esm":
        assert any(s["chosen"] is None for s in steps) or len({s["chosen"] for s in steps}) > 1
    _assert_same(variant, a, b)
    for x, y in zip(a, b):
        assert y.tokens_used == len(y.token_ids) <= T_MAX and y.budget_used == y.tokens_used + y.probe_tokens_used
        if x.token_ids == y.token_ids:
            assert x.probe_tokens_used == y.probe_tokens_used and len(x.steps) == len(y.steps)
            for s, t in zip(x.steps, y.steps):
                assert s["offset"] == t["offset"] and s["h_norm"] == pytest.approx(t["h_norm"], rel=1e-4)


def test_prefix_cache_miss_keeps_the_tokens(setup, monkeypatch):
    """Every request of the vLLM batch after an evicted cache: the ranges recompute the same KV."""
    from esm_steer.engine.vllm_batch import VLLMDecodeBatch

    _, v, prompts, artifacts, _ = setup
    hit = _run(v, artifacts, prompts[:6], "esm")
    orig = VLLMDecodeBatch._generate

    def evicting(self, pairs):
        assert self.engine.llm.reset_prefix_cache()
        return orig(self, pairs)

    monkeypatch.setattr(VLLMDecodeBatch, "_generate", evicting)
    miss = _run(v, artifacts, prompts[:6], "esm")
    assert [r.token_ids for r in miss] == [r.token_ids for r in hit]
    assert [[s["chosen"] for s in r.steps] for r in miss] == [[s["chosen"] for s in r.steps] for r in hit]


# ---------------------------------------------------------------- STIR mode (impulse injection)


def _stir_artifacts(hf, prompts):
    """Tools at m = 0, 1, 2 (2 P + 2 N states each), STIR's memory: contrast entries + anchors."""
    g = torch.Generator().manual_seed(1)
    last = torch.stack([h[-1] for h in hf.hidden_states(prompts[:3])])
    scale = float(last.norm(dim=-1).mean())
    d = last.shape[1]
    tools = []
    for i, q in enumerate([0.5, 0.3, 0.8, 0.6]):
        noise = 0.05 * scale / d**0.5
        states = torch.stack([last[(i + j) % 3] + noise * torch.randn(d, generator=g) for j in range(4)])
        vec = torch.randn(d, generator=g)
        tools.append(
            Tool(f"t{i}", f"q{i}", i % 3, q, 0.6 * scale * vec / vec.norm(), states.mean(0), states, {"n_pos": 2})
        )
    library = Library(tools, {"hidden_size": d})
    return library, build_memory(library, center_keys=False, entries_of="contrast", null_anchors=True)


@pytest.mark.parametrize(
    "variant,first_m,null_score,k_scale",
    # at m >= 1 this test's anchors (prompt states, like its tools' keys) beat every tool, so null
    # scores 0 there, and one impulse mid-answer needs more strength to move a token
    [
        ("esm", 0, "anchors", 2.0),
        ("esm", 1, "zero", 8.0),
        ("no_probing", 0, "anchors", 2.0),
        ("static", 0, "anchors", 2.0),
    ],
)
def test_impulse_same_tokens_and_choices(setup, variant, first_m, null_score, k_scale):
    """online.inject=impulse (with STIR's retrieval and null score) keeps HF's tokens and choices:
    the impulse is a re-forward of the control point on HF and a one-position range on vLLM."""
    hf, v, prompts, _, greedy = setup
    library, memory = _stir_artifacts(hf, prompts)
    on = OnlineConfig(
        variant=variant,
        k_retrieve=6,
        L=2,
        probe_tokens=4,
        beta=2.0,
        rho=0.1,
        k_scale=k_scale,
        probe_scale=1.0,
        min_sim=-1.0,
        inject="impulse",
        null_score=null_score,
        retrieve_same_m=True,
    )
    cp = ControlPointsConfig(segment_delimiter="\n", M=3, first_m=first_m)
    a = OnlinePolicy(hf, library, memory, on, cp).run(prompts, T_MAX)
    b = OnlinePolicy(v, library, memory, on, cp).run(prompts, T_MAX)
    steps = [s for r in a for s in r.steps]
    assert all(s["m"] >= first_m for s in steps)
    assert any(s["chosen"] is not None for s in steps) and [r.token_ids for r in a] != greedy
    _assert_same(f"impulse {variant} first_m={first_m} null={null_score}", a, b)
    for x, y in zip(a, b):
        assert y.budget_used == y.tokens_used + y.probe_tokens_used
        if x.token_ids == y.token_ids:
            assert x.probe_tokens_used == y.probe_tokens_used
