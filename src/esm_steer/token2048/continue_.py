"""Stage 3 (continue): n_cont continuations of every prefix, graded.

One engine request per prefix with ``n = n_cont``: the prefix is encoded once and its KV cache
shared by the n continuations (HF: prefill then fork; vLLM: ``SamplingParams(n)`` + prefix
caching), never n re-encodings. A prefix that already finished (EOS in stage 1) is continued
like the others, as the seed does: its prompt has no end-of-turn token (prepare), and the
model deals with the closed thought (closes the turn again, repeats, or goes on); its rows keep
``prefix_finished`` true. ``token2048.continue_finished=false`` restores grading it as is: its
n_cont rows get one verdict, an empty continuation and finish_reason ``prefix_finished``. A
prefix whose stage-1 generation failed gets error rows and is not generated.

Work is split into question chunks (``stage3_parts/part-<c>-of-<n>.parquet``, written
atomically when the chunk is done): a killed run resumes at the first missing part, and chunk
c belongs to process ``shard_index = c % num_shards``. Continuation k of prefix (q, j) is
seeded by (seed, q's task id, j, k), so sharded runs merged equal an unsharded one.

Who writes ``stage3_output.parquet``: whichever process finds all parts present at its end
(continue), and ``select`` again if it is missing — both through the same idempotent merge.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from esm_steer.engine.base import SamplingSpec
from esm_steer.runtime import generate_samples, grade, group_size
from esm_steer.seeds import derive_seed
from esm_steer.token2048 import schema, shards
from esm_steer.token2048.meta import grader_kind, parts_meta, stage1_meta, stage3_meta

log = logging.getLogger(__name__)

FINISH_PREFIX = "prefix_finished"
FINISH_ERROR = "error"


def load_stage2(cfg, out: Path) -> tuple[pa.Table, int]:
    """The stage-2 table (rows become Python objects one chunk at a time: a seed-sized stage 2
    holds 8000 × ~2k token ids) and the number of chunks."""
    src = out / schema.STAGE2
    schema.require(src, stage1_meta(cfg))
    tbl = schema.read(src)
    qids = tbl.column("question_id")
    n_questions = pc.max(qids).as_py() + 1 if len(tbl) else 0
    return tbl, shards.num_chunks(n_questions, cfg.token2048.questions_per_shard)


def chunk_rows(tbl: pa.Table, chunk: int, per_shard: int) -> list[dict]:
    """Stage-2 rows of one chunk, sorted by (question_id, sample_id)."""
    q = tbl.column("question_id")
    mask = pc.and_(pc.greater_equal(q, chunk * per_shard), pc.less(q, (chunk + 1) * per_shard))
    return sorted(tbl.filter(mask).to_pylist(), key=lambda r: (r["question_id"], r["sample_id"]))


def continue_chunk(cfg, engine, rows: list[dict], desc: str) -> tuple[list[dict], int]:
    """The stage-3 rows of one chunk's prefixes, and the number of tokens generated."""
    t = cfg.token2048
    kind = grader_kind(cfg)
    tok = engine.tokenizer
    todo = [r for r in rows if r["error"] is None and (t.continue_finished or not r["prefix_finished"])]
    spec = SamplingSpec(
        max_new_tokens=t.max_new_tokens, temperature=t.temperature, top_p=t.top_p, n=t.n_cont, seed=cfg.seed
    )
    seeds = [derive_seed(cfg.seed, "continue", r["example_id"], r["sample_id"]) for r in todo]
    prompts = [r["continuation_prompt_ids"] for r in todo]
    results = generate_samples(engine, prompts, spec, seeds, group_size(cfg, t.n_cont), desc)
    by_prefix = {(r["question_id"], r["sample_id"]): res for r, res in zip(todo, results)}

    out, ntok = [], 0
    for r in rows:
        base = {
            "question_id": r["question_id"],
            "sample_id": r["sample_id"],
            "token_2048": r["token_2048"],
            "ground_truth": r["ground_truth"],
            "prefix_finished": bool(r["prefix_finished"]),
        }
        empty = {"full_rollout": r["token_2048"], "continuation": "", "num_continuation_tokens": 0}
        res = by_prefix.get((r["question_id"], r["sample_id"]))
        if r["error"] is not None or isinstance(res, str):
            err = f"prefix: {r['error']}" if r["error"] is not None else res
            rec = {**base, **empty, "is_correct": False, "finish_reason": FINISH_ERROR, "pred": None, "error": err}
            out += [{**rec, "continuation_id": k} for k in range(t.n_cont)]
        elif res is None:  # finished prefix, continue_finished=false: graded once, as is
            ok, pred, err = grade(r["token_2048"], r["ground_truth"], kind)
            rec = {**base, **empty, "is_correct": ok, "finish_reason": FINISH_PREFIX, "pred": pred, "error": err}
            out += [{**rec, "continuation_id": k} for k in range(t.n_cont)]
        else:
            prefix_ids = r["continuation_prompt_ids"][r["num_prompt_tokens"] :]
            for k, s in enumerate(res):
                # decode prefix + continuation together: a character split across the boundary
                # (byte-level BPE) comes out whole, which two separate decodes would garble
                full = tok.decode(list(prefix_ids) + list(s.token_ids), skip_special_tokens=True)
                ok, pred, err = grade(full, r["ground_truth"], kind)
                ntok += s.num_tokens
                out.append(
                    {
                        **base,
                        "continuation_id": k,
                        "full_rollout": full,
                        "continuation": s.text,
                        "num_continuation_tokens": s.num_tokens,
                        "is_correct": ok,
                        "finish_reason": s.finish_reason,
                        "pred": pred,
                        "error": err,
                    }
                )
    return out, ntok


def run_continue(cfg, out: Path, engine) -> bool:
    """This shard's missing chunks; True when every chunk (all shards) is on disk and merged.
    ``engine``: an Engine, or a callable returning one (loaded only if there is work)."""
    t = cfg.token2048
    tbl, n = load_stage2(cfg, out)
    parts_dir = out / schema.STAGE3_PARTS
    shards.check_layout(parts_dir, n)
    meta = parts_meta(stage3_meta(cfg), cfg)
    mine = shards.my_chunks(n, t.shard_index, t.num_shards)
    todo = [c for c in mine if not shards.part_path(parts_dir, c, n).exists()]
    for c in mine:
        if c not in todo:
            schema.check_meta(shards.part_path(parts_dir, c, n), meta)
    log.info(
        "continue: shard %d/%d owns %d of %d chunk(s), %d to do (%d done before); n_cont=%d, max_new_tokens=%d, "
        "grader=%s, continue_finished=%s",
        t.shard_index,
        t.num_shards,
        len(mine),
        n,
        len(todo),
        len(mine) - len(todo),
        t.n_cont,
        t.max_new_tokens,
        grader_kind(cfg),
        t.continue_finished,
    )
    if todo and callable(engine):
        engine = engine()
    for c in tqdm(todo, desc="continue chunks", unit="chunk", disable=None):
        t0 = time.perf_counter()
        recs, ntok = continue_chunk(cfg, engine, chunk_rows(tbl, c, t.questions_per_shard), f"continue chunk {c}")
        schema.write(shards.part_path(parts_dir, c, n), schema.table(schema.STAGE3, recs, meta))
        dt = time.perf_counter() - t0
        acc = sum(r["is_correct"] for r in recs) / max(len(recs), 1)
        log.info(
            "continue: chunk %d/%d done: %d rollouts, acc %.3f, %d tokens in %.1f s (%.1f tok/s)",
            c + 1,
            n,
            len(recs),
            acc,
            ntok,
            dt,
            ntok / max(dt, 1e-9),
        )
    gone = shards.missing(parts_dir, n)
    if gone:
        msg = "continue: shard %d done; %d part(s) of other shards still missing: select waits for them"
        log.info(msg, t.shard_index, len(gone))
        return False
    shards.merge(parts_dir, n, out / schema.STAGE3, meta)
    return True
