"""Stage 2 (prepare): the continuation prompt of every prefix.

``continuation_prompt_ids = prompt_ids + prefix_ids`` — the chat-templated question with the
assistant's turn left OPEN (no end-of-turn token), so the model takes the prefix as what it
has already said and goes on. Built on token ids, never by re-tokenising decoded text: the
decode -> encode round trip can merge or split tokens at the boundary and would not be the
sequence the model actually produced. ``continuation_prompt`` is a text rendering for reading.
A prefix that finished in stage 1 gets the same open-turn prompt (its end-of-turn token is
not there: the engine drops the EOS it stops on, and a trailing one is stripped), so stage 3
continues it too and the model deals with the closed thought (``token2048.continue_finished``).
-> ``stage2_input.parquet``. Refuses, naming the parts and their shards, while stage-1 parts
are missing; merges them first when all are there but the merge was missed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from esm_steer.engine.base import end_of_turn_ids
from esm_steer.token2048 import schema, shards
from esm_steer.token2048.meta import parts_meta, stage1_meta
from esm_steer.token2048.sample import merge_stage1

log = logging.getLogger(__name__)


def continuation_ids(prompt_ids: list[int], prefix_ids: list[int], eot: set[int]) -> tuple[list[int], list[int], bool]:
    """(prompt + prefix ids, prefix ids, whether end-of-turn tokens were stripped).

    Engines drop the EOS they stop on; a trailing end-of-turn token can still appear when a
    model closes its turn with a token the engine does not stop on: it is stripped (and the
    prefix counts as finished), since leaving it would close the turn we mean to continue."""
    prefix = list(prefix_ids)
    stripped = False
    while prefix and prefix[-1] in eot:
        prefix.pop()
        stripped = True
    return list(prompt_ids) + prefix, prefix, stripped


def gather_stage1(cfg, out: Path) -> Path:
    """The merged stage-1 file; merges the parts first (RunError while some are missing)."""
    target, parts_dir = out / schema.STAGE1, out / schema.STAGE1_PARTS
    n = shards.chunking(parts_dir)
    if not target.exists() and n is not None:
        shards.check_layout(parts_dir, n)
        shards.require_all(parts_dir, n, cfg.token2048.num_shards, "prepare", producer="sample")
        merge_stage1(parts_dir, n, target, parts_meta(stage1_meta(cfg), cfg))
    schema.require(target, stage1_meta(cfg))
    return target


def run_prepare(cfg, out: Path, tokenizer) -> Path:
    src, target = out / schema.STAGE1, out / schema.STAGE2
    meta = stage1_meta(cfg)
    gather_stage1(cfg, out)
    if target.exists():
        schema.check_meta(target, meta)
        log.info("prepare: %s exists; skipping", target)
        return target
    eot = end_of_turn_ids(tokenizer)
    rows = []
    for r in schema.read(src).to_pylist():
        ids, prefix, stripped = continuation_ids(r["prompt_ids"], r["prefix_ids"], eot)
        rows.append(
            {
                "question_id": r["question_id"],
                "question": r["question"],
                "ground_truth": r["ground_truth"],
                "sample_id": r["sample_id"],
                "token_2048": r["token_2048"],
                "continuation_prompt": tokenizer.decode(ids, skip_special_tokens=False),
                "continuation_prompt_ids": ids,
                "num_prompt_tokens": len(r["prompt_ids"]),
                "example_id": r["example_id"],
                "prefix_finished": bool(r["prefix_finished"] or stripped),
                "error": r["error"],
            }
        )
    schema.write(target, schema.table(schema.STAGE2, rows, meta))
    log.info("prepare: wrote %s (%d continuation prompts)", target, len(rows))
    return target
