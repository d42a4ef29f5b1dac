"""Statistics of per-example records: Wilson CIs of accuracy, the paired bootstrap of a
difference against the baseline, and the per-method summary behind every table row.

Pure functions of the records (lists of dicts as in :mod:`esm_steer.evaluate.records`), so
they are tested on hand-made records and re-runnable on any ``per_example.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sane at 0, 1 and small n)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # exact ends at k = 0 and k = n (the formula leaves ~1e-17 of rounding there)
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def paired_bootstrap_delta(
    a: Sequence[float], b: Sequence[float], samples: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(mean(a) − mean(b), low, high): percentile CI from resampling example indices, the same
    indices for both (paired: per-example correlation of the methods narrows the interval)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs equal lengths, got {a.shape} and {b.shape}")
    if a.size == 0:
        return (math.nan, math.nan, math.nan)
    diff = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(samples, diff.size))
    boot = diff[idx].mean(axis=1)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return (float(diff.mean()), float(lo), float(hi))


def paired_correct(recs_a: Sequence[dict], recs_b: Sequence[dict]) -> tuple[list[float], list[float]]:
    """Correctness of the examples both methods answered, aligned by id."""
    b_by_id = {r["id"]: r for r in recs_b}
    ids = [r["id"] for r in recs_a if r["id"] in b_by_id]
    a_by_id = {r["id"]: r for r in recs_a}
    return [float(a_by_id[i]["correct"]) for i in ids], [float(b_by_id[i]["correct"]) for i in ids]


def is_truncated(r: dict) -> bool:
    return r.get("finish_reason") == "length"


def summarize(records: Sequence[dict]) -> dict:
    """accuracy with its Wilson CI, mean tokens, truncation rate, errors, probe overhead, wall s."""
    n = len(records)
    k = sum(bool(r["correct"]) for r in records)
    lo, hi = wilson_ci(k, n)
    used = sum(r["tokens_used"] for r in records)
    probe = sum(r.get("probe_tokens_used", 0) for r in records)
    return {
        "n": n,
        "accuracy": k / n if n else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "mean_tokens": used / n if n else math.nan,
        # kept + probe tokens: the compute a method spent (greedy: = mean_tokens)
        "mean_budget": sum(r.get("budget_used", r["tokens_used"]) for r in records) / n if n else math.nan,
        "truncation_rate": sum(is_truncated(r) for r in records) / n if n else math.nan,
        "n_errors": sum(r.get("finish_reason") == "error" for r in records),
        "probe_overhead": probe / used if used else 0.0,
        "wall_s": float(sum(r.get("wall_s", 0.0) for r in records)),
    }
