"""Statistics: Wilson and paired bootstrap CIs, pairing records by id."""

from __future__ import annotations

import math

import numpy as np
import pytest

from esm_steer.evaluate import stats


def rec(i, correct, tokens=10, probe=0, finish="stop", steps=None, response="r"):
    return {
        "id": f"e{i}",
        "question": f"q{i}",
        "gold": "1",
        "response": response,
        "pred": "1" if correct else "0",
        "correct": correct,
        "finish_reason": finish,
        "tokens_used": tokens,
        "probe_tokens_used": probe,
        "budget_used": tokens + probe,
        "steps": steps or [],
        "wall_s": 0.5,
    }


def test_wilson_interval_known_values():
    lo, hi = stats.wilson_ci(0, 10)
    assert lo == 0 and hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    lo, hi = stats.wilson_ci(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert all(math.isnan(x) for x in stats.wilson_ci(0, 0))
    assert stats.wilson_ci(0, 6)[0] == 0.0 and stats.wilson_ci(6, 6)[1] == 1.0  # no 1e-17 residue


def test_paired_bootstrap_contains_the_true_difference_and_is_centred():
    rng = np.random.default_rng(1)
    n = 400
    esm = np.zeros(n)
    esm[rng.permutation(n)[:240]] = 1  # accuracy 0.6 exactly
    greedy = np.zeros(n)
    greedy[rng.permutation(n)[:160]] = 1  # 0.4
    d, lo, hi = stats.paired_bootstrap_delta(esm, greedy, samples=2000, seed=0)
    assert d == pytest.approx(0.2)
    assert lo < 0.2 < hi
    assert (lo + hi) / 2 == pytest.approx(d, abs=0.01)
    assert 0.05 < hi - lo < 0.3
    assert stats.paired_bootstrap_delta(esm, greedy, 2000, seed=0) == (d, lo, hi)  # seeded


def test_paired_bootstrap_is_narrow_when_the_methods_agree_mostly():
    # esm = greedy plus 20 extra right answers: the paired CI is tight around 0.05
    greedy = np.array([1] * 160 + [0] * 240, dtype=float)
    esm = greedy.copy()
    esm[160:180] = 1
    d, lo, hi = stats.paired_bootstrap_delta(esm, greedy, 2000, seed=3)
    assert d == pytest.approx(0.05) and 0 < lo < 0.05 < hi < 0.1


def test_paired_correct_aligns_by_id():
    a = [rec(1, True), rec(2, False), rec(3, True)]
    b = [rec(3, False), rec(1, True)]
    assert stats.paired_correct(a, b) == ([1.0, 1.0], [1.0, 0.0])
