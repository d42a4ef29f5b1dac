"""Stage II (select): DPP vs top, coverage per control point, seeded random, the library on disk."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from esm_steer.config import ESMConfig
from esm_steer.esm.candidates import Candidate
from esm_steer.esm.library import Library
from esm_steer.esm.mine import write_candidates
from esm_steer.esm.select import mean_pairwise_cosine_distance, run, select_indices
from esm_steer.io import atomic_write_json
from esm_steer.runs import Run, RunError


def pool(C=30, d=16, M=3, seed=0):
    rng = np.random.default_rng(seed)
    Q = np.sort(rng.uniform(0.0, 1.0, C))[::-1].copy()  # rank order, distinct
    V = rng.normal(size=(C, d))
    ms = rng.integers(0, M, C)
    return Q, V, ms


def clustered_pool(d=16, seed=0):
    """The 10 best candidates point (almost) the same way; 10 worse ones are spread out."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=d)
    V = np.concatenate([base + 0.05 * rng.normal(size=(10, d)), rng.normal(size=(10, d))])
    Q = np.concatenate([np.linspace(1.0, 0.9, 10), np.linspace(0.8, 0.7, 10)])
    return Q, V, np.zeros(20, dtype=int)


def test_dpp_tends_to_top_as_lambda_goes_to_zero():
    Q, V, ms = pool()
    top = select_indices(Q, V, ms, 10, "top")
    assert top == list(range(10))
    for lam in (1e-4, 1e-8, 1e-12):  # tiny lambda: no overflow, no NaN
        assert select_indices(Q, V, ms, 10, "dpp", lam) == top


def test_dpp_is_more_diverse_than_top_at_large_lambda():
    Q, V, ms = clustered_pool()
    top = select_indices(Q, V, ms, 5, "top")
    dpp = select_indices(Q, V, ms, 5, "dpp", lam=100.0)
    assert mean_pairwise_cosine_distance(V[dpp]) > mean_pairwise_cosine_distance(V[top]) + 0.3
    # and diversity grows with lambda
    mid = select_indices(Q, V, ms, 5, "dpp", lam=0.01)
    assert mean_pairwise_cosine_distance(V[mid]) <= mean_pairwise_cosine_distance(V[dpp])


def test_dpp_greedy_matches_brute_force_log_det():
    Q, V, ms = pool(C=12, d=6)
    lam = 0.3
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    q = np.exp(Q / (2 * lam))
    L = q[:, None] * (U @ U.T) * q[None, :]
    chosen: list[int] = []
    for _ in range(5):
        best = max(
            (i for i in range(12) if i not in chosen),
            key=lambda i: np.linalg.slogdet(L[np.ix_(chosen + [i], chosen + [i])])[1],
        )
        chosen.append(best)
    assert select_indices(Q, V, ms, 5, "dpp", lam) == chosen


@pytest.mark.parametrize("method", ["dpp", "top", "random"])
def test_min_per_control_point_is_honoured(method):
    Q, V, ms = pool(C=20, M=3)
    ms = np.zeros(20, dtype=int)
    ms[[17, 19]] = 2  # m=2 only among the worst
    ms[[15]] = 1
    chosen = select_indices(Q, V, ms, 6, method, lam=1e-6, min_per_control_point=1, M=3, seed=1)
    assert len(chosen) == len(set(chosen)) == 6
    assert {int(ms[j]) for j in chosen} == {0, 1, 2}
    if method in ("dpp", "top"):
        assert 17 in chosen and 15 in chosen  # the best of m = 2 and of m = 1


def test_min_per_control_point_unmeetable_names_the_m():
    Q, V, _ = pool(C=6)
    ms = np.array([0, 0, 0, 1, 1, 0])
    with pytest.raises(RunError, match=r"m=2 has 0") as e:
        select_indices(Q, V, ms, 4, "dpp", min_per_control_point=1, M=3)
    assert "\n" not in str(e.value)
    with pytest.raises(RunError, match=r"m=1 has 2"):
        select_indices(Q, V, ms, 5, "top", min_per_control_point=3, M=2)


def test_random_is_seeded():
    Q, V, ms = pool()
    a = select_indices(Q, V, ms, 8, "random", seed=3)
    assert a == select_indices(Q, V, ms, 8, "random", seed=3)
    assert a != select_indices(Q, V, ms, 8, "random", seed=4)
    assert len(set(a)) == 8


def test_dependent_vectors_fall_back_to_quality():
    Q = np.array([0.9, 0.8, 0.7, 0.6])
    V = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # rank 2, one zero vector
    assert sorted(select_indices(Q, V, np.zeros(4, int), 3, "dpp", lam=10.0)) == [0, 1, 2]


# ---------------------------------------------------------------- the stage


def make_run(tmp_path, C=10, d=8, **over):
    cfg = OmegaConf.structured(ESMConfig)
    for k, v in {
        "control_points.M": 2,
        "offline_select.B": 4,
        "offline_select.min_per_control_point": 1,
        **over,
    }.items():
        OmegaConf.update(cfg, k, v, merge=False)
    run_dir = tmp_path / "debug" / "r1"
    mine_dir = run_dir / "mine"
    g = torch.Generator().manual_seed(0)
    cands = []
    for i in range(C):
        states = torch.randn(3, d, generator=g)
        cands.append(
            Candidate(
                f"q{i}", i % 2, 1.0 - 0.05 * i, torch.randn(d, generator=g), states.mean(0), states, 2, 1, f"c{i:05d}"
            )
        )
    write_candidates(mine_dir, cands)
    atomic_write_json(mine_dir / "summary.json", {"model_id": "fake", "steer_layer": 1, "hidden_size": d})
    return cfg, Run(run_dir, cfg), cands


def test_select_stage_writes_the_library(tmp_path):
    cfg, r, cands = make_run(tmp_path)
    run(cfg, r)
    lib = Library.load(r.dir)
    assert len(lib) == 4 and [t.tool_id for t in lib] == ["t0000", "t0001", "t0002", "t0003"]
    assert {t.m for t in lib} == {0, 1}
    assert lib.meta["model_id"] == "fake" and lib.meta["steer_layer"] == 1 and lib.meta["hidden_size"] == 8
    assert "created" in lib.meta
    t = lib.by_id("t0000")
    c = next(c for c in cands if c.id == t.meta["candidate_id"])
    assert torch.equal(t.vector, c.vector) and torch.equal(t.states, c.states) and torch.equal(t.key, c.key)
    assert [x.Q for x in lib.top_by_q(2)] == sorted((x.Q for x in lib), reverse=True)[:2]
    assert (tmp_path / "debug" / "LATEST").read_text().strip() == "r1"
    for name in ("library.jsonl", "meta.json"):
        assert (r.dir / "library" / name).exists()
    # a rerun with a smaller B leaves no stale tool files
    OmegaConf.update(cfg, "offline_select.B", 2)
    run(cfg, r)
    assert len(list((r.dir / "library" / "vectors").glob("*.pt"))) == 2


def test_select_B_larger_than_pool_takes_all_with_a_warning(tmp_path, caplog):
    cfg, r, cands = make_run(tmp_path, C=5, **{"offline_select.B": 50})
    with caplog.at_level(logging.WARNING):
        run(cfg, r)
    assert len(Library.load(r.dir)) == 5
    assert any("B=50" in rec.getMessage() for rec in caplog.records)


def test_select_without_mine_names_the_missing_file(tmp_path):
    cfg = OmegaConf.structured(ESMConfig)
    with pytest.raises(RunError, match=r"candidates.jsonl.*esm-mine"):
        run(cfg, Run(tmp_path, cfg))
    with pytest.raises(RunError, match=r"library.jsonl.*esm-select"):
        Library.load(tmp_path)


def test_q_is_not_scaled_by_norm():
    # a large-norm vector with lower Q does not beat a small-norm one with higher Q under top/dpp(λ→0)
    Q = np.array([0.9, 0.5])
    V = np.array([[1e-3, 0.0], [1e3, 1.0]])
    assert select_indices(Q, V, np.zeros(2, int), 1, "dpp", lam=1e-3) == [0]
    assert math.isclose(mean_pairwise_cosine_distance(V[[0]]), 0.0)
