"""What the token-2048 stages share: seeds, provenance, grading, fault-tolerant generation."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from esm_steer.data import grading, tasks
from esm_steer.engine.base import Sample, SamplingSpec

log = logging.getLogger(__name__)


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from (cfg.seed, stage, question, sample ...). Python's hash() is
    salted per process; this is not, so sharded processes draw what one process would."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


# ---------------------------------------------------------------- provenance


def stage1_meta(cfg) -> dict:
    """The config values that decide stage 1 (and so stage 2)."""
    t = cfg.token2048
    return {
        "model.name_or_path": cfg.model.name_or_path,
        "model.gguf_file": cfg.model.gguf_file,
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
    return str(cfg.task.dataset)  # tasks.grade maps a task name to its kind


def grade(response: str, gold: str, kind: str) -> tuple[bool, str | None, str | None]:
    """(is_correct, extracted answer, error). A grader crash is an error, not a stop.

    An empty generation is a wrong answer, not an error: verl's math_dapo scores it -1 with
    pred "[INVALID]" (compute_score_dapo does the same); other graders find no answer in it."""
    try:
        if kind == "math_dapo":
            s = grading.compute_score_dapo(response or "", gold)
            return bool(s["acc"]), s["pred"], None
        if not response or not response.strip():
            return False, None, None
        pred = grading.extract_answer(response, tasks.kind_for_task(kind))
        return bool(tasks.grade(response, gold, kind)), pred, None
    except Exception as e:  # noqa: BLE001 - one bad rollout must not stop 800k others
        log.warning("grading failed (%s: %s); counted as incorrect", type(e).__name__, e)
        return False, None, f"grading failed: {type(e).__name__}: {e}"


# ---------------------------------------------------------------- generation


def group_size(cfg, n: int) -> int:
    """Prompts per engine call. vLLM schedules everything itself: give it the whole chunk.
    HF decodes prompts × n rows at once: keep that near model.batch_size."""
    if cfg.model.backend == "vllm":
        return 1 << 30
    return max(1, int(cfg.model.batch_size) // n)


def generate_safe(
    engine,
    prompts: Sequence[list[int]],
    spec: SamplingSpec,
    seeds: Sequence[int],
    group: int,
    desc: str,
) -> list[list[Sample] | str]:
    """spec.n samples per prompt, or an error string where generation failed.

    A failing group is retried prompt by prompt, so one bad prompt costs only its own rows.
    Only Exceptions are caught: a KeyboardInterrupt / kill still stops the stage (resume
    picks it up from the last complete part file)."""
    out: list[list[Sample] | str] = [""] * len(prompts)

    def call(idx: list[int]) -> None:
        res = engine.generate([prompts[i] for i in idx], spec, [seeds[i] for i in idx])
        if len(res) != len(idx) or any(len(r) != spec.n for r in res):
            raise RuntimeError(f"engine returned {[len(r) for r in res]} samples for {len(idx)} prompts × n={spec.n}")
        for i, r in zip(idx, res):
            out[i] = r

    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None, leave=False) as bar:
        for start in range(0, len(prompts), group):
            idx = list(range(start, min(start + group, len(prompts))))
            try:
                call(idx)
            except Exception as e:  # noqa: BLE001
                log.warning("%s: generate failed for %d prompt(s) (%s: %s)", desc, len(idx), type(e).__name__, e)
                for i in idx:
                    if len(idx) > 1:
                        try:
                            call([i])
                            continue
                        except Exception as e1:  # noqa: BLE001
                            e = e1
                    out[i] = f"generate failed: {type(e).__name__}: {e}"
                    log.warning("%s: prompt %d recorded as failed: %s", desc, i, out[i])
            bar.update(len(idx))
    return out


def end_of_turn_ids(tokenizer) -> set[int]:
    """Tokens that close the assistant turn: EOS and, for chat models, the turn marker."""
    ids = set()
    for tok in (getattr(tokenizer, "eos_token", None), "<|im_end|>", "<|eot_id|>", "<|end_of_turn|>"):
        if tok:
            i = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(i, int) and i != getattr(tokenizer, "unk_token_id", None):
                ids.add(i)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
