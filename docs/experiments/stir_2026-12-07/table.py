"""One markdown row per eval run of the STIR experiment, paired with a greedy run by id.

  table.py GREEDY_RUN RUN:METHOD:LABEL ...   (run dirs relative to outputs/, T=48)
Uses the package's own statistics (wilson_ci, paired_bootstrap_delta, diagnose).
"""

import sys
from pathlib import Path

from esm_steer.evaluate.diagnostics import diagnose
from esm_steer.evaluate.records import method_tag, per_example_path
from esm_steer.evaluate.stats import paired_bootstrap_delta, paired_correct, wilson_ci
from esm_steer.io import read_jsonl

R = Path("/work/exp/stir/outputs")


def load(run: str, method: str) -> list[dict]:
    p = per_example_path(R / run, method_tag(method, 48))
    return read_jsonl(p) if p.exists() else []  # a row not run (yet) prints as missing


greedy = load(sys.argv[1], "greedy")
print(f"greedy {sys.argv[1]}: n={len(greedy)}")
COLS = [
    "config",
    "n",
    "acc",
    "95% CI",
    "Δ vs greedy (paired 95% CI)",
    "kept",
    "budget",
    "null rate",
    "differ",
    "flips r→w / w→r",
    "median top-1 sim",
    "median probe gap",
    "median inject ratio",
    "wall s",
]
print("| " + " | ".join(COLS) + " |")
print("|" + "---|" * len(COLS))
for spec in sys.argv[2:]:
    run, method, label = spec.split(":", 2)
    recs = load(run, method)
    if not recs:
        print(f"| {label} | – (no records in {run}/{method}) |")
        continue
    d = diagnose(recs, greedy if method != "greedy" else None)
    k, n = sum(bool(r["correct"]) for r in recs), len(recs)
    lo, hi = wilson_ci(k, n)
    a, b = paired_correct(recs, greedy)
    dm, dl, dh = paired_bootstrap_delta(a, b)
    f = lambda x, p=3: "–" if x is None else f"{x:.{p}f}"
    nr = "–" if d["null_rate"] is None else f"{d['null_rate']:.2f} ({d['null_steps']}/{d['steps_total']})"
    flips = "–" if method == "greedy" else f"{d['flips_greedy_right_to_wrong']} / {d['flips_greedy_wrong_to_right']}"
    wall = sum(r.get("wall_s") or 0 for r in recs)
    cells = [
        label,
        n,
        f"{k / n:.3f}",
        f"{lo:.3f}–{hi:.3f}",
        f"{dm:+.3f} ({dl:+.3f}…{dh:+.3f})",
        f"{d['tokens']['mean']:.1f}",
        f"{d['budget']['mean']:.1f}",
        nr,
        f(d["differ_from_greedy"]),
        flips,
        f(d["retrieval_top1_sim"]["median"]),
        f(d["probe_logprob_gap"]["median"], 4),
        f(d["inject_ratio"]["median"]),
        f"{wall:.0f}",
    ]
    print("| " + " | ".join(str(c) for c in cells) + " |")
