"""Stage II (select): choose B of the mined candidates as the library.

Methods (``offline_select.method``):

- ``top``    the B of highest Q (ties: question id, m).
- ``random`` B drawn uniformly, seeded by cfg.seed.
- ``dpp``    greedy MAP of the DPP with kernel L = diag(q) S diag(q), S_ij = cosine(v_i, v_j),
             q_i = exp(Q_i / (2·lambda_diversity)) (docs/method.md, Stage II), with the fast incremental
             Cholesky of Chen et al. (2018), O(B²·C).

Every method first fills ``min_per_control_point`` tools per control point m = 0..M−1 (DPP: by
the same greedy gain restricted to that m; top: by Q; random: at random), then the rest.

The DPP's greedy gain of adding i to the set Y is log det L_{Y+i} − log det L_Y
= 2·log q_i + log(S_ii − S_iY S_Y⁻¹ S_Yi) = (Q_i − max Q)/λ + log d_i², so the Cholesky runs on
the cosine kernel S (entries in [−1, 1]) and the quality enters in log space: nothing
overflows for any λ, and as λ → 0 the quality term dominates and the choice is ``top``
(up to exact ties in Q, which the DPP breaks towards diversity).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from esm_steer.esm import artifacts
from esm_steer.esm.candidates import Candidate
from esm_steer.esm.library import Library, Tool, now_iso, tool_id
from esm_steer.runs import RunError, write_latest

log = logging.getLogger(__name__)

_EPS = 1e-9  # residual variance below this: v_i lies in the span of the chosen vectors


class _GreedyDPP:
    """Incremental Cholesky state of the fast greedy MAP (Chen et al. 2018, Alg. 1)."""

    def __init__(self, Q: np.ndarray, V: np.ndarray, lam: float, capacity: int):
        norms = np.linalg.norm(V, axis=1, keepdims=True)
        self.U = np.divide(V, norms, out=np.zeros_like(V), where=norms > 0)  # S = U Uᵀ
        self.log_q2 = (Q - Q.max()) / lam  # 2·log q_i, shifted by a constant (no overflow)
        self.d2 = (self.U * self.U).sum(1)  # residual S_ii − S_iY S_Y⁻¹ S_Yi; 1 (0 for v = 0)
        self.c = np.zeros((len(Q), capacity))
        self.k = 0

    def gains(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.where(self.d2 > _EPS, self.log_q2 + np.log(np.maximum(self.d2, _EPS)), -np.inf)

    def add(self, j: int) -> None:
        if self.d2[j] > _EPS:
            e = (self.U @ self.U[j] - self.c[:, : self.k] @ self.c[j, : self.k]) / math.sqrt(self.d2[j])
        else:  # a dependent vector taken as a fallback adds no direction
            e = np.zeros(len(self.d2))
        self.c[:, self.k] = e
        self.d2 = self.d2 - e * e
        self.d2[j] = 0.0
        self.k += 1


def _coverage_check(ms: np.ndarray, M: int, min_per: int, first_m: int = 0) -> None:
    if min_per <= 0:
        return
    counts = np.bincount(ms[ms < M], minlength=M) if len(ms) else np.zeros(M, dtype=int)
    short = [f"m={m} has {counts[m]}" for m in range(first_m, M) if counts[m] < min_per]
    if short:
        raise RunError(
            f"offline_select.min_per_control_point={min_per} cannot be met: {', '.join(short)} candidate(s) "
            f"of {len(ms)}; lower min_per_control_point or control_points.M, or mine more questions"
        )


def select_indices(
    Q: Sequence[float],
    V: np.ndarray | None,
    ms: Sequence[int],
    B: int,
    method: str = "dpp",
    lam: float = 0.5,
    min_per_control_point: int = 0,
    M: int | None = None,
    seed: int = 0,
    first_m: int = 0,
) -> list[int]:
    """Indices of the chosen candidates, in the order chosen. The candidates must come in
    rank order (−Q, question id, m) so that index order breaks ties as ``top`` does."""
    Q = np.asarray(Q, dtype=np.float64)
    ms = np.asarray(ms, dtype=np.int64)
    C = len(Q)
    M = int(ms.max()) + 1 if M is None and C else int(M or 0)
    _coverage_check(ms, M, min_per_control_point, first_m)  # m < first_m is never mined
    if B >= C:
        return list(range(C))
    chosen: list[int] = []
    free = np.ones(C, dtype=bool)

    if method == "top":
        score = lambda: -np.arange(C, dtype=np.float64)  # noqa: E731 - rank order is Q order
    elif method == "random":
        rng = np.random.default_rng(seed)
        keys = rng.permutation(C).astype(np.float64)
        score = lambda: keys  # noqa: E731 - a seeded random priority
    elif method == "dpp":
        if V is None:
            raise ValueError("dpp needs the vectors V")
        dpp = _GreedyDPP(Q, np.asarray(V, dtype=np.float64), float(lam), B)
        score = dpp.gains
    else:
        raise ValueError(f"offline_select.method={method!r}: one of dpp, top, random")

    def take(mask: np.ndarray) -> None:
        s = np.where(mask & free, score(), -np.inf)
        if not np.isfinite(s).any():  # DPP: every left vector is dependent; fall back to Q
            s = np.where(mask & free, -np.arange(C, dtype=np.float64), -np.inf)
        j = int(np.argmax(s))  # first maximum: lower index (higher rank) wins ties
        chosen.append(j)
        free[j] = False
        if method == "dpp":
            dpp.add(j)

    for m in range(first_m, M):  # coverage first
        for _ in range(min_per_control_point):
            take(ms == m)
    everything = np.ones(C, dtype=bool)
    while len(chosen) < B:
        take(everything)
    return chosen


def mean_pairwise_cosine_distance(V: np.ndarray) -> float:
    """Mean of 1 − cos(v_i, v_j) over pairs i < j (0 for fewer than 2 vectors)."""
    V = np.asarray(V, dtype=np.float64)
    if len(V) < 2:
        return 0.0
    norms = np.linalg.norm(V, axis=1, keepdims=True)
    U = np.divide(V, norms, out=np.zeros_like(V), where=norms > 0)
    S = U @ U.T
    iu = np.triu_indices(len(V), 1)
    return float(np.mean(1.0 - S[iu]))


def build_library(cands: Sequence[Candidate], chosen: Sequence[int], meta: dict) -> Library:
    """Tools in rank order (−Q, question id, m), ids t0000...; meta keeps the choice order."""
    order = {j: r for r, j in enumerate(chosen)}
    picked = sorted(chosen, key=lambda j: cands[j].rank_key())
    tools = []
    for i, j in enumerate(picked):
        c = cands[j]
        tools.append(
            Tool(
                tool_id=tool_id(i),
                question_id=c.question_id,
                m=c.m,
                Q=c.Q,
                vector=c.vector,
                key=c.key,
                states=c.states,
                meta={"candidate_id": c.id, "select_rank": order[j], "n_pos": c.n_pos, "n_neg": c.n_neg},
            )
        )
    return Library(tools, meta)


def run(cfg: DictConfig, run, engine=None) -> None:
    """esm-select (no model: ``engine`` is accepted for the one stage signature and unused)."""
    sc = cfg.offline_select
    cands, mine_summary = artifacts.load_candidates(run.dir)
    if not cands:
        path = run.path(artifacts.MINE_DIR, artifacts.CANDIDATES)
        raise RunError(
            f"{path} has no candidates (skipped: {mine_summary.get('skipped')}); mine more questions or rollouts"
        )
    cands = sorted(cands, key=Candidate.rank_key)
    B, C = int(sc.B), len(cands)
    if B >= C:
        log.warning("select: offline_select.B=%d >= %d candidates: the library is all of them", B, C)
    V = torch.stack([c.vector for c in cands]).float().numpy()
    chosen = select_indices(
        [c.Q for c in cands],
        V,
        [c.m for c in cands],
        B,
        str(sc.method),
        float(sc.lambda_diversity),
        int(sc.min_per_control_point),
        int(cfg.control_points.M),
        int(cfg.seed),
        int(cfg.control_points.first_m),
    )
    div = mean_pairwise_cosine_distance(V[chosen])
    meta = {
        "model_id": mine_summary["model_id"],
        "steer_layer": mine_summary["steer_layer"],
        "dtype": mine_summary.get("dtype"),  # the dtype the states were mined at
        "hidden_size": mine_summary["hidden_size"],
        "created": now_iso(),
        "method": str(sc.method),
        "B": B,
        "lambda_diversity": float(sc.lambda_diversity),
        "min_per_control_point": int(sc.min_per_control_point),
        "seed": int(cfg.seed),
        "n_candidates": C,
        "mean_Q": float(np.mean([cands[j].Q for j in chosen])),
        "mean_pairwise_cosine_distance": div,
    }
    lib = build_library(cands, chosen, meta)
    lib.save(run.dir)
    per_m: dict[int, int] = {}
    for t in lib.tools:
        per_m[t.m] = per_m.get(t.m, 0) + 1
    log.info(
        "select: %s chose %d of %d candidates; per m %s; mean Q %.4f (pool %.4f); mean pairwise cosine distance %.4f",
        sc.method,
        len(lib),
        C,
        dict(sorted(per_m.items())),
        meta["mean_Q"],
        float(np.mean([c.Q for c in cands])),
        div,
    )
    write_latest(run.dir)
