"""Stage I (mine), the stage driver: candidates (key, vector v, quality Q) from the model's own
rollouts (docs/method.md, Stage I; the math is :mod:`esm_steer.esm.candidates`).

Two phases, so that a killed run resumes exactly: (1) rollouts, appended to
``mine/rollouts.jsonl`` one question at a time (sampling is seeded per question, so a
resumed run draws what an uninterrupted one would); (2) candidates, computed from
``rollouts.jsonl`` alone with one teacher-forced ``hidden_states`` call per question. A rerun
into a dir whose rollouts came from another model or sampling config is refused
(``mine/meta.json``, ``esm_steer.provenance``). File names: ``esm_steer.esm.artifacts``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from esm_steer import provenance, runtime
from esm_steer.engine.base import FINISH_LENGTH, SamplingSpec
from esm_steer.engine.segments import control_point_offsets, token_pieces
from esm_steer.esm import artifacts
from esm_steer.esm.candidates import (
    GOLD_SAMPLE_ID,
    Candidate,
    Trace,
    choose_sets,
    keep_top,
    question_candidates,
    reward,
)
from esm_steer.io import JsonlAppender, atomic_write_json, atomic_write_jsonl
from esm_steer.runs import write_latest
from esm_steer.runtime import TRUNCATION_WARN_RATE
from esm_steer.seeds import derive_seed
from esm_steer.splits import write_mined_questions

log = logging.getLogger(__name__)

STAGE = artifacts.MAKER[artifacts.MINE_DIR]


# ---------------------------------------------------------------- phase 1: rollouts


def _rollout_key(r: dict) -> tuple:
    return (str(r["question_id"]), int(r["sample_id"]))


def sample_rollouts(
    engine,
    examples: Sequence,
    prompts: Sequence[list[int]],
    cfg: DictConfig,
    appender: JsonlAppender,
    is_correct: Callable[[str, str], bool],
    pred: Callable[[str], str | None],
) -> dict:
    """Generate K rollouts for every question that has fewer than K on disk; append each
    question's records in one write. Returns timing stats of this call."""
    om = cfg.offline_mine
    K = int(om.K)
    have = Counter(str(r["question_id"]) for r in appender.records)
    todo = [i for i, ex in enumerate(examples) if have[str(ex.id)] < K]
    done = len(examples) - len(todo)
    if done:
        log.info("mine: resuming: %d of %d questions already have their %d rollouts", done, len(examples), K)
    spec = SamplingSpec(
        max_new_tokens=int(om.max_new_tokens),
        temperature=float(cfg.decode.temperature),
        top_p=float(cfg.decode.top_p),
        n=K,
        seed=int(cfg.seed),
    )
    per_call = runtime.group_size(cfg, K)  # questions per generate call
    t0, n_new = time.time(), 0
    bar = tqdm(total=len(todo) * K, desc="mine rollouts", unit="rollout", dynamic_ncols=True)
    try:
        for b in range(0, len(todo), per_call):
            idx = todo[b : b + per_call]
            seeds = [derive_seed(cfg.seed, "mine", examples[i].id) for i in idx]
            outs = engine.generate([prompts[i] for i in idx], spec, prompt_seeds=seeds)
            for i, samples in zip(idx, outs):
                ex = examples[i]
                records = []
                for j, s in enumerate(samples):
                    rec = {
                        "question_id": str(ex.id),
                        "sample_id": j,
                        "text": s.text,
                        "tokens": len(s.token_ids),
                        "token_ids": list(map(int, s.token_ids)),
                        "finish_reason": s.finish_reason,
                        "correct": bool(is_correct(s.text, ex.gold)),
                        "pred": pred(s.text),
                        "gold": ex.gold,
                    }
                    rec["reward"] = reward(rec["correct"], rec["tokens"], om.max_new_tokens, om.length_penalty)
                    if _rollout_key(rec) not in appender.done_keys:  # a cut write left some
                        records.append(rec)
                appender.extend(records)
                n_new += len(samples)
                bar.update(len(samples))
    finally:
        bar.close()
    wall = time.time() - t0
    return {
        "rollouts_generated": n_new,
        "rollout_wall_s": round(wall, 2),
        "rollouts_per_s": round(n_new / wall, 2) if wall > 0 else None,
    }


# ---------------------------------------------------------------- phase 2: candidates


def _gold_record(ex, tokenizer, om) -> dict | None:
    if not getattr(ex, "solution", None):
        return None
    ids = tokenizer.encode(ex.solution, add_special_tokens=False)
    return {
        "question_id": str(ex.id),
        "sample_id": GOLD_SAMPLE_ID,
        "token_ids": list(map(int, ids)),
        "correct": True,
        "reward": reward(True, len(ids), om.max_new_tokens, om.length_penalty),
    }


def mine_candidates(
    engine, examples: Sequence, prompts: Sequence[list[int]], rollouts: Sequence[dict], cfg: DictConfig
):
    """Candidates of every question from its rollouts on disk. Returns (kept, stats)."""
    om, cp = cfg.offline_mine, cfg.control_points
    layer = engine.info.steer_layer
    tok = engine.tokenizer
    by_q: dict[str, list[dict]] = {}
    for r in rollouts:
        by_q.setdefault(str(r["question_id"]), []).append(r)
    skipped: Counter = Counter()
    both = used = total = 0
    pool: list[Candidate] = []
    per_m_all: Counter = Counter()
    C = int(om.keep_top_C)
    for ex, prompt in tqdm(list(zip(examples, prompts)), desc="mine candidates", unit="q", dynamic_ncols=True):
        recs = sorted(by_q.get(str(ex.id), []), key=lambda r: r["sample_id"])
        # R from (correct, tokens) with this run's length_penalty, not the one stored at sampling
        recs = [{**r, "reward": reward(r["correct"], r["tokens"], om.max_new_tokens, om.length_penalty)} for r in recs]
        if not recs:
            skipped["no rollouts"] += 1
            continue
        both += any(r["correct"] for r in recs) and not all(r["correct"] for r in recs)
        gold = _gold_record(ex, tok, om) if om.pos_source != "rollout" else None
        P, N, reason = choose_sets(recs, om.K_pos, om.K_neg, om.pos_source, gold, om.require_correct_and_incorrect)
        if reason:
            skipped[reason] += 1
            continue
        seqs = [list(prompt) + list(r["token_ids"]) for r in P + N]
        hs = engine.hidden_states(seqs, layer)  # one batched teacher-forced pass per question
        traces = []
        for r, h in zip(P + N, hs):
            ids = r["token_ids"]
            offsets = control_point_offsets(token_pieces(tok, ids), cp.segment_delimiter, int(cp.M))
            traces.append(Trace(float(r["reward"]), h.float(), len(prompt), offsets, len(ids)))
        cands = question_candidates(
            str(ex.id), traces[: len(P)], traces[len(P) :], int(cp.M), str(om.vector), int(cp.first_m)
        )
        if not cands:
            skipped["no control point reached by both sets"] += 1
            continue
        used += 1
        total += len(cands)
        per_m_all.update(c.m for c in cands)
        pool.extend(cands)
        if len(pool) > 2 * C:  # the order is total, so pruning early keeps the same top C
            pool = keep_top(pool, C)
    kept = keep_top(pool, C)
    for i, c in enumerate(kept):
        c.id = f"c{i:05d}"
    stats = {
        "questions_with_both_sets": both,
        "questions_with_candidates": used,
        "skipped": dict(skipped),
        "candidates_total": total,
        "candidates_kept": len(kept),
        "candidates_per_m_total": {int(m): per_m_all[m] for m in sorted(per_m_all)},
        "candidates_per_m": {int(m): n for m, n in sorted(Counter(c.m for c in kept).items())},
    }
    return kept, stats


def write_candidates(mine_dir: Path, cands: Sequence[Candidate]) -> None:
    """keys/<id>.pt ({"key", "states"}), vectors/<id>.pt, then candidates.jsonl (last: its
    presence means the rest is complete); stale files of an earlier run are removed. The
    manifest follows summary.json (mine() seals the dir)."""
    provenance.begin(mine_dir, STAGE)
    for c in cands:
        artifacts.save_steering(mine_dir, c.id, c.vector, c.key, c.states)
    artifacts.prune_steering(mine_dir, {c.id for c in cands})
    atomic_write_jsonl(mine_dir / artifacts.CANDIDATES, [c.record() for c in cands])


# ---------------------------------------------------------------- the stage


SAMPLING_KEYS = (
    "seed",
    "task.dataset",
    "prompt.template",
    "prompt.system",
    "offline_mine.max_new_tokens",
    "decode.temperature",
    "decode.top_p",
)  # the config keys that decide what a rollout is: a rerun must not mix two of them


def _check_resume(mine_dir: Path, info, cfg: DictConfig) -> None:
    """A rerun into a run dir whose rollouts came from another model or another sampling
    config would mix them: refuse in one line naming the file and the keys (the keys both runs
    recorded); the layer and width are recorded, not compared (candidates are recomputed)."""
    rollouts = mine_dir / artifacts.ROLLOUTS
    provenance.check_or_write(
        mine_dir / artifacts.MINE_META,
        {"model_id": info.model_id, "dtype": info.dtype, "sampling": provenance.fingerprint(cfg, SAMPLING_KEYS)},
        f"{rollouts} holds rollouts",
        "use another outputs.run_id",
        check=rollouts.exists(),
        shared=True,
        extra={"steer_layer": info.steer_layer, "hidden_size": info.hidden_size},
    )


def mine(
    cfg: DictConfig,
    run_dir: str | Path,
    engine,
    examples: Sequence,
    prompts: Sequence[list[int]],
    is_correct: Callable[[str, str], bool] | None = None,
    pred: Callable[[str], str | None] | None = None,
    split_record: dict | None = None,
) -> dict:
    """Stage I on given examples and prompt ids; writes mine/* and returns the summary.
    mine/questions.json holds the hashes of the mining questions (eval refuses overlapping
    artifacts) and ``split_record``, where they came from."""
    t0 = time.time()
    mine_dir = Path(run_dir) / artifacts.MINE_DIR
    mine_dir.mkdir(parents=True, exist_ok=True)
    if is_correct is None or pred is None:
        g_correct, g_pred = runtime.grader(cfg.task.grader)
        is_correct, pred = is_correct or g_correct, pred or g_pred
    _check_resume(mine_dir, engine.info, cfg)

    appender = JsonlAppender(mine_dir / artifacts.ROLLOUTS, key=_rollout_key)
    timing = sample_rollouts(engine, examples, prompts, cfg, appender, is_correct, pred)
    wanted, K = {str(ex.id) for ex in examples}, int(cfg.offline_mine.K)
    # a run dir mined earlier with a larger K (or more questions) may hold more: use this run's
    rollouts = [r for r in appender.records if str(r["question_id"]) in wanted and int(r["sample_id"]) < K]
    cands, stats = mine_candidates(engine, examples, prompts, rollouts, cfg)
    write_candidates(mine_dir, cands)
    write_mined_questions(mine_dir, examples, split_record)

    finish = Counter(r["finish_reason"] for r in rollouts)
    info = engine.info
    summary = {
        "questions": len(examples),
        "rollouts": len(rollouts),
        "rollout_accuracy": round(sum(r["correct"] for r in rollouts) / len(rollouts), 4) if rollouts else None,
        "mean_tokens": round(sum(r["tokens"] for r in rollouts) / len(rollouts), 1) if rollouts else None,
        "finish_reasons": dict(finish),
        **stats,
        **timing,
        "wall_s": round(time.time() - t0, 2),
        "model_id": info.model_id,
        "steer_layer": info.steer_layer,
        "hidden_size": info.hidden_size,
        "dtype": info.dtype,  # the engine's resolved dtype: later stages refuse another
        "backend": info.backend,
        # on vLLM the states come from its layer-ℓ hook or a HF copy (model.vllm_hidden_states)
        "hidden_states": engine.hidden_states_source(),
        "K": int(cfg.offline_mine.K),
        "M": int(cfg.control_points.M),
        "pos_source": str(cfg.offline_mine.pos_source),
        "vector": str(cfg.offline_mine.vector),
        "first_m": int(cfg.control_points.first_m),
        "split": split_record,
    }
    atomic_write_json(mine_dir / artifacts.SUMMARY, summary)
    tensors = artifacts.steering_files(c.id for c in cands)
    provenance.seal(mine_dir, STAGE, tensors + [artifacts.CANDIDATES, artifacts.SUMMARY])
    log.info(
        "mine: %d questions, %d with both sets, skipped %s; %d rollouts (acc %s, finish %s); "
        "candidates %d kept of %d, per m %s; %.1f s",
        summary["questions"],
        stats["questions_with_both_sets"],
        stats["skipped"] or "none",
        len(rollouts),
        summary["rollout_accuracy"],
        dict(finish),
        len(cands),
        stats["candidates_total"],
        stats["candidates_per_m"],
        summary["wall_s"],
    )
    truncated = finish.get(FINISH_LENGTH, 0) / len(rollouts) if rollouts else 0.0
    if truncated > TRUNCATION_WARN_RATE:
        log.warning(
            "mine: %.0f%% of %d rollouts stopped at offline_mine.max_new_tokens=%d (finish_reason=length, "
            "> %.0f%%): raise offline_mine.max_new_tokens (default task.budget)",
            100 * truncated,
            len(rollouts),
            int(cfg.offline_mine.max_new_tokens),
            100 * TRUNCATION_WARN_RATE,
        )
    if not cands:
        log.warning(
            "mine: no candidates: no question had both a positive and a negative rollout reaching a "
            "control point (see skipped); try more rollouts (offline_mine.K), a higher "
            "decode.temperature, more questions, or pos_source=rollout_or_gold"
        )
    return summary


def run(cfg: DictConfig, run, engine=None) -> None:
    """esm-mine. ``engine``: use it (and leave it open) instead of building one."""
    if cfg.model.get("num_threads"):
        torch.set_num_threads(int(cfg.model.num_threads))
    write_latest(run.dir)  # now, so that outputs.run_id=latest resumes a killed mine
    owned = engine is None
    engine = runtime.build_engine(cfg) if owned else engine
    try:
        examples, split_record = runtime.load_split(cfg, cfg.task.train_split)
        prompts = runtime.prompt_ids(engine, cfg, examples)
        mine(cfg, run.dir, engine, examples, prompts, split_record=split_record)
    finally:
        if owned and hasattr(engine, "close"):
            engine.close()
    write_latest(run.dir)
