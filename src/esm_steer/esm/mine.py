"""Stage I (mine): candidates (key, vector v, quality Q) from the model's own rollouts.

Per train question (DESIGN.md §2): K sampled rollouts, graded; reward
R(r) = 1[correct] − length_penalty · tokens(r) / max_new_tokens. Positive set P (correct, at
most K_pos, highest R first) and negative set N (incorrect, at most K_neg, lowest R first);
``pos_source: gold`` makes the teacher-forced reference solution the only positive,
``rollout_or_gold`` uses it only when no rollout is correct. For each control point m that
rollouts of both sets reach with a non-empty segment m:

- key k  = mean over P∪N of h at the last token before control point m (m = 0: last prompt token)
- v      = mean_{r∈P} s(r, m) − mean_{r∈N} s(r, m),  s(r, m) = mean of h over segment m of r
- Q      = R̄_P − R̄_N over the rollouts that reach m

v is not normalised and Q is not scaled by ‖v‖. The top ``keep_top_C`` by Q (ties: question
id, m) are kept.

Two phases, so that a killed run resumes exactly: (1) rollouts, appended to
``mine/rollouts.jsonl`` one question at a time (sampling is seeded per question, so a
resumed run draws what an uninterrupted one would); (2) candidates, computed from
``rollouts.jsonl`` alone with one teacher-forced ``hidden_states`` call per question.

With ``require_correct_and_incorrect: false`` a question whose rollouts are all correct (or
all incorrect) is not dropped: its rollouts are ranked by R and split into a top half (P)
and a bottom half (N), a contrast of concision rather than of correctness.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from esm_steer import provenance
from esm_steer.engine.base import FINISH_LENGTH, SamplingSpec
from esm_steer.engine.segments import control_point_offsets, segment_spans, token_pieces
from esm_steer.esm import common
from esm_steer.esm.library import load_steering, prune_steering, save_steering, steering_files
from esm_steer.evaluate.report import TRUNCATION_WARN_RATE
from esm_steer.io import JsonlAppender, atomic_write_json, atomic_write_jsonl, read_jsonl
from esm_steer.runs import RunError, write_latest
from esm_steer.splits import write_mined_questions

log = logging.getLogger(__name__)

MINE_DIR = "mine"
GOLD_SAMPLE_ID = -1  # the teacher-forced reference solution (never written to rollouts.jsonl)


def reward(correct: bool, tokens: int, max_new_tokens: int, length_penalty: float) -> float:
    """R(r) = 1[correct] − length_penalty · tokens / max_new_tokens."""
    return float(bool(correct)) - float(length_penalty) * tokens / float(max_new_tokens)


# ---------------------------------------------------------------- candidates from traces


@dataclass
class Trace:
    """One response teacher-forced after its prompt, as a candidate needs it."""

    reward: float
    h: torch.Tensor  # [prompt_len + length, d] layer-ℓ states of prompt + response
    prompt_len: int
    offsets: list[int]  # control-point offsets b_0 = 0 < b_1 < ... (response tokens)
    length: int  # response tokens

    def span(self, m: int) -> tuple[int, int]:
        return segment_spans(self.offsets, self.length)[m]

    def reaches(self, m: int) -> bool:
        """Control point m exists in this response and opens a non-empty segment."""
        if m >= len(self.offsets):
            return False
        s, e = self.span(m)
        return e > s

    def state(self, m: int) -> torch.Tensor:
        """h at the last token before control point m (m = 0: the last prompt token)."""
        return self.h[self.prompt_len + self.offsets[m] - 1]

    def segment_mean(self, m: int) -> torch.Tensor:
        """s(r, m): mean of h over segment m's tokens."""
        s, e = self.span(m)
        return self.h[self.prompt_len + s : self.prompt_len + e].mean(0)


@dataclass
class Candidate:
    question_id: str
    m: int
    Q: float
    vector: torch.Tensor  # [d]
    key: torch.Tensor  # [d]
    states: torch.Tensor  # [n_pos + n_neg, d], P first
    n_pos: int
    n_neg: int
    id: str = ""

    def rank_key(self) -> tuple:
        return (-self.Q, self.question_id, self.m)

    def record(self) -> dict:
        return {
            "id": self.id,
            "question_id": self.question_id,
            "m": self.m,
            "Q": self.Q,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "v_norm": float(self.vector.norm()),
            "n_states": int(self.states.shape[0]),
        }


def question_candidates(question_id: str, pos: Sequence[Trace], neg: Sequence[Trace], M: int) -> list[Candidate]:
    """The candidates (q, m), m = 0..M−1, that P and N both reach (DESIGN.md §2)."""
    out = []
    for m in range(M):
        P = [t for t in pos if t.reaches(m)]
        N = [t for t in neg if t.reaches(m)]
        if not P or not N:
            continue
        states = torch.stack([t.state(m) for t in P + N]).float()
        v = torch.stack([t.segment_mean(m) for t in P]).float().mean(0) - torch.stack(
            [t.segment_mean(m) for t in N]
        ).float().mean(0)
        Q = sum(t.reward for t in P) / len(P) - sum(t.reward for t in N) / len(N)
        out.append(Candidate(question_id, m, float(Q), v, states.mean(0), states, len(P), len(N)))
    return out


def keep_top(cands: list[Candidate], C: int) -> list[Candidate]:
    return sorted(cands, key=Candidate.rank_key)[:C]


# ---------------------------------------------------------------- P and N


def choose_sets(
    rollouts: Sequence[dict],
    K_pos: int,
    K_neg: int,
    pos_source: str = "rollout",
    gold: dict | None = None,
    require_both: bool = True,
) -> tuple[list[dict], list[dict], str | None]:
    """(P, N, reason): records of the positive and negative sets, or a skip reason.

    rollouts: one question's records (correct, reward, sample_id); gold: a record of the
    reference solution (None when the dataset has none).
    """
    correct = sorted((r for r in rollouts if r["correct"]), key=lambda r: (-r["reward"], r["sample_id"]))
    incorrect = sorted((r for r in rollouts if not r["correct"]), key=lambda r: (r["reward"], r["sample_id"]))
    neg = incorrect[:K_neg]
    if pos_source == "rollout":
        pos, why_no_pos = correct[:K_pos], "no correct rollout"
    elif pos_source == "gold":
        pos, why_no_pos = ([gold] if gold else []), "no gold solution"
    elif pos_source == "rollout_or_gold":
        pos = correct[:K_pos] or ([gold] if gold else [])
        why_no_pos = "no correct rollout and no gold solution"
    else:
        raise ValueError(f"offline_mine.pos_source={pos_source!r}: one of rollout, gold, rollout_or_gold")
    if pos and neg:
        return pos, neg, None
    if require_both:
        return [], [], (why_no_pos if not pos else "no incorrect rollout")
    # not required: rank by R and contrast the better half with the worse half
    ranked = sorted(rollouts, key=lambda r: (-r["reward"], r["sample_id"]))
    n = len(ranked)
    half = n // 2
    if not pos:
        if half < 1:
            return [], [], "fewer than 2 rollouts"
        return ranked[: min(K_pos, half)], ranked[n - min(K_neg, n - half) :], None
    if pos[0]["sample_id"] == GOLD_SAMPLE_ID:  # gold vs the worst rollouts
        return pos, ranked[-K_neg:] if n else [], (None if n else "no rollout")
    if half < 1:
        return [], [], "fewer than 2 rollouts"
    return ranked[: min(K_pos, half)], ranked[n - min(K_neg, n - half) :], None


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
    per_call = max(1, int(cfg.model.batch_size) // K)  # questions per generate call
    t0, n_new = time.time(), 0
    bar = tqdm(total=len(todo) * K, desc="mine rollouts", unit="rollout", dynamic_ncols=True)
    try:
        for b in range(0, len(todo), per_call):
            idx = todo[b : b + per_call]
            seeds = [common.question_seed(cfg.seed, str(examples[i].id)) for i in idx]
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
        cands = question_candidates(str(ex.id), traces[: len(P)], traces[len(P) :], int(cp.M))
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
    provenance.begin(mine_dir, "mine")
    for c in cands:
        save_steering(mine_dir, c.id, c.vector, c.key, c.states)
    prune_steering(mine_dir, {c.id for c in cands})
    atomic_write_jsonl(mine_dir / "candidates.jsonl", [c.record() for c in cands])


def load_candidates(run_dir: str | Path) -> tuple[list[Candidate], dict]:
    """Candidates written by esm-mine and the mine summary (model id, layer, hidden size),
    after checking every file against mine/manifest.json."""
    mine_dir = Path(run_dir) / MINE_DIR
    jsonl = common.require(mine_dir / "candidates.jsonl", "mine")
    provenance.verify(mine_dir, "mine")
    summary = provenance.read_json(common.require(mine_dir / "summary.json", "mine"))
    out = []
    for r in read_jsonl(jsonl):
        vector, key, states = load_steering(mine_dir, r["id"], "mine")
        out.append(
            Candidate(
                question_id=str(r["question_id"]),
                m=int(r["m"]),
                Q=float(r["Q"]),
                vector=vector,
                key=key,
                states=states,
                n_pos=int(r["n_pos"]),
                n_neg=int(r["n_neg"]),
                id=r["id"],
            )
        )
    return out, summary


# ---------------------------------------------------------------- the stage


def _sampling_config(cfg: DictConfig) -> dict:
    """The config keys that decide what a rollout is: a rerun must not mix two of them."""
    return {
        "seed": int(cfg.seed),
        "task.dataset": str(cfg.task.dataset),
        "prompt.template": str(cfg.prompt.template),
        "prompt.system": cfg.prompt.system,
        "offline_mine.max_new_tokens": int(cfg.offline_mine.max_new_tokens),
        "decode.temperature": float(cfg.decode.temperature),
        "decode.top_p": float(cfg.decode.top_p),
    }


def _check_resume(mine_dir: Path, info, cfg: DictConfig) -> None:
    """A rerun into a run dir whose rollouts came from another model or another sampling
    config would mix them: refuse in one line naming both."""
    meta_path = mine_dir / "meta.json"
    sampling = _sampling_config(cfg)
    if meta_path.exists() and (mine_dir / "rollouts.jsonl").exists():
        old = provenance.read_json(meta_path)
        if old.get("model_id") != info.model_id:
            raise RunError(
                f"{mine_dir} holds rollouts of model {old.get('model_id')}, not of model {info.model_id}; "
                "use another outputs.run_id"
            )
        for k, v in (old.get("sampling") or {}).items():
            if sampling.get(k) != v:
                raise RunError(
                    f"{mine_dir}/rollouts.jsonl was sampled with {k}={v!r}, not {sampling.get(k)!r}; "
                    "use another outputs.run_id"
                )
    atomic_write_json(
        meta_path,
        {
            "model_id": info.model_id,
            "steer_layer": info.steer_layer,
            "hidden_size": info.hidden_size,
            "sampling": sampling,
        },
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
    mine_dir = Path(run_dir) / MINE_DIR
    mine_dir.mkdir(parents=True, exist_ok=True)
    if is_correct is None or pred is None:
        g_correct, g_pred = common.grader(cfg.task.dataset)
        is_correct, pred = is_correct or g_correct, pred or g_pred
    _check_resume(mine_dir, engine.info, cfg)

    appender = JsonlAppender(mine_dir / "rollouts.jsonl", key=_rollout_key)
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
        "K": int(cfg.offline_mine.K),
        "M": int(cfg.control_points.M),
        "pos_source": str(cfg.offline_mine.pos_source),
        "split": split_record,
    }
    atomic_write_json(mine_dir / "summary.json", summary)
    provenance.seal(mine_dir, "mine", steering_files(c.id for c in cands) + ["candidates.jsonl", "summary.json"])
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


def run(cfg: DictConfig, run) -> None:
    if cfg.model.get("num_threads"):
        torch.set_num_threads(int(cfg.model.num_threads))
    write_latest(run.dir)  # now, so that outputs.run_id=latest resumes a killed mine
    engine = common.build_engine(cfg)
    try:
        examples, split_record = common.load_split(cfg, cfg.task.train_split)
        prompts = common.prompt_ids(engine, cfg, examples)
        mine(cfg, run.dir, engine, examples, prompts, split_record=split_record)
    finally:
        close = getattr(engine, "close", None)
        if close:
            close()
    write_latest(run.dir)
