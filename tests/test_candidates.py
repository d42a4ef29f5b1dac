"""Stage I's math (esm.candidates): v and Q by hand, the reward, P/N rules, keep_top_C."""

from __future__ import annotations

import pytest
import torch

from esm_steer.esm.candidates import (
    GOLD_SAMPLE_ID,
    Candidate,
    Trace,
    choose_sets,
    keep_top,
    question_candidates,
    reward,
)

# ---------------------------------------------------------------- v and Q by hand


def test_v_key_and_Q_hand_computed():
    # d = 2, prompt of 2 tokens; h rows are [prompt..., response...]
    # P: one trace, response 4 tokens, control points at 0 and 2
    hp = torch.tensor([[0, 0], [1, 1], [2, 0], [4, 0], [0, 2], [0, 4]], dtype=torch.float32)
    p = Trace(reward=0.9, h=hp, prompt_len=2, offsets=[0, 2], length=4)
    # N: two traces; n1 reaches m=1, n2 only m=0
    hn1 = torch.tensor([[0, 0], [3, 3], [1, 1], [1, 1], [5, 5], [7, 7]], dtype=torch.float32)
    n1 = Trace(reward=-0.2, h=hn1, prompt_len=2, offsets=[0, 2], length=4)
    hn2 = torch.tensor([[0, 0], [1, 3], [6, 0], [0, 6]], dtype=torch.float32)
    n2 = Trace(reward=-0.1, h=hn2, prompt_len=2, offsets=[0], length=2)

    cands = question_candidates("q", [p], [n1, n2], M=3)
    assert [c.m for c in cands] == [0, 1]
    c0, c1 = cands
    # m = 0: key = mean of last prompt tokens (1,1), (3,3), (1,3)
    assert torch.allclose(c0.key, torch.tensor([5 / 3, 7 / 3]))
    assert c0.states.shape == (3, 2)
    # s(p,0) = mean((2,0),(4,0)) = (3,0); s(n1,0) = (1,1); s(n2,0) = mean((6,0),(0,6)) = (3,3)
    assert torch.allclose(c0.vector, torch.tensor([3.0, 0.0]) - torch.tensor([2.0, 2.0]))
    assert c0.Q == pytest.approx(0.9 - (-0.15))
    assert (c0.n_pos, c0.n_neg) == (1, 2)
    # m = 1: states at response token 1 (offset 2 - 1): p (4,0), n1 (1,1)
    assert torch.allclose(c1.key, torch.tensor([2.5, 0.5]))
    # s(p,1) = mean((0,2),(0,4)) = (0,3); s(n1,1) = (6,6); v not normalised
    assert torch.allclose(c1.vector, torch.tensor([-6.0, -3.0]))
    assert c1.Q == pytest.approx(0.9 - (-0.2))  # only n1 reaches m = 1
    assert (c1.n_pos, c1.n_neg) == (1, 1)


def test_reward_formula():
    assert reward(True, 0, 100, 0.1) == pytest.approx(1.0)
    assert reward(True, 50, 100, 0.1) == pytest.approx(0.95)
    assert reward(False, 100, 100, 0.2) == pytest.approx(-0.2)


def test_empty_segment_does_not_reach():
    h = torch.zeros(3, 2)
    t = Trace(0.0, h, prompt_len=3, offsets=[0], length=0)  # empty response
    assert not t.reaches(0)


# ---------------------------------------------------------------- P and N


def _r(sid, correct, reward_):
    return {"sample_id": sid, "correct": correct, "reward": reward_}


def test_sets_pick_highest_R_positives_and_lowest_R_negatives():
    rs = [
        _r(0, True, 0.9),
        _r(1, True, 0.95),
        _r(2, True, 0.8),
        _r(3, False, -0.1),
        _r(4, False, -0.05),
        _r(5, False, -0.2),
    ]
    P, N, why = choose_sets(rs, K_pos=2, K_neg=2)
    assert why is None
    assert [r["sample_id"] for r in P] == [1, 0]
    assert [r["sample_id"] for r in N] == [5, 3]


def test_skipping_rules():
    all_right = [_r(i, True, 0.9) for i in range(4)]
    all_wrong = [_r(i, False, -0.1) for i in range(4)]
    assert choose_sets(all_right, 2, 2)[2] == "no incorrect rollout"
    assert choose_sets(all_wrong, 2, 2)[2] == "no correct rollout"
    # not required: ranked by R and split into halves (disjoint)
    wrong = [_r(i, False, -0.01 * i) for i in range(4)]
    P, N, why = choose_sets(wrong, 3, 3, require_both=False)
    assert why is None
    assert [r["sample_id"] for r in P] == [0, 1] and [r["sample_id"] for r in N] == [2, 3]
    assert choose_sets([_r(0, False, 0.0)], 2, 2, require_both=False)[2] == "fewer than 2 rollouts"


def test_pos_source_variants():
    gold = {"sample_id": GOLD_SAMPLE_ID, "correct": True, "reward": 0.97}
    mixed = [_r(0, True, 0.9), _r(1, False, -0.1)]
    wrong = [_r(0, False, -0.1), _r(1, False, -0.2)]
    # gold: the reference is the only positive, even when rollouts are correct
    P, N, _ = choose_sets(mixed, 2, 2, "gold", gold)
    assert P == [gold] and [r["sample_id"] for r in N] == [1]
    assert choose_sets(mixed, 2, 2, "gold", None)[2] == "no gold solution"
    # rollout_or_gold: correct rollouts when there are, else gold
    P, _, _ = choose_sets(mixed, 2, 2, "rollout_or_gold", gold)
    assert [r["sample_id"] for r in P] == [0]
    P, N, why = choose_sets(wrong, 2, 2, "rollout_or_gold", gold)
    assert why is None and P == [gold] and len(N) == 2
    assert choose_sets(wrong, 2, 2, "rollout", gold)[2] == "no correct rollout"


def test_keep_top_C_orders_by_Q_then_question_then_m():
    z = torch.zeros(2)
    mk = lambda q, m, Q: Candidate(q, m, Q, z, z, z[None], 1, 1)  # noqa: E731
    cands = [mk("b", 0, 0.5), mk("a", 1, 0.5), mk("a", 0, 0.5), mk("c", 2, 0.9), mk("d", 0, 0.1)]
    kept = keep_top(cands, 3)
    assert [(c.question_id, c.m) for c in kept] == [("c", 2), ("a", 0), ("a", 1)]
