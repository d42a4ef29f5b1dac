"""Question chunks written as parquet part files: the unit of resume and of sharding
(stage 1 in ``stage1_parts/``, stage 3 in ``stage3_parts/``).

Chunk c holds the questions ``question_id in [c·q, (c+1)·q)`` (q = questions_per_shard) and
is written atomically to ``part-<c>-of-<n>.parquet`` once all of it is done, so a part file on
disk is always complete: a killed run redoes at most the chunk it was in. Chunk c belongs to
shard ``c % num_shards``; processes with different ``shard_index`` share one run dir.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from esm_steer.runs import RunError
from esm_steer.token2048.schema import check_meta, intact
from esm_steer.token2048.schema import save as save_verified

log = logging.getLogger(__name__)


def num_chunks(num_questions: int, per_shard: int) -> int:
    return max(1, -(-num_questions // per_shard))


def part_path(parts_dir: Path, chunk: int, n: int) -> Path:
    return parts_dir / f"part-{chunk:05d}-of-{n:05d}.parquet"


def my_chunks(n: int, shard_index: int, num_shards: int) -> list[int]:
    return [c for c in range(n) if c % num_shards == shard_index]


def missing(parts_dir: Path, n: int) -> list[int]:
    return [c for c in range(n) if not part_path(parts_dir, c, n).exists()]


def chunking(parts_dir: Path) -> int | None:
    """The number of chunks the parts on disk were written for (None: no part yet)."""
    names = sorted(p.name for p in parts_dir.glob("part-*-of-*.parquet")) if parts_dir.is_dir() else []
    return int(names[0].rsplit("-of-", 1)[1].split(".", 1)[0]) if names else None


def require_all(parts_dir: Path, n: int, num_shards: int, what: str, producer: str = "continue") -> None:
    """RunError in one line naming the missing parts and the shards that owe them
    (``producer``: the stage that writes them)."""
    gone = missing(parts_dir, n)
    if gone:
        names = ", ".join(part_path(parts_dir, c, n).name for c in gone[:8]) + (" ..." if len(gone) > 8 else "")
        owners = sorted({c % num_shards for c in gone})
        raise RunError(
            f"{what}: {len(gone)} of {n} parts missing in {parts_dir} ({names}); "
            f"run stage={producer} for token2048.shard_index in {owners} (num_shards={num_shards}) first"
        )


def merge(parts_dir: Path, n: int, target: Path, meta: dict | None = None) -> Path:
    """Concatenate the n parts into ``target`` (atomic), streaming one part at a time so a
    seed-sized stage 3 (800k rollouts) never sits in memory whole. Skipped when ``target``
    already holds exactly the parts' rows (parts are immutable once written). ``meta``: the
    provenance every part must match (shards are separate processes: one may have run with
    other values)."""
    paths = [part_path(parts_dir, c, n) for c in range(n)]
    for p in paths:
        check_meta(p, meta or {})  # also the size and hash of each part
    total = sum(pq.read_metadata(p).num_rows for p in paths)
    if target.exists() and intact(target) and pq.read_metadata(target).num_rows == total:
        return target
    sch = pq.read_schema(paths[0])

    def save(tmp: str) -> None:
        with pq.ParquetWriter(tmp, sch) as w:
            for p in paths:
                w.write_table(pq.read_table(p).cast(sch))

    save_verified(target, save)
    log.info("merged %d parts (%d rows) into %s", n, total, target)
    return target


def check_layout(parts_dir: Path, n: int) -> None:
    """Refuse part files of another chunking (questions_per_shard changed mid-run)."""
    if not parts_dir.is_dir():
        return
    other = sorted(p.name for p in parts_dir.glob("part-*.parquet") if not p.name.endswith(f"-of-{n:05d}.parquet"))
    if other:
        raise RunError(
            f"{parts_dir} holds parts of another chunking ({other[0]}, expected -of-{n:05d}): "
            "token2048.questions_per_shard changed; restore it or use a new run dir"
        )
