"""The online policy's rules without decoding (docs/method.md, "Online"): candidates, scores,
the choice with its gates, the static baseline's vector, and the run summary.

:mod:`.online` drives a decode batch with these; this module knows nothing of engines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from esm_steer.esm.retrieve import GATE_TAU_NULL

STATIC_VECTORS = ("top", "mean")
STATIC_MEAN = "mean"  # the chosen "tool" of static with online.static_vector=mean
CANDIDATE_KEYS = ("tool", "A_hat", "logprob", "score", "probe_token_ids", "eos")  # recorded per candidate


@dataclass
class OnlineResult:
    """One example's steered response and what the policy did at each control point."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    tokens_used: int  # kept response tokens (<= T_max)
    probe_tokens_used: int  # tokens decoded by losing probes (thrown away)
    budget_used: int  # tokens_used + probe_tokens_used
    # one per control point: {"m", "offset", "retrieved": [[tool_id, sim]], "num_kept",
    # "gate", "candidates": [{"tool", "A_hat", "logprob", "score", "probe_token_ids", "eos"}],
    # "chosen", "scale", "h_norm", "inject_norm"}
    steps: list[dict] = field(default_factory=list)


def candidates_of(tools: Sequence[tuple[str, float]], null_A_hat: float = 0.0) -> list[dict]:
    """[null, tool_1, ..., tool_L] from (tool_id, Â) pairs; null's Â is 0 unless its anchors
    gave one (``online.null_score=anchors``)."""
    return [{"tool": None, "A_hat": float(null_A_hat)}] + [{"tool": t, "A_hat": float(a)} for t, a in tools]


def score(candidates: list[dict], beta: float, rho: float, logprobs: Sequence[float] | None = None) -> None:
    """Score_i = beta·Â_i + rho·(logprob_i − logprob_null); null scores beta·Â_null (0 without
    anchors). Without `logprobs` (no_probing) Score_i = beta·Â_i. Written into the candidates."""
    lp_null = logprobs[0] if logprobs is not None else 0.0
    for j, c in enumerate(candidates):
        c["logprob"] = logprobs[j] if logprobs is not None else None
        probe = rho * (logprobs[j] - lp_null) if logprobs is not None else 0.0
        c["score"] = beta * c["A_hat"] + probe


def choose(candidates: list[dict], tau_null: float) -> tuple[int, str | None]:
    """Index of the best-scoring candidate (null, index 0, wins ties) and the gate that sent a
    tool below ``tau_null`` back to null (None when not gated)."""
    best = 0
    for j in range(1, len(candidates)):
        if candidates[j]["score"] > candidates[best]["score"]:
            best = j
    if best != 0 and candidates[best]["score"] < tau_null:
        return 0, GATE_TAU_NULL
    return best, None


def record_choice(step: dict, candidates: list[dict], chosen: dict, scale: float, inject_norm: float) -> None:
    step["candidates"] = [{k: c.get(k) for k in CANDIDATE_KEYS if k in c} for c in candidates]
    step["chosen"] = chosen["tool"]
    step["scale"] = float(scale)
    step["inject_norm"] = float(inject_norm)


def static_vector(library, how: str) -> tuple[str | None, torch.Tensor | None]:
    """static: (the fixed tool's id, None) for ``top``; (STATIC_MEAN, the Q-weighted mean vector)
    for ``mean``, Q clipped at 0 (a tool that hurts is no weight), the plain mean when every
    Q <= 0; (None, None) for an empty library."""
    if how not in STATIC_VECTORS:
        raise ValueError(f"online.static_vector={how!r}: one of {', '.join(STATIC_VECTORS)}")
    tools = list(library.tools)
    if not tools:
        return None, None
    if how == "top":
        return max(tools, key=lambda t: float(t.Q)).tool_id, None
    vs = torch.stack([torch.as_tensor(t.vector).detach().float().cpu().reshape(-1) for t in tools])
    w = torch.tensor([max(float(t.Q), 0.0) for t in tools])
    w = w / w.sum() if float(w.sum()) > 0 else torch.full((len(tools),), 1.0 / len(tools))
    return STATIC_MEAN, (w[:, None] * vs).sum(0)


def summarize(results: Sequence[OnlineResult]) -> dict[str, Any]:
    """Aggregate counters of a run (logged by the benchmark; handy for diagnostics)."""
    steps = [s for r in results for s in r.steps]
    used = sum(r.tokens_used for r in results)
    probe = sum(r.probe_tokens_used for r in results)
    gates: dict[str, int] = {}
    for s in steps:
        gates[s["gate"]] = gates.get(s["gate"], 0) + 1
    return {
        "examples": len(results),
        "control_points": len(steps),
        "null_rate": (sum(s["chosen"] is None for s in steps) / len(steps)) if steps else math.nan,
        "gates": gates,
        "tokens_used": used,
        "probe_tokens_used": probe,
        "probe_overhead": probe / used if used else math.nan,
    }
