"""Stage 1 (sample): a seeded sample of n_questions; n_prefix prefixes of prefix_tokens each.

Questions: the task's train split, or ``token2048.data_path`` (a parquet / jsonl in verl's
format: ``prompt`` chat list, ``reward_model.ground_truth``, ``data_source``; parsed by the
task loader's ``dapo_row``), then a seeded subsample of n_questions kept in file order.

-> ``stage1_output.parquet``: one row per (question, sample) with the seed's columns plus the
prompt ids, the prefix ids and ``prefix_finished`` (EOS came before the token limit).
Written by question chunk (``stage1_parts/part-<c>-of-<n>.parquet``), so a killed run resumes
at the first missing chunk, and sharded like stage 3: chunk c belongs to the process with
``shard_index = c % num_shards``. Prefix j of question q draws from a generator seeded by
(seed, q's task id, j), independent of batching, chunking, sharding and n_questions, so
sharded runs merged equal an unsharded one. Whichever process finds all parts present at its
end merges them into ``stage1_output.parquet`` (prepare merges too if that was missed).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from esm_steer import runtime
from esm_steer.config import ConfigError
from esm_steer.data.rows import dapo_row, parse_rows
from esm_steer.data.sources import read_rows
from esm_steer.data.tasks import Example, subsample
from esm_steer.engine.base import FINISH_STOP, SamplingSpec
from esm_steer.seeds import derive_seed
from esm_steer.token2048 import schema, shards
from esm_steer.token2048.meta import parts_meta, stage1_meta

log = logging.getLogger(__name__)

# the columns dapo_row reads: a verl parquet is read without its other columns
_VERL_COLUMNS = (
    "prompt",
    "reward_model",
    "data_source",
    "extra_info",
    "id",
    "problem",
    "question",
    "answer",
    "solution",
)


def read_data_path(path_str: str) -> list[Example]:
    """Every usable, distinct question of a verl-format file; bad rows are skipped and counted.
    A missing or unreadable file -> ConfigError naming token2048.data_path."""
    path = Path(path_str).expanduser()
    key = f"token2048.data_path={path_str}"
    if not path.is_file():
        raise ConfigError(f"{key}: no such file")
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise ConfigError(f"{key}: expected a .parquet, .jsonl or .json file in verl's format")
    try:
        if path.suffix == ".parquet":
            cols = [c for c in pq.read_schema(path).names if c in _VERL_COLUMNS]
            rows = pq.read_table(path, columns=cols).to_pylist()
        else:
            rows = read_rows(path)
    except Exception as e:  # noqa: BLE001 - a corrupt / foreign file: one line
        msg = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{key}: cannot read it ({type(e).__name__}: {msg})") from None

    # verl's DAPO-Math-17k parquet repeats every problem: dedupe
    examples, skipped = parse_rows(rows, dapo_row, path.stem, dedupe=True)
    sources = Counter(str(ex.meta.get("data_source", "none")) for ex in examples)
    reasons = ", ".join(f"{k}: {v}" for k, v in skipped.most_common()) or "none"
    log.info(
        "token2048.data_path=%s: loaded %d, skipped %d (%s); data_source: %s",
        path,
        len(examples),
        sum(skipped.values()),
        reasons,
        ", ".join(f"{k} {v}" for k, v in sources.most_common()),
    )
    if not examples:
        raise ConfigError(f"{key}: no usable rows (skipped: {reasons})")
    return examples


def load_questions(cfg) -> list[Example]:
    """The seeded subsample of n_questions (file order kept) from token2048.data_path, or else
    from the task's train split (as esm-mine reads it: disjoint from val and test)."""
    n = cfg.token2048.n_questions
    if cfg.token2048.data_path:
        source = f"token2048.data_path={cfg.token2048.data_path}"
        examples = subsample(read_data_path(cfg.token2048.data_path), n, cfg.seed)
    else:
        source = f"task {cfg.task.dataset}"
        examples = runtime.load_examples(cfg, cfg.task.train_split, n)
    if len(examples) < n:
        log.warning("%s has %d questions < token2048.n_questions=%d: using all", source, len(examples), n)
    return examples


def run_sample(cfg, out: Path, engine, examples: list | None = None) -> bool:
    """This shard's missing chunks; True when every chunk (all shards) is on disk and merged.
    ``engine``: an Engine, or a callable returning one (loaded only if there is work)."""
    t = cfg.token2048
    target = out / schema.STAGE1
    meta = stage1_meta(cfg)
    if target.exists():
        schema.check_meta(target, meta)
        log.info("sample: %s exists; skipping", target)
        return True
    if examples is None:
        examples = load_questions(cfg)
    if cfg.task.dataset == "dapo_math" and cfg.prompt.template not in ("dapo", "auto"):
        log.warning("task=dapo_math with prompt=%s: the math_dapo grader expects prompt=dapo", cfg.prompt.template)

    n = shards.num_chunks(len(examples), t.questions_per_shard)
    parts_dir = out / schema.STAGE1_PARTS
    shards.check_layout(parts_dir, n)
    pmeta = parts_meta(meta, cfg)
    mine = shards.my_chunks(n, t.shard_index, t.num_shards)
    todo = [c for c in mine if not shards.part_path(parts_dir, c, n).exists()]
    for c in mine:
        if c not in todo:
            schema.check_meta(shards.part_path(parts_dir, c, n), pmeta)
    spec = SamplingSpec(
        max_new_tokens=t.prefix_tokens, temperature=t.temperature, top_p=t.top_p, n=t.n_prefix, seed=cfg.seed
    )
    log.info(
        "sample: %d questions × %d prefixes of %d tokens (T=%.2f, top_p=%.2f); shard %d/%d owns %d of %d chunk(s), "
        "%d to do (%d done before)",
        len(examples),
        t.n_prefix,
        t.prefix_tokens,
        t.temperature,
        t.top_p,
        t.shard_index,
        t.num_shards,
        len(mine),
        n,
        len(todo),
        len(mine) - len(todo),
    )
    if todo and callable(engine):
        engine = engine()
    for c in tqdm(todo, desc="sample chunks", unit="chunk", disable=None):
        qids = list(range(c * t.questions_per_shard, min((c + 1) * t.questions_per_shard, len(examples))))
        exs = [examples[q] for q in qids]
        prompts = runtime.prompt_ids(engine, cfg, exs)
        seeds = [derive_seed(cfg.seed, "sample", ex.id) for ex in exs]
        t0 = time.perf_counter()
        results = runtime.generate_samples(
            engine, prompts, spec, seeds, runtime.group_size(cfg, t.n_prefix), f"sample chunk {c}"
        )
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
        schema.write(shards.part_path(parts_dir, c, n), schema.table(schema.STAGE1, rows, pmeta))
        dt = time.perf_counter() - t0
        rate = ntok / max(dt, 1e-9)
        log.info("sample: chunk %d/%d done: %d prefixes, %d tokens, %.1f tok/s", c + 1, n, len(rows), ntok, rate)
    gone = shards.missing(parts_dir, n)
    if gone:
        msg = "sample: shard %d done; %d part(s) of other shards still missing: prepare waits for them"
        log.info(msg, t.shard_index, len(gone))
        return False
    merge_stage1(parts_dir, n, target, pmeta)
    return True


def merge_stage1(parts_dir: Path, n: int, target: Path, pmeta: dict) -> Path:
    shards.merge(parts_dir, n, target, pmeta)
    done = schema.read(target, ["prefix_finished", "error"]).to_pydict()
    log.info(
        "sample: wrote %s (%d rows; %d prefixes finished before %s tokens; %d failed)",
        target,
        len(done["error"]),
        sum(done["prefix_finished"]),
        pmeta["token2048.prefix_tokens"],
        sum(e is not None for e in done["error"]),
    )
    return target
