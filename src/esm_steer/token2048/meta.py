"""The config values that decide each token-2048 stage's files (checked on resume), and the grader."""

from __future__ import annotations

# ---------------------------------------------------------------- provenance


def stage1_meta(cfg) -> dict:
    """The config values that decide stage 1 (and so stage 2)."""
    t = cfg.token2048
    return {
        "model.name_or_path": cfg.model.name_or_path,
        "model.gguf_file": cfg.model.gguf_file,
        "model.dtype": cfg.model.dtype,  # resolved by start_run (auto -> this machine's dtype)
        "task.dataset": cfg.task.dataset,
        "task.split": cfg.task.train_split,
        "token2048.data_path": t.data_path,
        "prompt.template": cfg.prompt.template,
        "prompt.system": cfg.prompt.system,
        "seed": int(cfg.seed),
        "token2048.n_questions": int(t.n_questions),
        "token2048.n_prefix": int(t.n_prefix),
        "token2048.prefix_tokens": int(t.prefix_tokens),
        "token2048.temperature": float(t.temperature),
        "token2048.top_p": float(t.top_p),
    }


def parts_meta(meta: dict, cfg) -> dict:
    """Part files also depend on the chunking."""
    return {**meta, "token2048.questions_per_shard": int(cfg.token2048.questions_per_shard)}


def stage3_meta(cfg) -> dict:
    t = cfg.token2048
    return {
        **stage1_meta(cfg),
        "token2048.n_cont": int(t.n_cont),
        "token2048.max_new_tokens": int(t.max_new_tokens),
        "token2048.grader": grader_kind(cfg),
        "token2048.continue_finished": bool(t.continue_finished),
    }


# ---------------------------------------------------------------- grading


def grader_kind(cfg) -> str:
    """math_dapo (verl's DAPO reward) for DAPO data or when asked; else the task's grader."""
    g = cfg.token2048.grader
    if g == "math_dapo" or (g == "auto" and cfg.task.dataset == "dapo_math"):
        return "math_dapo"
    return str(cfg.task.grader)
