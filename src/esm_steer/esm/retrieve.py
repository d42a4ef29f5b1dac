"""Retrieval, gating and the advantage estimate Â of the online ESM policy (docs/method.md, "Online").

Pure numpy, no model: given the memory's search result for one control point, drop weak
entries, apply the ``min_entries`` gate, group the surviving entries by tool and estimate

    Â_i = (sim-weighted mean of Q over tool i's retrieved entries) · (tool i's best sim).

Null anchors (entries without a tool, ``offline_memory.null_anchors``) give null its own
Â_null = max over the retrieved anchors of sim · Q (STIR), recorded for ``online.null_score``.

Kept apart from :mod:`esm_steer.esm.online` so that the decode loop reads as a loop and the
arithmetic can be checked on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# Gate values recorded per step (also used by the eval report's diagnostics).
GATE_OK = "ok"
GATE_MIN_SIM = "min_sim"  # entries were retrieved, but min_sim left fewer than min_entries
GATE_MIN_ENTRIES = "min_entries"  # the memory returned fewer than min_entries at all
GATE_TAU_NULL = "tau_null"  # the best score fell below tau_null
GATE_NO_TOOLS = "no_tools"  # nothing to choose from (empty memory / library, or min_entries=0 and none kept)


@dataclass
class Retrieval:
    """What one control point's retrieval produced."""

    retrieved: list[tuple[str, float]]  # (tool_id, sim) of every entry returned, best first
    num_kept: int  # entries with sim >= min_sim
    gate: str  # GATE_OK or the gate that forced null
    tools: list[tuple[str, float]] = field(default_factory=list)  # (tool_id, Â), Â descending
    null_A_hat: float = 0.0  # max sim·Q over the kept null anchors (0 without any)


def a_hat(sims: Sequence[float], qs: Sequence[float]) -> float:
    """Â of one tool from its retrieved entries: sim-weighted mean Q times the best sim.

    Weights are the sims clipped at 0 (a negative cosine is no evidence for the tool); when
    every weight is 0 the mean falls back to the plain mean.
    """
    s = np.asarray(sims, dtype=np.float64)
    q = np.asarray(qs, dtype=np.float64)
    w = np.clip(s, 0.0, None)
    mean_q = float((w * q).sum() / w.sum()) if w.sum() > 0 else float(q.mean())
    return mean_q * float(s.max())


def aggregate(
    sims: np.ndarray,
    idx: np.ndarray,
    entries: Sequence[dict],
    min_sim: float,
    min_entries: int,
) -> Retrieval:
    """Gate and group one query's search result ``sims [k]``, ``idx [k]`` (idx -1: no entry).

    Tools are ordered by Â descending; ties keep the order of their best entry.
    """
    retrieved: list[tuple[str | None, float]] = []
    kept: list[tuple[str | None, float, float]] = []  # (tool_id, sim, Q); tool None: a null anchor
    for s, i in zip(np.asarray(sims).tolist(), np.asarray(idx).tolist()):
        if i < 0:
            continue
        e = entries[i]
        retrieved.append((e["tool_id"], float(s)))
        if s >= min_sim:
            kept.append((e["tool_id"], float(s), float(e["Q"])))

    if len(kept) < min_entries:
        gate = GATE_MIN_SIM if len(retrieved) >= min_entries else GATE_MIN_ENTRIES
        return Retrieval(retrieved, len(kept), gate)
    anchors = [s * q for tool_id, s, q in kept if tool_id is None]
    null_a = max(anchors) if anchors else 0.0
    if not any(tool_id is not None for tool_id, _, _ in kept):
        return Retrieval(retrieved, len(kept), GATE_NO_TOOLS, null_A_hat=null_a)

    by_tool: dict[str, tuple[list[float], list[float]]] = {}
    for tool_id, s, q in kept:  # dict keeps first-seen (= best-sim) order
        if tool_id is None:
            continue
        by_tool.setdefault(tool_id, ([], []))
        by_tool[tool_id][0].append(s)
        by_tool[tool_id][1].append(q)
    tools = [(t, a_hat(ss, qs)) for t, (ss, qs) in by_tool.items()]
    tools.sort(key=lambda ta: -ta[1])  # stable: ties keep best-sim order
    return Retrieval(retrieved, len(kept), GATE_OK, tools, null_a)
