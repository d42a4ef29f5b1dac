"""Everything eval writes from per-example records: tables, diagnostics, figures, case files.

Pure functions of the records (lists of dicts as in :mod:`esm_steer.evaluate.records`), so
they are tested on hand-made records and re-runnable on any ``per_example.jsonl``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from esm_steer.io import atomic_save, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

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
# a run whose share of finish_reason=length responses exceeds this ends with a warning naming
# the budget key to raise (eval: decode.max_new_tokens; mine: offline_mine.max_new_tokens)
TRUNCATION_WARN_RATE = 0.2
BASELINE = "greedy"
Z95 = 1.959963984540054


# ---------------------------------------------------------------- statistics


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


def _is_truncated(r: dict) -> bool:
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
        "truncation_rate": sum(_is_truncated(r) for r in records) / n if n else math.nan,
        "n_errors": sum(r.get("finish_reason") == "error" for r in records),
        "probe_overhead": probe / used if used else 0.0,
        "wall_s": float(sum(r.get("wall_s", 0.0) for r in records)),
    }


# ---------------------------------------------------------------- tables


def results_table(
    by_method: Mapping[str, Sequence[dict]],
    methods: Sequence[str],
    dataset: str,
    model: str,
    t_max: int,
    bootstrap_samples: int = 2000,
    seed: int = 0,
    delta_for: Sequence[str] = ("esm", "no_memory", "no_probing", "static"),
):
    """One row per method (in order) with TABLE_COLUMNS; rows in ``delta_for`` also get the
    paired bootstrap CI of accuracy − accuracy(greedy) when greedy ran."""
    import pandas as pd

    rows = []
    for m in methods:
        recs = by_method.get(m, [])
        row: dict[str, Any] = {"dataset": dataset, "model": model, "method": m, "T_max": int(t_max)}
        row.update(summarize(recs))
        row.update(delta_vs_greedy=math.nan, delta_ci_low=math.nan, delta_ci_high=math.nan)
        if m in delta_for and m != BASELINE and by_method.get(BASELINE):
            a, b = paired_correct(recs, by_method[BASELINE])
            d, lo, hi = paired_bootstrap_delta(a, b, bootstrap_samples, seed)
            row.update(delta_vs_greedy=d, delta_ci_low=lo, delta_ci_high=hi)
        rows.append(row)
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def write_csv(df, path: str | Path) -> Path:
    return atomic_save(path, lambda p: df.to_csv(p, index=False, float_format="%.6g"))


def format_table(df) -> str:
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


# ---------------------------------------------------------------- diagnostics


def _stats(values: Sequence[float]) -> dict:
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
        "truncation_rate": sum(_is_truncated(r) for r in records) / n if n else None,
        "errors": sum(r.get("finish_reason") == "error" for r in records),
        "empty_responses": sum(not (r.get("response") or "").strip() for r in records),
        "tokens": _stats(r["tokens_used"] for r in records),
        "probe_tokens": _stats(r.get("probe_tokens_used", 0) for r in records),
        "budget": _stats(r.get("budget_used", r["tokens_used"]) for r in records),
        "probe_overhead": probe / used if used else 0.0,
        "steps_total": len(steps),
        "steps_per_example": len(steps) / n if n else None,
        "null_steps": nulls,
        "null_rate": nulls / len(steps) if steps else None,
        "retrieval_sim": _stats(sims),
        "retrieval_top1_sim": _stats(top1),
        **versus_greedy(records, greedy),
        "probe_logprob_gap": _stats(probe_gaps(steps)),
        "inject_ratio": _stats(inject_ratios(steps)),
        "gate_hits": dict(sorted(gates.items())),
        "chosen_tools": dict(chosen.most_common(20)),
    }


def diagnostics_frame(diag: Mapping[str, dict]):
    """One flat row per method (nested stats become ``tokens_mean``, ``gate_<name>`` ...)."""
    import pandas as pd

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
):
    greedy = by_method.get(BASELINE)
    diag = {m: diagnose(r, greedy if m != BASELINE else None) for m, r in by_method.items()}
    out_dir = Path(out_dir)
    write_csv(diagnostics_frame(diag), out_dir / f"diagnostics_T{t_max}.csv")
    atomic_write_json(out_dir / f"diagnostics_T{t_max}.json", {"T_max": t_max, **(extra or {}), "methods": diag})
    return diag


# ---------------------------------------------------------------- figures


def tokens_histogram(by_method: Mapping[str, Sequence[dict]], out_dir: str | Path, t_max: int) -> list[Path]:
    """Histogram of tokens_used per method (pdf + png), T_max marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
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
    out_dir = Path(out_dir)
    paths = [atomic_save(out_dir / f"tokens_hist_T{t_max}.{ext}", lambda p: fig.savefig(p)) for ext in ("pdf", "png")]
    plt.close(fig)
    return paths


def budget_points(by_method: Mapping[str, Sequence[dict]]) -> list[dict]:
    """One point per method with records: mean budget (probes counted), accuracy, Wilson CI."""
    pts = []
    for m, recs in by_method.items():
        if recs:
            s = summarize(recs)
            pts.append({"method": m, **{k: s[k] for k in ("mean_budget", "accuracy", "ci_low", "ci_high", "n")}})
    return pts


def acc_vs_budget_figure(points: Sequence[dict], t_max: int):
    """Accuracy (95% Wilson CI) against mean budget, one errorbar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
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
    import matplotlib.pyplot as plt

    fig = acc_vs_budget_figure(budget_points(by_method), t_max)
    out_dir = Path(out_dir)
    paths = [atomic_save(out_dir / f"acc_vs_budget_T{t_max}.{ext}", lambda p: fig.savefig(p)) for ext in ("pdf", "png")]
    plt.close(fig)
    return paths


def steering_diagnostics_figure(diag: Mapping[str, dict], out_dir: str | Path, t_max: int) -> Path | None:
    """figures/steering_diagnostics_T<T>.png: per non-greedy method, the share of responses
    differing from greedy, the paired flips, and the median ‖injected‖/‖h_ℓ‖. None: nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in diag if m != BASELINE]
    if not methods:
        return None
    num = lambda v: math.nan if v is None else float(v)  # noqa: E731
    x = np.arange(len(methods))
    fig, axes = plt.subplots(1, 3, figsize=(4 + 2.2 * len(methods), 3.6))
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
    try:
        return atomic_save(Path(out_dir) / f"steering_diagnostics_T{t_max}.png", lambda p: fig.savefig(p, dpi=120))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- case files


def _tool(t: Any) -> str:
    if t is None:
        return "null"
    if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
        return f"t{int(t):04d}"
    return str(t)


def _num(x: Any, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, (float, int, np.floating)) else str(x)


def marker(step: dict) -> str:
    """``⟦m=1 → t0003 ×0.42⟧`` (or ``⟦m=1 → null⟧``) for one control point."""
    if step.get("chosen") is None:
        return f"⟦m={step.get('m')} → null⟧"
    scale = step.get("scale")
    return f"⟦m={step.get('m')} → {_tool(step['chosen'])}" + (f" ×{scale:.2f}⟧" if scale is not None else "⟧")


def mark_response(response: str, steps: Sequence[dict], char_offsets: Sequence[int]) -> str:
    """The response with each step's marker inserted at its char offset (steps in order)."""
    out, prev = [], 0
    for step, off in sorted(zip(steps, char_offsets), key=lambda x: x[1]):
        off = max(prev, min(int(off), len(response)))
        out += [response[prev:off], marker(step)]
        prev = off
    out.append(response[prev:])
    return "".join(out)


def delimiter_offsets(text: str, delimiter: str, n: int) -> list[int]:
    """Char positions of control points 0..n-1 by text alone: 0, then right after each
    delimiter occurrence (where a step's token offset is unknown)."""
    out, i = [0], 0
    while len(out) < n:
        j = text.find(delimiter, i)
        if j < 0:
            break
        i = j + len(delimiter)
        out.append(i)
    return out


def text_step_offsets(response: str, steps: Sequence[dict], delimiter: str) -> list[int]:
    by_delim = delimiter_offsets(response, delimiter, max([int(s.get("m") or 0) for s in steps] + [0]) + 1)
    return [by_delim[int(s.get("m") or 0)] if int(s.get("m") or 0) < len(by_delim) else len(response) for s in steps]


def retrieved_summary(retrieved: Sequence, max_tools: int = 3) -> str:
    """Retrieved memory entries grouped by tool (a tool has several anchors): best sim and
    how many of its entries came back, in retrieval order; e.g. ``t0005:0.999 ×3, t0001:0.412``."""
    best: dict[Any, float] = {}
    count: Counter = Counter()
    for e in retrieved:
        t, sim = (e[0], e[1]) if len(e) > 1 else (e[0], None)
        count[t] += 1
        if t not in best or (sim is not None and (best[t] is None or sim > best[t])):
            best[t] = sim
    tools = list(best)
    out = ", ".join(
        f"{_tool(t)}:{_num(best[t])}" + (f" ×{count[t]}" if count[t] > 1 else "") for t in tools[:max_tools]
    )
    return out + (f" (+{len(tools) - max_tools} tools)" if len(tools) > max_tools else "")


def steps_table(steps: Sequence[dict], max_retrieved: int = 4) -> str:
    """A markdown table of control points: gate, retrieved tools, candidate scores, choice."""
    if not steps:
        return "_no control points_\n"
    lines = [
        "| m | offset | gate | retrieved (tool:sim) | candidates (tool: Â / logprob / score) | chosen | scale |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        ret = retrieved_summary(s.get("retrieved") or [], max_retrieved)
        cands = "; ".join(
            f"{_tool(c.get('tool'))}: {_num(c.get('A_hat'))} / {_num(c.get('logprob'))} / {_num(c.get('score'))}"
            for c in (s.get("candidates") or [])
        )
        lines.append(
            f"| {s.get('m')} | {s.get('offset', '-')} | {s.get('gate', '-')} | {ret or '-'} | {cands or '-'} "
            f"| {_tool(s.get('chosen'))} | {_num(s.get('scale'))} |"
        )
    return "\n".join(lines) + "\n"


def _fence(text: str) -> str:
    fence = "```"
    while fence in (text or ""):
        fence += "`"
    return f"{fence}text\n{text}\n{fence}\n"


def improved_regressed(
    base: Sequence[dict], treat: Sequence[dict]
) -> tuple[list[tuple[dict, dict]], list[tuple[dict, dict]]]:
    """(improved, regressed) pairs (base record, treated record): base wrong and treated
    right, and the reverse; in base order."""
    by_id = {r["id"]: r for r in treat}
    improved, regressed = [], []
    for b in base:
        t = by_id.get(b["id"])
        if t is None or bool(b["correct"]) == bool(t["correct"]):
            continue
        (improved if t["correct"] else regressed).append((b, t))
    return improved, regressed


def cases_markdown(
    base: Sequence[dict],
    treat: Sequence[dict],
    t_max: int,
    max_cases: int = 5,
    base_name: str = "greedy",
    treat_name: str = "esm",
    delimiter: str | None = "\n\n",
) -> str:
    """Improved and regressed examples side by side; the treated response carries its
    control-point markers (placed at the m-th ``delimiter``)."""
    improved, regressed = improved_regressed(base, treat)
    parts = [
        f"# Cases: {treat_name} vs {base_name}, T_max={t_max}\n",
        f"{len(improved)} improved ({base_name} wrong, {treat_name} right), {len(regressed)} regressed "
        f"({base_name} right, {treat_name} wrong) of {len(base)} examples; up to {max_cases} of each below.\n",
    ]
    for title, pairs in (("Improved", improved), ("Regressed", regressed)):
        parts.append(f"\n## {title} ({len(pairs)})\n")
        if not pairs:
            parts.append("_none_\n")
        for b, t in pairs[:max_cases]:
            parts.append(f"\n### {b['id']}\n\n**Question**\n\n{_fence(b['question'])}\n**Gold:** `{b['gold']}`\n")
            for name, r in ((base_name, b), (treat_name, t)):
                steps, text = r.get("steps") or [], r["response"]
                if steps and delimiter:
                    text = mark_response(text, steps, text_step_offsets(text, steps, delimiter))
                parts.append(
                    f"\n**{name}** — pred `{r.get('pred')}`, {'correct' if r['correct'] else 'wrong'}, "
                    f"{r['tokens_used']} tokens (+{r.get('probe_tokens_used', 0)} probe), "
                    f"finish={r['finish_reason']}\n\n" + _fence(text)
                )
            parts.append(f"\n{treat_name} steps:\n\n" + steps_table(t.get("steps") or []))
    return "".join(parts)


def write_cases(
    base,
    treat,
    out_path: str | Path,
    t_max: int,
    max_cases: int = 5,
    delimiter: str | None = "\n\n",
    treat_name: str = "esm",
) -> Path:
    text = cases_markdown(base, treat, t_max, max_cases, treat_name=treat_name, delimiter=delimiter)
    return atomic_write_text(out_path, text)


def case_markdown(
    examples: Sequence,
    by_method: Mapping[str, Mapping[str, dict]],
    char_offsets: Mapping[tuple[str, str], Sequence[int]],
    t_max: int,
    title: str = "Case study",
) -> str:
    """Per example and method: the response with every control point marked at its place,
    then the steps (retrieved tools, candidate scores, choice). ``by_method[m][id]`` is a
    record; ``char_offsets[(m, id)]`` the char position of each of its steps."""
    parts = [
        f"# {title}, T_max={t_max}\n\nMethods: {', '.join(by_method)}. Markers: "
        "`⟦m=<control point> → <tool> ×<scale>⟧` where the tool's vector starts being injected "
        "(`null`: no steering for that segment).\n"
    ]
    for ex in examples:
        eid = str(ex.id)
        parts.append(f"\n## {eid}\n\n**Question**\n\n{_fence(ex.question)}\n**Gold:** `{ex.gold}`\n")
        for m, recs in by_method.items():
            r = recs.get(eid)
            if r is None:
                parts.append(f"\n### {m}\n\n_no record_\n")
                continue
            steps = r.get("steps") or []
            text = mark_response(r["response"], steps, char_offsets.get((m, eid), [len(r["response"])] * len(steps)))
            err = f", error: {r['error']}" if r.get("error") else ""
            parts.append(
                f"\n### {m}\n\npred `{r.get('pred')}`, **{'correct' if r['correct'] else 'wrong'}**, "
                f"{r['tokens_used']} tokens + {r.get('probe_tokens_used', 0)} probe = "
                f"{r.get('budget_used', r['tokens_used'])} "
                f"budget, finish={r['finish_reason']}{err}\n\n" + _fence(text)
            )
            if m != BASELINE or steps:
                parts.append("\n" + steps_table(steps, max_retrieved=8))
    return "".join(parts)
