"""Per-method diagnostics of an eval run (``tables/diagnostics_T<T>.csv|json``): truncation,
token and probe statistics, null rate, retrieval similarities, gate hits, chosen tools, and
whether steering acts at all against greedy (docs/method.md, Online).

Pure functions of the records (lists of dicts as in :mod:`esm_steer.evaluate.records`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esm_steer.config import BASELINE
from esm_steer.evaluate.report import write_csv
from esm_steer.evaluate.stats import is_truncated
from esm_steer.io import atomic_write_json


def describe(values: Iterable[float]) -> dict:
    """mean, median, p90 and max (all None when there are no values)."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return {"mean": None, "median": None, "p90": None, "max": None}
    return {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "p90": float(np.quantile(v, 0.9)),
        "max": float(v.max()),
    }


def versus_greedy(records: Sequence[dict], greedy: Sequence[dict] | None) -> dict:
    """Does steering act? Over the examples both ran (by id): the share whose token_ids differ
    from greedy's (None when either lacks token_ids), and the paired flips of correctness."""
    out: dict[str, Any] = {
        "differ_from_greedy": None,
        "flips_greedy_right_to_wrong": None,
        "flips_greedy_wrong_to_right": None,
    }
    if not greedy:
        return out
    g_by_id = {r["id"]: r for r in greedy}
    pairs = [(r, g_by_id[r["id"]]) for r in records if r["id"] in g_by_id]
    with_ids = [(r, g) for r, g in pairs if r.get("token_ids") is not None and g.get("token_ids") is not None]
    if with_ids:
        differ = sum(list(r["token_ids"]) != list(g["token_ids"]) for r, g in with_ids)
        out["differ_from_greedy"] = differ / len(with_ids)
    out["flips_greedy_right_to_wrong"] = sum(bool(g["correct"]) and not r["correct"] for r, g in pairs)
    out["flips_greedy_wrong_to_right"] = sum(not g["correct"] and bool(r["correct"]) for r, g in pairs)
    return out


def probe_gaps(steps: Sequence[dict]) -> list[float]:
    """|logprob_i − logprob_null| of every probed tool candidate (null is candidates[0])."""
    out = []
    for s in steps:
        cands = s.get("candidates") or []
        null = next((c for c in cands if c.get("tool") is None), None)
        if null is None or null.get("logprob") is None:
            continue
        out += [
            abs(float(c["logprob"]) - float(null["logprob"]))
            for c in cands
            if c.get("tool") is not None and c.get("logprob") is not None
        ]
    return out


def inject_ratios(steps: Sequence[dict]) -> list[float]:
    """‖k_scale·Score·v‖ / ‖h_ℓ‖ of every step that injected a vector (h_ℓ: the key, unsteered)."""
    return [
        float(s["inject_norm"]) / float(s["h_norm"])
        for s in steps
        if (s.get("inject_norm") or 0) > 0 and (s.get("h_norm") or 0) > 0
    ]


def diagnose(records: Sequence[dict], greedy: Sequence[dict] | None = None) -> dict:
    """Per-method diagnostics: truncation, token and probe statistics, null rate (steps whose
    choice is null / steps), retrieval similarities, gate hits, chosen tools; and whether
    steering acts: tokens differing from ``greedy``'s, paired flips, |logprob_i − logprob_null|
    of the probes, ‖injected vector‖ / ‖h_ℓ‖."""
    steps = [s for r in records for s in (r.get("steps") or [])]
    sims = [float(x[1]) for s in steps for x in (s.get("retrieved") or []) if len(x) > 1 and x[1] is not None]
    top1 = [float(s["retrieved"][0][1]) for s in steps if s.get("retrieved")]
    used = sum(r["tokens_used"] for r in records)
    probe = sum(r.get("probe_tokens_used", 0) for r in records)
    n = len(records)
    gates = Counter(str(s.get("gate")) for s in steps if s.get("gate") is not None)
    chosen = Counter(str(s["chosen"]) for s in steps if s.get("chosen") is not None)
    nulls = sum(s.get("chosen") is None for s in steps)
    return {
        "n": n,
        "accuracy": sum(bool(r["correct"]) for r in records) / n if n else None,
        "truncation_rate": sum(is_truncated(r) for r in records) / n if n else None,
        "errors": sum(r.get("finish_reason") == "error" for r in records),
        "empty_responses": sum(not (r.get("response") or "").strip() for r in records),
        "tokens": describe(r["tokens_used"] for r in records),
        "probe_tokens": describe(r.get("probe_tokens_used", 0) for r in records),
        "budget": describe(r.get("budget_used", r["tokens_used"]) for r in records),
        "probe_overhead": probe / used if used else 0.0,
        "steps_total": len(steps),
        "steps_per_example": len(steps) / n if n else None,
        "null_steps": nulls,
        "null_rate": nulls / len(steps) if steps else None,
        "retrieval_sim": describe(sims),
        "retrieval_top1_sim": describe(top1),
        **versus_greedy(records, greedy),
        "probe_logprob_gap": describe(probe_gaps(steps)),
        "inject_ratio": describe(inject_ratios(steps)),
        "gate_hits": dict(sorted(gates.items())),
        "chosen_tools": dict(chosen.most_common(20)),
    }


def diagnostics_frame(diag: Mapping[str, dict]) -> pd.DataFrame:
    """One flat row per method (nested stats become ``tokens_mean``, ``gate_<name>`` ...)."""
    rows = []
    for method, d in diag.items():
        row: dict[str, Any] = {"method": method}
        for k, v in d.items():
            if k == "chosen_tools":
                continue
            if k == "gate_hits":
                row.update({f"gate_{g}": c for g, c in v.items()})
            elif isinstance(v, dict):
                row.update({f"{k}_{s}": x for s, x in v.items()})
            else:
                row[k] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    gate_cols = [c for c in df.columns if c.startswith("gate_")]
    df[gate_cols] = df[gate_cols].fillna(0).astype(int)
    return df


def write_diagnostics(
    by_method: Mapping[str, Sequence[dict]], out_dir: str | Path, t_max: int, extra: dict | None = None
) -> dict[str, dict]:
    """``<out_dir>/diagnostics_T<T>.csv`` (one row per method) and ``.json`` (nested, with
    ``extra``); returns {method: diagnostics}, each non-greedy method compared with greedy."""
    greedy = by_method.get(BASELINE)
    diag = {m: diagnose(r, greedy if m != BASELINE else None) for m, r in by_method.items()}
    out_dir = Path(out_dir)
    write_csv(diagnostics_frame(diag), out_dir / f"diagnostics_T{t_max}.csv")
    atomic_write_json(out_dir / f"diagnostics_T{t_max}.json", {"T_max": t_max, **(extra or {}), "methods": diag})
    return diag
