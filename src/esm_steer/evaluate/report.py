"""The result tables eval writes (``tables/main_results_single.csv``, ``tables/ablation.csv``):
one row per method with accuracy, its Wilson CI, budget and the paired delta against greedy,
and their fixed-width rendering for the log (methods and ablations: docs/method.md, Online).

The statistics are in :mod:`esm_steer.evaluate.stats`; diagnostics, figures and case files in
:mod:`~esm_steer.evaluate.diagnostics`, :mod:`~esm_steer.evaluate.figures` and
:mod:`~esm_steer.evaluate.case_markdown`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esm_steer.config import BASELINE
from esm_steer.evaluate.stats import paired_bootstrap_delta, paired_correct, summarize
from esm_steer.io import atomic_save

TABLE_COLUMNS = [
    "dataset",
    "model",
    "method",
    "T_max",
    "n",
    "accuracy",
    "ci_low",
    "ci_high",
    "mean_tokens",
    "mean_budget",
    "truncation_rate",
    "n_errors",
    "probe_overhead",
    "wall_s",
    "delta_vs_greedy",
    "delta_ci_low",
    "delta_ci_high",
]


def results_table(
    by_method: Mapping[str, Sequence[dict]],
    methods: Sequence[str],
    dataset: str,
    model: str,
    t_max: int,
    bootstrap_samples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per method (in order) with TABLE_COLUMNS; the steered rows also get the paired
    bootstrap CI of accuracy − accuracy(greedy) when greedy ran."""
    rows = []
    for m in methods:
        recs = by_method.get(m, [])
        row: dict[str, Any] = {"dataset": dataset, "model": model, "method": m, "T_max": int(t_max)}
        row.update(summarize(recs))
        row.update(delta_vs_greedy=math.nan, delta_ci_low=math.nan, delta_ci_high=math.nan)
        if m != BASELINE and by_method.get(BASELINE):
            a, b = paired_correct(recs, by_method[BASELINE])
            d, lo, hi = paired_bootstrap_delta(a, b, bootstrap_samples, seed)
            row.update(delta_vs_greedy=d, delta_ci_low=lo, delta_ci_high=hi)
        rows.append(row)
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """A table as csv, atomically, floats to 6 significant digits (every table of eval and suite)."""
    return atomic_save(path, lambda p: df.to_csv(p, index=False, float_format="%.6g"))


def format_table(df: pd.DataFrame) -> str:
    """A compact fixed-width text table for the log."""
    # the table's columns, less those the header line names once (and n_errors: 0 in a good run)
    cols = [c for c in TABLE_COLUMNS if c not in ("dataset", "model", "T_max", "n_errors")]
    short = {
        "truncation_rate": "trunc",
        "probe_overhead": "probe/used",
        "mean_tokens": "tokens",
        "mean_budget": "budget",
        "delta_vs_greedy": "Δ_greedy",
        "delta_ci_low": "Δ_lo",
        "delta_ci_high": "Δ_hi",
        "accuracy": "acc",
        "ci_low": "acc_lo",
        "ci_high": "acc_hi",
    }

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "-" if math.isnan(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cols = [c for c in cols if c in df.columns]
    cells = [[short.get(c, c) for c in cols]] + [[fmt(r[c]) for c in cols] for _, r in df.iterrows()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(row, widths))) for row in cells]
    if len(df):
        r0 = df.iloc[0]
        lines.insert(0, f"dataset={r0['dataset']}  model={r0['model']}  T_max={r0['T_max']}")
    return "\n".join(lines)
