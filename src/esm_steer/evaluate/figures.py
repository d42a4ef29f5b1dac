"""The figures eval writes under ``figures/``: response lengths, accuracy against budget, and
whether steering acts (docs/method.md, Online).

Drawn on :class:`matplotlib.figure.Figure` objects, not pyplot: no backend or global figure
state, so a worker without a display draws them and nothing has to be closed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from esm_steer.config import BASELINE
from esm_steer.evaluate.stats import summarize
from esm_steer.io import atomic_save


def save_pdf_png(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """``<out_dir>/<stem>.pdf`` and ``.png``, each written atomically."""
    return [atomic_save(Path(out_dir) / f"{stem}.{ext}", lambda p: fig.savefig(p)) for ext in ("pdf", "png")]


def tokens_histogram(by_method: Mapping[str, Sequence[dict]], out_dir: str | Path, t_max: int) -> list[Path]:
    """Histogram of tokens_used per method (pdf + png), T_max marked."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    t = max(int(t_max), 1)
    bins = np.arange(0, t + 2) - 0.5 if t <= 80 else np.linspace(0, t, 41)  # one bar per token count when few
    styles = ["-", "--", "-.", ":"]
    for i, (m, recs) in enumerate(by_method.items()):
        # step outlines, thickest first and dashed, so that identical histograms stay visible
        ax.hist(
            [r["tokens_used"] for r in recs],
            bins=bins,
            histtype="step",
            linewidth=3.0 - 0.6 * min(i, 3),
            linestyle=styles[i % len(styles)],
            label=f"{m} (n={len(recs)})",
        )
    ax.axvline(t_max, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("tokens used (kept)")
    ax.set_ylabel("examples")
    ax.set_title(f"Response length, T_max={t_max}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_pdf_png(fig, out_dir, f"tokens_hist_T{t_max}")


def budget_points(by_method: Mapping[str, Sequence[dict]]) -> list[dict]:
    """One point per method with records: mean budget (probes counted), accuracy, Wilson CI."""
    pts = []
    for m, recs in by_method.items():
        if recs:
            s = summarize(recs)
            pts.append({"method": m, **{k: s[k] for k in ("mean_budget", "accuracy", "ci_low", "ci_high", "n")}})
    return pts


def acc_vs_budget_figure(points: Sequence[dict], t_max: int) -> Figure:
    """Accuracy (95% Wilson CI) against mean budget, one errorbar per method."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    markers = "osD^vP*X"
    for i, p in enumerate(points):
        err = [[max(0.0, p["accuracy"] - p["ci_low"])], [max(0.0, p["ci_high"] - p["accuracy"])]]
        ax.errorbar(
            [p["mean_budget"]],
            [p["accuracy"]],
            yerr=err,
            fmt=markers[i % len(markers)],
            capsize=4,
            label=f"{p['method']} (n={p['n']})",
        )
    ax.set_xlabel("mean budget (kept + probe tokens)")
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_title(f"Accuracy vs compute, T_max={t_max}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_vs_budget(by_method: Mapping[str, Sequence[dict]], out_dir: str | Path, t_max: int) -> list[Path]:
    """figures/acc_vs_budget_T<T>.pdf|png: every method of the run, accuracy against mean budget."""
    return save_pdf_png(acc_vs_budget_figure(budget_points(by_method), t_max), out_dir, f"acc_vs_budget_T{t_max}")


def steering_diagnostics_figure(diag: Mapping[str, dict], out_dir: str | Path, t_max: int) -> Path | None:
    """figures/steering_diagnostics_T<T>.png: per non-greedy method, the share of responses
    differing from greedy, the paired flips, and the median ‖injected‖/‖h_ℓ‖. None: nothing to draw."""
    methods = [m for m in diag if m != BASELINE]
    if not methods:
        return None
    num = lambda v: math.nan if v is None else float(v)
    x = np.arange(len(methods))
    fig = Figure(figsize=(4 + 2.2 * len(methods), 3.6))
    axes = fig.subplots(1, 3)
    axes[0].bar(x, [num(diag[m].get("differ_from_greedy")) for m in methods], color="tab:blue")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("tokens differ from greedy", fontsize=9)
    w = 0.4
    axes[1].bar(
        x - w / 2,
        [num(diag[m].get("flips_greedy_right_to_wrong")) for m in methods],
        w,
        color="tab:red",
        label="greedy right → wrong",
    )
    axes[1].bar(
        x + w / 2,
        [num(diag[m].get("flips_greedy_wrong_to_right")) for m in methods],
        w,
        color="tab:green",
        label="greedy wrong → right",
    )
    axes[1].set_title("paired flips (examples)", fontsize=9)
    axes[1].legend(fontsize=7)
    axes[2].bar(x, [num((diag[m].get("inject_ratio") or {}).get("median")) for m in methods], color="tab:purple")
    axes[2].set_title("median ‖injected‖ / ‖h_ℓ‖", fontsize=9)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(methods, fontsize=8, rotation=20)
    fig.suptitle(f"Does steering act? T_max={t_max}", fontsize=10)
    fig.tight_layout()
    return atomic_save(Path(out_dir) / f"steering_diagnostics_T{t_max}.png", lambda p: fig.savefig(p, dpi=120))
