"""Stage 1 (sample): a seeded sample of n_questions; n_prefix prefixes of prefix_tokens each.

-> ``stage1_output.parquet``: one row per (question, sample) with the seed's columns plus the
prompt ids, the prefix ids and ``prefix_finished`` (EOS came before the token limit).
Written by question chunk (``stage1_parts/``), so a killed run resumes at the first missing
chunk. Sampling: prefix j of question q draws from a generator seeded by (seed, q's task id, j),
independent of batching, chunking and n_questions.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from esm_steer.engine.base import FINISH_STOP, SamplingSpec
from esm_steer.token2048 import schema, shards
from esm_steer.token2048.common import derive_seed, generate_safe, group_size, parts_meta, stage1_meta

log = logging.getLogger(__name__)


def load_questions(cfg) -> list:
    """The seeded subsample of n_questions from the task's train split (file order kept)."""
    from esm_steer.data.tasks import load_task

    t = cfg.task
    kwargs = {"difficulty": t.difficulty, "num_synthetic": t.num_synthetic, "hub_id": t.hub_id, "hub_config": t.hub_config}
    examples = load_task(
        t.dataset, t.train_split, data_root=t.data_root, max_examples=cfg.token2048.n_questions, seed=cfg.seed, **kwargs
    )
    if len(examples) < cfg.token2048.n_questions:
        log.warning("task %s has %d questions < token2048.n_questions=%d: using all", t.dataset, len(examples), cfg.token2048.n_questions)
    return examples


def prompt_ids(tokenizer, cfg, example) -> list[int]:
    from esm_steer.data.prompts import build_messages, render_prompt_ids, resolve_template

    return render_prompt_ids(tokenizer, build_messages(resolve_template(cfg.prompt.template, cfg.task.dataset), example, system=cfg.prompt.system))


def run_sample(cfg, out: Path, engine, examples: list | None = None) -> Path:
    """``engine``: an Engine, or a callable returning one (loaded only if there is work)."""
    t = cfg.token2048
    target = out / schema.STAGE1
    meta = stage1_meta(cfg)
    if target.exists():
        schema.check_meta(target, meta)
        log.info("sample: %s exists; skipping", target)
        return target
    if examples is None:
        examples = load_questions(cfg)
    if cfg.task.dataset == "dapo_math" and cfg.prompt.template not in ("dapo", "auto"):
        log.warning("task=dapo_math with prompt=%s: the math_dapo grader expects prompt=dapo", cfg.prompt.template)

    if callable(engine):
        engine = engine()
    n = shards.num_chunks(len(examples), t.questions_per_shard)
    parts_dir = out / schema.STAGE1_PARTS
    shards.check_layout(parts_dir, n)
    pmeta = parts_meta(meta, cfg)
    spec = SamplingSpec(
        max_new_tokens=t.prefix_tokens, temperature=t.temperature, top_p=t.top_p, n=t.n_prefix, seed=cfg.seed
    )
    log.info(
        "sample: %d questions × %d prefixes of %d tokens (T=%.2f, top_p=%.2f) in %d chunk(s)",
        len(examples), t.n_prefix, t.prefix_tokens, t.temperature, t.top_p, n,
    )  # fmt: skip
    for c in tqdm(range(n), desc="sample chunks", unit="chunk", disable=None):
        path = shards.part_path(parts_dir, c, n)
        if path.exists():
            schema.check_meta(path, pmeta)
            continue
        qids = list(range(c * t.questions_per_shard, min((c + 1) * t.questions_per_shard, len(examples))))
        exs = [examples[q] for q in qids]
        prompts = [prompt_ids(engine.tokenizer, cfg, ex) for ex in exs]
        seeds = [derive_seed(cfg.seed, "sample", ex.id) for ex in exs]
        t0 = time.perf_counter()
        results = generate_safe(engine, prompts, spec, seeds, group_size(cfg, t.n_prefix), f"sample chunk {c}")
        rows, ntok = [], 0
        for q, ex, p, res in zip(qids, exs, prompts, results):
            for j in range(t.n_prefix):
                s = None if isinstance(res, str) else res[j]
                ntok += s.num_tokens if s else 0
                rows.append(
                    {
                        "question_id": q,
                        "question": ex.question,
                        "ground_truth": ex.gold,
                        "sample_id": j,
                        "token_2048": s.text if s else "",
                        "example_id": ex.id,
                        "prompt_ids": p,
                        "prefix_ids": list(s.token_ids) if s else [],
                        "prefix_finished": bool(s and s.finish_reason == FINISH_STOP),
                        "error": None if s else res,
                    }
                )
        schema.write(path, schema.table(schema.STAGE1, rows, pmeta))
        dt = time.perf_counter() - t0
        log.info("sample: chunk %d/%d done: %d prefixes, %d tokens, %.1f tok/s", c + 1, n, len(rows), ntok, ntok / max(dt, 1e-9))
    shards.merge(parts_dir, n, target)
    done = schema.read(target, ["prefix_finished", "error"]).to_pydict()
    log.info(
        "sample: wrote %s (%d rows; %d prefixes finished before %d tokens; %d failed)",
        target, len(done["error"]), sum(done["prefix_finished"]), t.prefix_tokens, sum(e is not None for e in done["error"]),
    )  # fmt: skip
    return target
