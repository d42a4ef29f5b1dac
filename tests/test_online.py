"""The online ESM policy on a tiny random Llama with a hand-built library and memory.

The "lively" tiny model (weights scaled up) gives varied greedy text; the segment delimiter is
"er", which that text completes every few tokens, so rows pass several control points in a
couple of dozen tokens. Tool vectors are large enough to change the probes' tokens.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from esm_steer.config import ControlPointsConfig, OnlineConfig
from esm_steer.engine.base import SamplingSpec
from esm_steer.engine.hf import HFDecodeBatch, HFEngine
from esm_steer.esm.library import Library, Tool
from esm_steer.esm.memory_index import Memory, l2_normalise
from esm_steer.esm.online import OnlinePolicy, OnlineResult, summarize
from esm_steer.esm.retrieve import a_hat, aggregate
from modes import seed_mode

T_MAX = 24
CP = ControlPointsConfig(segment_delimiter="er", M=4, **seed_mode("control_points"))  # from m = 0


@pytest.fixture(scope="module")
def engine(lively_engine):
    return lively_engine


@pytest.fixture(scope="module")
def prompts(three_prompts):
    return three_prompts


@pytest.fixture(scope="module")
def greedy(engine, prompts):
    return [s[0].token_ids for s in engine.generate(prompts, SamplingSpec(max_new_tokens=T_MAX))]


@pytest.fixture(scope="module")
def artifacts(engine, prompts):
    """3 tools with 2 memory entries each. Entry keys are the prompts' last states plus noise,
    so that retrieval at m = 0 is meaningful; vectors are ~30 % of the hidden norm."""
    g = torch.Generator().manual_seed(0)
    d = engine.hidden_size
    last = torch.stack([h[-1] for h in engine.hidden_states(prompts)])  # [3, d]
    scale = float(last.norm(dim=-1).mean())
    tools, keys, entries = [], [], []
    for i, q in enumerate([0.5, 0.3, 0.8]):
        v = torch.randn(d, generator=g)
        states = torch.stack(
            [last[(i + j) % 3] + 0.3 * scale / math.sqrt(d) * torch.randn(d, generator=g) for j in range(2)]
        )
        tools.append(Tool(f"t{i}", f"q{i}", 0, q, 0.3 * scale * v / v.norm(), states.mean(0), states))
        for s in states:
            entries.append({"entry_id": len(entries), "tool_id": f"t{i}", "question_id": f"q{i}", "m": 0, "Q": q})
            keys.append(s.numpy())
    library = Library(tools, {"hidden_size": d})
    memory = Memory(l2_normalise(np.stack(keys)), entries, {"normalised": True})
    return library, memory


def cfg(**kw) -> OnlineConfig:
    """The seed reading's online config (segment injection, null at 0) at test sizes."""
    base = seed_mode("online") | dict(
        variant="esm",
        k_retrieve=4,
        L=2,
        probe_tokens=4,
        beta=1.0,
        rho=1.0,
        k_scale=1.0,
        tau_null=0.0,
        min_sim=-1.0,
        min_entries=1,
    )
    base.update(kw)
    return OnlineConfig(**base)


def run(engine, artifacts, prompts, T=T_MAX, memory=None, **kw) -> list[OnlineResult]:
    library, mem = artifacts
    policy = OnlinePolicy(engine, library, memory if memory is not None else mem, cfg(**kw), CP)
    return policy.run(prompts, T)


def check_budget(results, T):
    for r in results:
        assert r.tokens_used == len(r.token_ids) <= T
        assert r.budget_used == r.tokens_used + r.probe_tokens_used
        assert r.finish_reason in ("stop", "length")
        assert [s["m"] for s in r.steps] == sorted(s["m"] for s in r.steps)
        assert all(s["m"] < CP.M for s in r.steps)


def loser_tokens(r: OnlineResult) -> int:
    """Probe tokens the losing candidates decoded (an EOS step included)."""
    return sum(
        len(c["probe_token_ids"]) + c["eos"]
        for s in r.steps
        for c in s["candidates"]
        if "probe_token_ids" in c and c["tool"] != s["chosen"]
    )


class CountingMemory:
    """Delegates to a Memory and counts search calls / queries."""

    def __init__(self, memory):
        self.memory, self.entries, self.calls = memory, memory.entries, []

    def search(self, queries, k):
        self.calls.append(len(queries))
        return self.memory.search(queries, k)


class RaisingMemory:
    entries: list = []

    def search(self, queries, k):
        raise AssertionError("no_memory must not search the memory")


# ---------------------------------------------------------------- retrieval arithmetic


def test_a_hat_and_gates():
    entries = [{"tool_id": t, "Q": q} for t, q in [("a", 1.0), ("b", 0.5), ("a", 0.0), ("c", 2.0)]]
    sims, idx = np.array([0.9, 0.8, 0.6, 0.1, -np.inf]), np.array([0, 1, 2, 3, -1])
    ret = aggregate(sims, idx, entries, min_sim=0.5, min_entries=2)
    assert ret.gate == "ok" and ret.num_kept == 3 and len(ret.retrieved) == 4
    a = (0.9 * 1.0 + 0.6 * 0.0) / 1.5 * 0.9
    assert dict(ret.tools) == pytest.approx({"a": a, "b": 0.5 * 0.8})
    assert [t for t, _ in ret.tools] == ["a", "b"]  # Â descending: 0.54 > 0.40
    assert a_hat([0.9, 0.6], [1.0, 0.0]) == pytest.approx(a)
    assert aggregate(sims, idx, entries, min_sim=0.85, min_entries=2).gate == "min_sim"
    assert aggregate(sims[:1], idx[:1], entries, min_sim=0.0, min_entries=2).gate == "min_entries"
    assert aggregate(sims[:0], idx[:0], entries, min_sim=0.0, min_entries=0).gate == "no_tools"


# ---------------------------------------------------------------- the policy


def test_k_scale_zero_equals_greedy(engine, artifacts, prompts, greedy):
    results = run(engine, artifacts, prompts, k_scale=0.0)
    assert [r.token_ids for r in results] == greedy
    assert sum(len(r.steps) for r in results) > len(prompts)  # control points after m = 0 too
    assert any(s["chosen"] is not None for r in results for s in r.steps)  # tools won, at scale 0
    assert all(r.probe_tokens_used > 0 for r in results)
    check_budget(results, T_MAX)


def test_gates_give_null(engine, artifacts, prompts, greedy):
    results = run(engine, artifacts, prompts, min_sim=0.99999)
    assert all(s["gate"] == "min_sim" and s["chosen"] is None and s["scale"] == 0.0 for r in results for s in r.steps)
    assert [r.token_ids for r in results] == greedy and all(r.probe_tokens_used == 0 for r in results)

    # 6 entries in memory, 8 asked, 7 required
    results = run(engine, artifacts, prompts, k_retrieve=8, min_entries=7)
    assert all(s["gate"] == "min_entries" and s["chosen"] is None for r in results for s in r.steps)
    assert [r.token_ids for r in results] == greedy


def test_tau_null_forces_null(engine, artifacts, prompts, greedy):
    results = run(engine, artifacts, prompts, tau_null=1e9)
    steps = [s for r in results for s in r.steps]
    assert all(s["chosen"] is None for s in steps)
    # "tau_null" marks the steps where a tool out-scored null but not tau_null
    assert any(s["gate"] == "tau_null" for s in steps)
    for s in steps:
        best_tool = max(c["score"] for c in s["candidates"][1:])
        assert s["gate"] == ("tau_null" if best_tool > 0 else "ok")
    # the null probe (the unsteered original row) is kept: greedy text, probes still paid for
    assert [r.token_ids for r in results] == greedy
    assert all(r.probe_tokens_used > 0 for r in results)


def test_no_probing_never_probes(engine, artifacts, prompts, monkeypatch):
    forks = []
    orig = HFDecodeBatch.fork_many  # fork() goes through it too
    monkeypatch.setattr(HFDecodeBatch, "fork_many", lambda self, *a, **k: forks.append(a) or orig(self, *a, **k))
    results = run(engine, artifacts, prompts, variant="no_probing", beta=2.0)
    assert forks == [] and all(r.probe_tokens_used == 0 for r in results)
    for s in (s for r in results for s in r.steps if s["candidates"]):
        scores = {c["tool"]: c["score"] for c in s["candidates"]}
        assert all(c["logprob"] is None for c in s["candidates"])
        assert all(c["score"] == pytest.approx(2.0 * c["A_hat"]) for c in s["candidates"] if c["tool"])
        best = max(scores, key=lambda t: (scores[t], t is None))
        assert s["chosen"] == best and s["scale"] == pytest.approx(scores[best] if best else 0.0)
    check_budget(results, T_MAX)


def test_no_memory_never_retrieves(engine, artifacts, prompts):
    library, _ = artifacts
    results = run(engine, artifacts, prompts, memory=RaisingMemory(), variant="no_memory", L=2)
    top = [(t.tool_id, t.Q) for t in library.top_by_q(2)]
    assert top == [("t2", 0.8), ("t0", 0.5)]
    for s in (s for r in results for s in r.steps):
        assert s["retrieved"] == [] and s["gate"] in ("ok", "tau_null")
        assert [(c["tool"], c["A_hat"]) for c in s["candidates"][1:]] == top
    check_budget(results, T_MAX)


def _steered_logprobs(engine, prefix, cont, vector):
    """Teacher-forced log p of `cont` after `prefix`, `vector` added to layer ℓ's output at the
    positions of `cont` (the engine's hook is idle outside its own decode batches)."""

    def hook(module, args, output):
        hs = (output[0] if isinstance(output, tuple) else output).clone()
        hs[:, len(prefix) :, :] += vector
        return (hs,) + tuple(output[1:]) if isinstance(output, tuple) else hs

    handle = engine.layers[engine.steer_layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            logits = engine.model(input_ids=torch.tensor([prefix + cont])).logits[0].float()
    finally:
        handle.remove()
    lp = torch.log_softmax(logits[len(prefix) - 1 : len(prefix) - 1 + len(cont)], -1)
    return lp.gather(1, torch.tensor(cont)[:, None]).squeeze(1).tolist()


def test_scores_follow_formula(engine, artifacts, prompts):
    """At m = 0: Â from a by-hand cosine search, logprobs from teacher-forced steered passes."""
    library, memory = artifacts
    beta, rho, k_scale, k = 0.7, 1.3, 0.8, 4
    results = run(engine, artifacts, prompts, beta=beta, rho=rho, k_scale=k_scale, k_retrieve=k, L=3)
    keys = memory.keys / np.linalg.norm(memory.keys, axis=1, keepdims=True)
    for prompt, r in zip(prompts, results):
        step = r.steps[0]
        assert step["m"] == 0 and step["offset"] == 0 and step["gate"] == "ok"
        # Â_i = sim-weighted mean Q · best sim over the tool's entries among the top k
        q = engine.hidden_states([prompt])[0][-1].numpy()
        sims = keys @ (q / np.linalg.norm(q))
        top = np.argsort(-sims)[:k]
        expect = {}
        for t in {memory.entries[i]["tool_id"] for i in top}:
            mine = [i for i in top if memory.entries[i]["tool_id"] == t]
            w = np.array([sims[i] for i in mine])
            qs = np.array([memory.entries[i]["Q"] for i in mine])
            expect[t] = float((w * qs).sum() / w.sum() * w.max())
        cands = step["candidates"]
        assert cands[0]["tool"] is None and cands[0]["score"] == 0.0 and cands[0]["A_hat"] == 0.0
        assert {c["tool"]: c["A_hat"] for c in cands[1:]} == pytest.approx(expect, abs=1e-5)
        assert [c["A_hat"] for c in cands[1:]] == sorted((c["A_hat"] for c in cands[1:]), reverse=True)
        # logprob_i = mean log p of the probe's tokens under k_scale·v_i
        lps = {}
        for c in cands:
            vec = torch.zeros(engine.hidden_size) if c["tool"] is None else k_scale * library.by_id(c["tool"]).vector
            lp = _steered_logprobs(engine, prompt, c["probe_token_ids"], vec)
            lps[c["tool"]] = sum(lp) / len(lp)
            assert c["logprob"] == pytest.approx(lps[c["tool"]], abs=1e-4)
        for c in cands[1:]:
            assert c["score"] == pytest.approx(beta * expect[c["tool"]] + rho * (lps[c["tool"]] - lps[None]), abs=2e-4)
        best = max(cands, key=lambda c: (c["score"], c["tool"] is None))
        assert step["chosen"] == best["tool"]
        assert step["scale"] == pytest.approx(k_scale * best["score"] if best["tool"] else 0.0)


def test_probes_diverge_and_winner_tokens_are_kept(engine, artifacts, prompts):
    results = run(engine, artifacts, prompts)
    diverged = 0
    for r in results:
        for s in r.steps:
            if not s["candidates"]:
                continue
            win = next(c for c in s["candidates"] if c["tool"] == s["chosen"])
            off = s["offset"]
            assert r.token_ids[off : off + len(win["probe_token_ids"])] == win["probe_token_ids"]
            probes = {tuple(c["probe_token_ids"]) for c in s["candidates"]}
            diverged += len(probes) > 1
            # the first probe token is predicted at the control point itself: shared by all
            assert len({p[:1] for p in probes}) == 1
    assert diverged > 0  # the vectors do steer
    assert any(s["chosen"] is not None for r in results for s in r.steps)


def test_budget_accounting(engine, artifacts, prompts):
    for T in (1, 3, 9):
        results = run(engine, artifacts, prompts, T=T, probe_tokens=4)
        check_budget(results, T)
        for r in results:
            assert r.probe_tokens_used == loser_tokens(r)
            assert all(len(c["probe_token_ids"]) <= min(4, T - s["offset"]) for s in r.steps for c in s["candidates"])
    s = summarize(results)
    assert s["probe_tokens_used"] == sum(r.probe_tokens_used for r in results)


def test_batched_equals_alone(engine, artifacts, prompts):
    counting = CountingMemory(artifacts[1])
    together = run(engine, artifacts, prompts, memory=counting)
    assert counting.calls[0] == len(prompts)  # m = 0 of every row: one search
    alone = [run(engine, artifacts, [p])[0] for p in prompts]
    for a, b in zip(together, alone):
        assert a.token_ids == b.token_ids
        assert a.probe_tokens_used == b.probe_tokens_used and a.finish_reason == b.finish_reason
        assert [(s["m"], s["offset"], s["chosen"], s["gate"]) for s in a.steps] == [
            (s["m"], s["offset"], s["chosen"], s["gate"]) for s in b.steps
        ]
        for sa, sb in zip(a.steps, b.steps):
            assert [c["score"] for c in sa["candidates"]] == pytest.approx(
                [c["score"] for c in sb["candidates"]], abs=1e-4
            )


def test_more_prompts_than_batch(engine, artifacts, prompts):
    many = (prompts * 4)[:10]  # batch_size 8: two chunks
    results = run(engine, artifacts, many, T=8)
    assert len(results) == 10
    assert [r.token_ids for r in results[:3]] == [r.token_ids for r in results[3:6]]


def test_eos_in_probe(engine, artifacts, prompts):
    """A tool that steers towards an EOS token: when it wins, the row ends ("stop") with its
    probe's tokens; when it loses, its probe (EOS step included) counts as probe tokens."""
    library, memory = artifacts
    # SmolLM2's EOS row of the tied embedding is zero (pad): declare token 1000 an EOS too,
    # for a second engine on the same model, and steer towards it
    gen_cfg = engine.model.generation_config
    saved = gen_cfg.eos_token_id
    gen_cfg.eos_token_id = [engine.tokenizer.eos_token_id, 1000]
    try:
        eng2 = HFEngine(engine.model, engine.tokenizer, batch_size=8)
    finally:
        gen_cfg.eos_token_id = saved
    try:
        emb = engine.model.get_output_embeddings().weight[1000].detach()
        last = torch.stack([h[-1] for h in engine.hidden_states(prompts)])
        tool = Tool("eos", "qe", 0, 5.0, 200.0 * emb / emb.norm(), last[0], last)
        lib = Library(library.tools + [tool], {})
        keys = np.concatenate([memory.keys, l2_normalise(last.numpy())])
        extra = [{"entry_id": 6 + i, "tool_id": "eos", "question_id": "qe", "m": 0, "Q": 5.0} for i in range(3)]
        mem = Memory(keys, memory.entries + extra, {"normalised": True})

        def eos_probe(step):
            return next(c for c in step["candidates"] if c["tool"] == "eos")

        won = run(eng2, (lib, mem), prompts, rho=0.0)  # Â alone decides: the EOS tool wins
        for r in won:
            # (" adverse" completes "er": that row's probes stop after one token, then m = 1)
            s = r.steps[-1]
            cand = eos_probe(s)
            assert all(t["chosen"] == "eos" for t in r.steps) and len(cand["probe_token_ids"]) <= 1
            assert r.finish_reason == "stop" and r.token_ids[s["offset"] :] == cand["probe_token_ids"]
            assert r.probe_tokens_used == loser_tokens(r)
            check_budget([r], T_MAX)

        lost = run(eng2, (lib, mem), prompts, tau_null=1e9)  # null kept at every step
        assert all(any(eos_probe(s)["eos"] for s in r.steps) for r in lost)  # its probes hit EOS
        for r in lost:
            assert all(s["chosen"] is None for s in r.steps)
            assert r.probe_tokens_used == loser_tokens(r) > 0
            check_budget([r], T_MAX)
    finally:
        eng2._hook.remove()


# ---------------------------------------------------------------- static baseline, step norms


def _capture_steer(monkeypatch) -> list:
    """Every vector set on a decode row, times its scale (None: no steering)."""
    seen = []
    orig = HFDecodeBatch.set_steer

    def spy(self, row, v, scale=1.0):
        seen.append(None if v is None else v * scale)
        return orig(self, row, v, scale)

    monkeypatch.setattr(HFDecodeBatch, "set_steer", spy)
    return seen


@pytest.mark.parametrize("how", ["top", "mean"])
def test_static_steers_every_control_point_with_one_vector(engine, artifacts, prompts, greedy, monkeypatch, how):
    library, _ = artifacts
    seen = _capture_steer(monkeypatch)
    forks = []
    orig_fork = HFDecodeBatch.fork_many
    monkeypatch.setattr(HFDecodeBatch, "fork_many", lambda self, *a, **k: forks.append(a) or orig_fork(self, *a, **k))
    k = 2.0
    policy = OnlinePolicy(engine, library, RaisingMemory(), cfg(variant="static", static_vector=how, k_scale=k), CP)
    results = policy.run(prompts, T_MAX)

    if how == "top":  # t2 has the highest Q (0.8)
        expected, chosen = torch.as_tensor(library.tools[2].vector).float(), "t2"
    else:  # Q-weighted mean of the three vectors
        qs = torch.tensor([t.Q for t in library.tools])
        vs = torch.stack([torch.as_tensor(t.vector).float() for t in library.tools])
        expected, chosen = (qs[:, None] * vs).sum(0) / qs.sum(), "mean"
    steps = [s for r in results for s in r.steps]
    assert len(steps) > len(prompts)  # control points after m = 0 too
    assert all(s["chosen"] == chosen and s["scale"] == k for s in steps)
    assert all(s["retrieved"] == [] and s["candidates"] == [] for s in steps)
    assert forks == [] and all(r.probe_tokens_used == 0 for r in results)  # no probe
    assert len(seen) == len(steps) and all(v is not None for v in seen)
    for v in seen:
        torch.testing.assert_close(v.float(), k * expected)
    for s in steps:
        assert s["inject_norm"] == pytest.approx(float((k * expected).norm()), rel=1e-5)
        assert s["h_norm"] > 0
    assert [r.token_ids for r in results] != greedy  # the vector acts
    check_budget(results, T_MAX)


def test_steps_record_key_norm_and_injected_norm(engine, artifacts, prompts):
    library, _ = artifacts
    results = run(engine, artifacts, prompts, k_scale=3.0)
    norms = {t.tool_id: float(torch.as_tensor(t.vector).float().norm()) for t in library.tools}
    steps = [s for r in results for s in r.steps]
    assert any(s["chosen"] is not None for s in steps)
    for s in steps:
        assert s["h_norm"] > 0
        if s["chosen"] is None:
            assert s["inject_norm"] == 0.0
        else:  # ‖k_scale · Score · v‖
            assert s["inject_norm"] == pytest.approx(abs(s["scale"]) * norms[s["chosen"]], rel=1e-5)
    # the first step's key is the prompt's last state, before any steering
    h0 = engine.hidden_states([prompts[0]])[0][-1]
    assert results[0].steps[0]["h_norm"] == pytest.approx(float(h0.norm()), rel=1e-4)
