"""STIR's mechanisms (docs/method.md, "STIR mode"), each checked so that disconnecting it fails
a test: the control-point vector, first_m, contrast entries and null anchors, same-m retrieval,
the null score from anchors, and the impulse injection on the HF batch and in the policy."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from esm_steer.config import ConfigError, ControlPointsConfig, OnlineConfig, validate
from esm_steer.engine.base import SamplingSpec
from esm_steer.esm.candidates import Trace, question_candidates
from esm_steer.esm.library import Library, Tool
from esm_steer.esm.memory_index import Memory, build_memory, check_online, l2_normalise
from esm_steer.esm.online import OnlinePolicy
from esm_steer.esm.policy import candidates_of, choose, score
from esm_steer.esm.retrieve import aggregate
from esm_steer.runs import RunError
from modes import seed_mode
from test_eval import compose_cfg

T_MAX = 24
CP = ControlPointsConfig(segment_delimiter="er", M=4, **seed_mode("control_points"))  # one switch at a time


# ---------------------------------------------------------------- Stage I


def _trace(reward: float, h: torch.Tensor, offsets: list[int], prompt_len: int = 2) -> Trace:
    return Trace(reward, h, prompt_len, offsets, h.shape[0] - prompt_len)


def test_control_point_vector_is_the_difference_of_control_point_states():
    g = torch.Generator().manual_seed(0)
    P = [_trace(1.0, torch.randn(10, 5, generator=g), [0, 3, 6]) for _ in range(2)]
    N = [_trace(0.0, torch.randn(10, 5, generator=g), [0, 4]) for _ in range(3)]
    seg = {c.m: c for c in question_candidates("q", P, N, M=3)}
    cp = {c.m: c for c in question_candidates("q", P, N, M=3, vector="control_point")}
    assert set(cp) == set(seg) == {0, 1}
    for m in cp:
        mu_pos = torch.stack([t.state(m) for t in P]).mean(0)
        mu_neg = torch.stack([t.state(m) for t in N]).mean(0)
        torch.testing.assert_close(cp[m].vector, mu_pos - mu_neg)
        assert not torch.allclose(seg[m].vector, cp[m].vector)  # the two definitions differ
        torch.testing.assert_close(cp[m].key, seg[m].key)  # the key does not depend on it
        assert cp[m].Q == seg[m].Q


def test_first_m_skips_the_end_of_the_prompt():
    g = torch.Generator().manual_seed(1)
    P = [_trace(1.0, torch.randn(10, 4, generator=g), [0, 3, 6])]
    N = [_trace(0.0, torch.randn(10, 4, generator=g), [0, 3, 6])]
    assert [c.m for c in question_candidates("q", P, N, M=3)] == [0, 1, 2]
    assert [c.m for c in question_candidates("q", P, N, M=3, first_m=1)] == [1, 2]
    with pytest.raises(ValueError, match="offline_mine.vector"):
        question_candidates("q", P, N, M=3, vector="nope")


# ---------------------------------------------------------------- Stage III


def _library(d: int = 6, n_pos: int = 2, n_neg: int = 3) -> Library:
    g = torch.Generator().manual_seed(2)
    tools = []
    for i, m in enumerate([1, 2]):
        states = torch.randn(n_pos + n_neg, d, generator=g)
        tools.append(
            Tool(f"t{i}", f"q{i}", m, 0.5 + i, torch.randn(d, generator=g), states.mean(0), states, {"n_pos": n_pos})
        )
    return Library(tools, {"hidden_size": d, "model_id": "x", "steer_layer": 1})


def test_contrast_entries_key_the_tool_on_the_failing_mean_and_the_anchor_on_the_succeeding_mean():
    lib = _library()
    mem = build_memory(lib, normalize_keys=True, entries_of="contrast", null_anchors=True)
    assert [(e["tool_id"], e["state"], e["m"]) for e in mem.entries] == [
        ("t0", "neg_mean", 1),
        (None, "pos_mean", 1),
        ("t1", "neg_mean", 2),
        (None, "pos_mean", 2),
    ]
    t0 = lib.tools[0]
    np.testing.assert_allclose(mem.keys[0], l2_normalise(t0.states[2:].mean(0).numpy()), atol=1e-6)
    np.testing.assert_allclose(mem.keys[1], l2_normalise(t0.states[:2].mean(0).numpy()), atol=1e-6)
    assert mem.meta["null_anchors"] is True and mem.has_null_anchors
    # without anchors: one entry per tool; states + anchors: P states are the anchors
    assert [e["tool_id"] for e in build_memory(lib, entries_of="contrast").entries] == ["t0", "t1"]
    states = build_memory(lib, null_anchors=True).entries
    assert [e["tool_id"] for e in states[:5]] == [None, None, "t0", "t0", "t0"]
    assert not build_memory(lib).has_null_anchors


def test_memory_meta_round_trips_the_anchor_flag(tmp_path):
    mem = build_memory(_library(), entries_of="contrast", null_anchors=True)
    mem.meta.update(model="x", layer=1)
    mem.save(tmp_path)
    back = Memory.load(tmp_path, "x", 1)
    assert back.meta["null_anchors"] is True and back.meta["entries"] == "contrast" and back.has_null_anchors
    check_online(OnlineConfig(null_score="anchors"), tmp_path)  # fine: it has anchors
    plain = build_memory(_library())
    plain.meta.update(model="x", layer=1)
    plain.save(tmp_path / "b")
    with pytest.raises(RunError, match="online.null_score=anchors.*offline_memory.null_anchors=true"):
        check_online(OnlineConfig(null_score="anchors"), tmp_path / "b")


def test_same_m_retrieval_searches_only_that_control_point():
    lib = _library()
    mem = build_memory(lib, normalize_keys=True, center_keys=False, entries_of="contrast", null_anchors=True)
    q = np.stack([mem.keys[2], mem.keys[2]])  # the key of t1 (m = 2)
    sims, idx = mem.search(q, 4)
    assert idx[0, 0] == 2 and sims[0, 0] == pytest.approx(1.0, abs=1e-5)
    sims, idx = mem.search(q, 4, ms=[1, 2])
    assert {mem.entries[i]["m"] for i in idx[0] if i >= 0} == {1}  # row 0 asked for m = 1 only
    assert idx[1, 0] == 2 and {mem.entries[i]["m"] for i in idx[1] if i >= 0} == {2}
    assert list(idx[0][2:]) == [-1, -1] and np.isinf(sims[0][2:]).all()  # m = 1 has two entries
    sims, idx = mem.search(q[:1], 4, ms=[7])  # no entry at that m
    assert (idx == -1).all()


# ---------------------------------------------------------------- the null score


def test_a_query_equal_to_an_anchor_key_makes_null_win():
    lib = _library()
    mem = build_memory(lib, normalize_keys=True, center_keys=False, entries_of="contrast", null_anchors=True)
    query = mem.keys[1]  # the anchor of t0: a state that looks like success
    sims, idx = mem.search(query, 4, ms=[1])
    ret = aggregate(sims[0], idx[0], mem.entries, min_sim=-1.0, min_entries=1)
    assert ret.null_A_hat == pytest.approx(1.0 * lib.tools[0].Q, abs=1e-5)  # sim 1 · Q
    tool_sim = float(mem.keys[0] @ query)
    assert ret.tools == [("t0", pytest.approx(tool_sim * lib.tools[0].Q, abs=1e-5))]
    with_anchors = candidates_of(ret.tools, ret.null_A_hat)
    score(with_anchors, beta=2.0, rho=0.1)
    assert choose(with_anchors, tau_null=0.0) == (0, None)  # null
    without = candidates_of(ret.tools)
    score(without, beta=2.0, rho=0.1)
    assert choose(without, tau_null=0.0)[0] == (1 if tool_sim > 0 else 0)  # null scores 0: the tool can win
    # and at the failing mean itself the tool wins over its anchor
    sims, idx = mem.search(mem.keys[0], 4, ms=[1])
    ret = aggregate(sims[0], idx[0], mem.entries, min_sim=-1.0, min_entries=1)
    cands = candidates_of(ret.tools, ret.null_A_hat)
    score(cands, beta=2.0, rho=0.1)
    assert choose(cands, tau_null=0.0)[0] == 1


def test_config_refuses_anchor_scoring_without_anchors():
    with pytest.raises(ConfigError, match=r"online.null_score='anchors'.*offline_memory.null_anchors=true"):
        validate(compose_cfg(["offline_memory.null_anchors=false"]))  # the default scores null from anchors
    validate(compose_cfg(["online.null_score=zero", "offline_memory.null_anchors=false"]))
    validate(compose_cfg([]))
    with pytest.raises(ConfigError, match="control_points.first_m"):
        validate(compose_cfg(["control_points.first_m=8"]))


# ---------------------------------------------------------------- impulse on the HF batch


def _reference_logits(engine, ids: list[int], impulse_at: int, vec: torch.Tensor) -> torch.Tensor:
    """Last-position logits of a full forward of ``ids`` with ``vec`` added at layer ℓ's output
    at position ``impulse_at`` only (the definition of an impulse)."""
    layer = engine.model.model.layers[engine.info.steer_layer]

    def hook(_m, _i, out):
        hs = out[0] if isinstance(out, tuple) else out
        hs = hs.clone()
        hs[:, impulse_at] += vec.to(hs.dtype)
        return (hs, *out[1:]) if isinstance(out, tuple) else hs

    h = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    finally:
        h.remove()


def test_impulse_steers_the_last_position_only(lively_engine, three_prompts):
    engine = lively_engine
    g = torch.Generator().manual_seed(3)
    vec = torch.randn(engine.hidden_size, generator=g)
    norm = float(torch.stack([h[-1] for h in engine.hidden_states(three_prompts)]).norm(dim=-1).mean())
    vec = 5.0 * norm * vec / vec.norm()  # large enough to move the next token
    batch = engine.start(three_prompts)
    rows = batch.active_rows()
    plain = {r: batch.last_logits(r).clone() for r in rows}
    batch.set_impulse(rows[1], vec, 2.0)  # row 1: at the end of its prompt
    first = batch.step()
    tok1 = first[rows[1]]
    want = _reference_logits(engine, three_prompts[1], len(three_prompts[1]) - 1, 2.0 * vec)
    assert tok1 == int(want.argmax())
    assert first[rows[0]] == int(plain[rows[0]].argmax())  # other rows are untouched
    assert (want - plain[rows[1]]).abs().max() > 0.1  # the impulse moved the logits
    assert tok1 != int(plain[rows[1]].argmax())  # and the next token
    # the next position is not steered, but attends to the steered KV of the impulse position
    ids = three_prompts[1] + [tok1]
    want2 = _reference_logits(engine, ids, len(three_prompts[1]) - 1, 2.0 * vec)
    torch.testing.assert_close(batch.last_logits(rows[1]), want2, atol=2e-4, rtol=1e-4)
    # an impulse after decoded tokens: at the last decoded token
    batch.set_impulse(rows[2], vec, 1.0)
    out = batch.step()
    ids2 = three_prompts[2] + [first[rows[2]]]
    want3 = _reference_logits(engine, ids2, len(ids2) - 1, vec)
    assert out[rows[2]] == int(want3.argmax())
    # a fork carries the pending impulse of its source; the source keeps it too
    batch.set_impulse(rows[0], vec, 1.0)
    (fork,) = batch.fork(rows[0], 1)
    out = batch.step()
    assert out[fork] == out[rows[0]]


# ---------------------------------------------------------------- impulse in the policy


@pytest.fixture(scope="module")
def artifacts(lively_engine, three_prompts):
    """Three tools at m = 0..2 (contrast entries + anchors) from the prompts' last states."""
    engine = lively_engine
    g = torch.Generator().manual_seed(4)
    d = engine.hidden_size
    last = torch.stack([h[-1] for h in engine.hidden_states(three_prompts)])
    scale = float(last.norm(dim=-1).mean())
    tools = []
    for i, q in enumerate([0.5, 0.3, 0.8]):
        states = torch.stack(
            [last[(i + j) % 3] + 0.3 * scale / math.sqrt(d) * torch.randn(d, generator=g) for j in range(4)]
        )
        v = torch.randn(d, generator=g)
        tools.append(Tool(f"t{i}", f"q{i}", i % 3, q, 0.6 * scale * v / v.norm(), states.mean(0), states, {"n_pos": 2}))
    library = Library(tools, {"hidden_size": d})
    return library, build_memory(library, center_keys=False, entries_of="contrast", null_anchors=True)


def _cfg(**kw) -> OnlineConfig:
    base = seed_mode("online") | dict(
        k_retrieve=6, L=2, probe_tokens=3, beta=1.0, rho=1.0, k_scale=1.0, min_sim=-1.0, inject="impulse"
    )
    base.update(kw)
    return OnlineConfig(**base)


def _run(engine, artifacts, prompts, cp=CP, **kw):
    library, memory = artifacts
    return OnlinePolicy(engine, library, memory, _cfg(**kw), cp).run(prompts, T_MAX)


def test_impulse_with_k_scale_zero_is_greedy(lively_engine, artifacts, three_prompts):
    greedy = [s[0].token_ids for s in lively_engine.generate(three_prompts, SamplingSpec(max_new_tokens=T_MAX))]
    results = _run(lively_engine, artifacts, three_prompts, k_scale=0.0, probe_scale=0.0)
    assert [r.token_ids for r in results] == greedy
    assert all(r.steps for r in results)


def test_impulse_regenerates_the_segment_and_counts_every_probe(lively_engine, artifacts, three_prompts):
    """A tool that wins is injected at the control point only, and the segment is decoded again
    from there: the kept tokens equal a fresh decode with that one impulse (probes thrown away)."""
    engine = lively_engine
    library, _ = artifacts
    results = _run(engine, artifacts, three_prompts, k_scale=4.0, probe_scale=1.0, beta=5.0)
    steered = [(p, r, s) for p, r in zip(three_prompts, results) for s in r.steps[:1] if s["chosen"] is not None]
    assert steered, "no tool won: the test cannot check the impulse"
    for prompt, r, s in steered:
        assert s["m"] == 0 and s["scale"] > 0
        vec = library.by_id(s["chosen"]).vector * s["scale"]
        want = _reference_logits(engine, prompt, len(prompt) - 1, vec)
        assert r.token_ids[0] == int(want.argmax())
        winner = next(c for c in s["candidates"] if c["tool"] == s["chosen"])
        # the winner's probe ran at probe_scale 1.0, the segment at k_scale·Score: all probes are cost
        assert r.probe_tokens_used >= sum(len(c["probe_token_ids"]) for c in s["candidates"]) - 0
        assert winner["probe_token_ids"]  # it was probed
    for r in results:
        assert r.tokens_used == len(r.token_ids) <= T_MAX
        assert r.budget_used == r.tokens_used + r.probe_tokens_used


def test_first_m_one_never_steers_the_prompt_end(lively_engine, artifacts, three_prompts):
    cp = ControlPointsConfig(segment_delimiter="er", M=4, first_m=1)
    results = _run(lively_engine, artifacts, three_prompts, cp=cp, k_scale=4.0, beta=5.0)
    steps = [s for r in results for s in r.steps]
    assert steps and all(s["m"] >= 1 for s in steps)


def test_null_from_anchors_and_same_m_in_the_policy(lively_engine, artifacts, three_prompts):
    """With null scored from anchors, null wins more often than with null at 0; with same-m
    retrieval every retrieved entry is of the step's m."""
    library, memory = artifacts
    kw = dict(k_scale=1.0, beta=5.0, rho=0.0, retrieve_same_m=True)
    zero = _run(lively_engine, artifacts, three_prompts, null_score="zero", **kw)
    anchors = _run(lively_engine, artifacts, three_prompts, null_score="anchors", **kw)
    null = lambda rs: sum(s["chosen"] is None for r in rs for s in r.steps)  # noqa: E731
    assert null(anchors) > null(zero)
    by_tool = {t.tool_id: t.m for t in library.tools}
    for r in anchors:
        for s in r.steps:
            assert all(t is None or by_tool[t] == s["m"] for t, _ in s["retrieved"])
            if s["gate"] == "ok":
                assert s["candidates"][0]["A_hat"] != 0.0  # null's Â came from an anchor
    with pytest.raises(ValueError, match="null_anchors"):
        OnlinePolicy(lively_engine, library, build_memory(library), _cfg(null_score="anchors"), CP)


# ---------------------------------------------------------------- STIR's own split, as an explicit override


def test_stirs_overlapping_split_only_when_asked_and_marked(tmp_path, caplog):
    """task.take=first gives the first N rows in file order; a mine on the test split then
    overlaps the eval questions: refused by default, logged and counted with
    eval.allow_mining_overlap=true (eval marks the main table's mined_overlap column with it)."""
    from esm_steer import runtime
    from esm_steer.data.example import Example
    from esm_steer.data.tasks import subsample
    from esm_steer.splits import check_no_overlap, write_mined_questions

    items = list(range(10))
    assert subsample(items, 4, seed=0, take="first") == [0, 1, 2, 3]
    assert subsample(items, 4, seed=0) != [0, 1, 2, 3] or subsample(items, 4, seed=1) != [0, 1, 2, 3]
    exs = [Example(id=str(i), question=f"What is {i} + 1?", gold=str(i + 1)) for i in range(6)]
    write_mined_questions(tmp_path / "mine", exs[:2])
    with pytest.raises(RunError, match="were mined on 2 of the 6 eval questions"):
        check_no_overlap(tmp_path, exs)
    with caplog.at_level("WARNING"):
        assert check_no_overlap(tmp_path, exs, allow=True) == 2
    assert "eval.allow_mining_overlap=true: 2 of the 6 eval questions" in caplog.text
    assert check_no_overlap(tmp_path, exs[2:], allow=True) == 0
    # train == eval split: refused unless the override is given
    over = ["task=math500", "task.carve=null", "task.train_split=test", "task.data_root=/nonexistent"]
    with pytest.raises(ConfigError, match="must name three different splits"):
        runtime.load_split(compose_cfg(over), "test")
    with pytest.raises(Exception) as e:  # passes the split check, then looks for the data
        runtime.load_split(compose_cfg(over + ["eval.allow_mining_overlap=true"]), "test")
    assert "three different splits" not in str(e.value)


def test_arith_difficulty_4_is_a_two_step_chain_written_one_line_per_step():
    from esm_steer.data.arith import generate
    from esm_steer.data.prompts import build_messages
    from esm_steer.engine.segments import control_point_offsets

    test = generate("test", difficulty=4)
    assert len(test) == 1000 and len({e.question for e in test}) == 1000
    assert not {e.question for e in test} & {e.question for e in generate("val", difficulty=4)}
    for ex in test[:50]:
        expr = re.search(r"\d+( [+-] \d+)+", ex.question).group(0)
        assert int(ex.gold) == eval(expr) >= 0  # noqa: S307 - our own generated "a + b - c"
        lines = ex.solution.split("\n")
        assert len(lines) == 3 and lines[-1] == f"The answer is {ex.gold}."
        # control points after each written step: m = 1, 2 (the delimiter the presets use)
        pieces = [line + "\n" for line in lines[:-1]] + [lines[-1]]
        assert len(control_point_offsets(pieces, "\n", 5)) == 3
    assert generate("test", seed=4242, difficulty=4)[:5] == generate("test", seed=4242, difficulty=4)[:5]
    msgs = build_messages("arith_steps_3shot", test[0])
    assert len(msgs) == 7 and msgs[1]["content"].count("\n") == 2  # shots of the same two-step shape


def test_select_coverage_starts_at_first_m():
    from esm_steer.esm.select import select_indices

    Q, ms = [0.9, 0.8, 0.7, 0.6], [1, 2, 1, 2]
    with pytest.raises(RunError, match="m=0 has 0"):
        select_indices(Q, None, ms, B=2, method="top", min_per_control_point=1, M=3)
    chosen = select_indices(Q, None, ms, B=2, method="top", min_per_control_point=1, M=3, first_m=1)
    assert sorted(ms[i] for i in chosen) == [1, 2]
