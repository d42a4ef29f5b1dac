"""Stage 2 (prepare): the continuation prompt of every prefix.

``continuation_prompt_ids = prompt_ids + prefix_ids`` — the chat-templated question with the
assistant's turn left OPEN (no end-of-turn token), so the model takes the prefix as what it
has already said and goes on. Built on token ids, never by re-tokenising decoded text: the
decode -> encode round trip can merge or split tokens at the boundary and would not be the
sequence the model actually produced. ``continuation_prompt`` is a text rendering for reading.
-> ``stage2_input.parquet``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from esm_steer.token2048 import schema
from esm_steer.token2048.common import end_of_turn_ids, stage1_meta

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


def run_prepare(cfg, out: Path, tokenizer) -> Path:
    src, target = out / schema.STAGE1, out / schema.STAGE2
    meta = stage1_meta(cfg)
    schema.require(src, meta)
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
