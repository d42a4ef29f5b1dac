"""Stage 4 (select): token_2048_acc per prefix, the best prefix per question.

token_2048_acc = correct continuations / n_cont (a failed continuation counts as wrong, as in
the seed). Best per question = highest acc, ties -> lowest sample id.
-> ``final_best.parquet``, ``summary.json`` (also logged) and ``accuracy_distribution.png``.
Refuses to run while stage-3 parts are missing, naming them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from esm_steer.io import atomic_save, atomic_write_json
from esm_steer.runs import RunError
from esm_steer.token2048 import schema, shards
from esm_steer.token2048.meta import grader_kind, parts_meta, stage1_meta, stage3_meta

log = logging.getLogger(__name__)


def gather_stage3(cfg, out: Path, num_questions: int) -> Path:
    """The merged stage-3 file; merges the parts first (RunError while some are missing)."""
    t = cfg.token2048
    n = shards.num_chunks(num_questions, t.questions_per_shard)
    parts_dir, merged = out / schema.STAGE3_PARTS, out / schema.STAGE3
    if parts_dir.is_dir() or not merged.exists():
        shards.check_layout(parts_dir, n)
        shards.require_all(parts_dir, n, t.num_shards, "select")
        shards.merge(parts_dir, n, merged, parts_meta(stage3_meta(cfg), cfg))
    schema.check_meta(merged, stage3_meta(cfg))
    return merged


def best_per_question(stage2: pd.DataFrame, stage3: pd.DataFrame) -> pd.DataFrame:
    """One row per question with the seed's final_best columns (plus a few extras)."""
    g = (
        stage3.assign(err=stage3["error"].notna())
        .groupby(["question_id", "sample_id"], sort=True)
        .agg(correct=("is_correct", "sum"), total=("is_correct", "size"), errors=("err", "sum"))
        .reset_index()
    )
    prefixes = stage2.set_index(["question_id", "sample_id"])
    rows = []
    for qid, grp in g.groupby("question_id", sort=True):
        grp = grp.sort_values("sample_id")
        # compare integer counts, not floats: equal accuracies tie exactly; argmax takes the
        # first maximum, i.e. the lowest sample id
        b = int(np.argmax(grp["correct"].to_numpy()))
        sid = int(grp["sample_id"].iloc[b])
        best = prefixes.loc[(qid, sid)]
        accs = (grp["correct"] / grp["total"]).astype(float).tolist()
        rows.append(
            {
                "question_id": int(qid),
                "question": best["question"],
                "ground_truth": best["ground_truth"],
                "best_sample_id": sid,
                "best_token_2048": best["token_2048"],
                "best_acc": accs[b],
                "all_accs": accs,
                "best_prefix_finished": bool(best["prefix_finished"]),
                "num_errors": int(grp["errors"].sum()),
            }
        )
    return pd.DataFrame(rows)


def summarize(final: pd.DataFrame, stage3: pd.DataFrame, cfg) -> dict:
    all_accs = np.concatenate([np.asarray(a, dtype=float) for a in final["all_accs"]]) if len(final) else np.zeros(0)
    mean_best, mean_all = float(final["best_acc"].mean()), float(all_accs.mean())
    return {
        "num_questions": int(len(final)),
        "n_prefix": int(cfg.token2048.n_prefix),
        "n_cont": int(cfg.token2048.n_cont),
        "prefix_tokens": int(cfg.token2048.prefix_tokens),
        "max_new_tokens": int(cfg.token2048.max_new_tokens),
        "grader": grader_kind(cfg),
        "num_rollouts": int(len(stage3)),
        "mean_best_acc": mean_best,
        "max_best_acc": float(final["best_acc"].max()),
        "min_best_acc": float(final["best_acc"].min()),
        "mean_all_acc": mean_all,
        "gap_best_minus_mean": mean_best - mean_all,
        "frac_prefix_finished": float(stage3.groupby(["question_id", "sample_id"])["prefix_finished"].first().mean()),
        "num_errors": int(stage3["error"].notna().sum()),
    }


def plot_distribution(final: pd.DataFrame, path: Path) -> Path:
    """Histogram of best_acc with all prefixes' accs overlaid, as fractions (the two
    populations differ n_prefix-fold in size)."""
    best = final["best_acc"].to_numpy(dtype=float)
    every = np.concatenate([np.asarray(a, dtype=float) for a in final["all_accs"]])
    bins = np.linspace(0, 1, 21)
    fig = Figure(figsize=(6, 4))  # no pyplot: no backend or global figure state
    ax = fig.subplots()
    for vals, alpha, label in ((every, 0.5, "all prefixes"), (best, 0.6, "best per question")):
        weights = np.full(len(vals), 1 / len(vals))
        ax.hist(vals, bins=bins, weights=weights, alpha=alpha, label=f"{label} (n={len(vals)})")
    ax.set_xlabel("token_2048_acc (continuations correct)")
    ax.set_ylabel("fraction")
    ax.set_title("Distribution of best token_2048 accuracy")
    ax.legend()
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120))
    return path


def run_select(cfg, out: Path) -> dict:
    t = cfg.token2048
    src2 = out / schema.STAGE2
    schema.require(src2, stage1_meta(cfg))
    cols2 = ["question_id", "question", "ground_truth", "sample_id", "token_2048", "prefix_finished"]
    stage2 = schema.read(src2, cols2).to_pandas()
    num_questions = int(stage2["question_id"].max()) + 1 if len(stage2) else 0
    merged = gather_stage3(cfg, out, num_questions)
    cols3 = ["question_id", "sample_id", "continuation_id", "is_correct", "prefix_finished", "error"]
    stage3 = schema.read(merged, cols3).to_pandas()

    expected = len(stage2) * t.n_cont
    dups = int(stage3.duplicated(["question_id", "sample_id", "continuation_id"]).sum())
    if len(stage3) != expected or dups:
        raise RunError(
            f"{merged}: {len(stage3)} rows ({dups} duplicated), "
            f"expected {len(stage2)} prefixes × n_cont={t.n_cont} = {expected}"
        )

    final = best_per_question(stage2, stage3)
    schema.write(out / schema.FINAL, schema.table(schema.FINAL, final.to_dict("records"), stage3_meta(cfg)))
    summary = summarize(final, stage3, cfg)
    atomic_write_json(out / schema.SUMMARY, summary)
    plot_distribution(final, out / schema.PLOT)
    log.info(
        "select: %d questions; best acc mean %.3f (max %.3f, min %.3f); mean acc of all prefixes %.3f; "
        "gap best - mean %.3f",
        summary["num_questions"],
        summary["mean_best_acc"],
        summary["max_best_acc"],
        summary["min_best_acc"],
        summary["mean_all_acc"],
        summary["gap_best_minus_mean"],
    )
    log.info("select: wrote %s, %s, %s", out / schema.FINAL, out / schema.SUMMARY, out / schema.PLOT)
    return summary
