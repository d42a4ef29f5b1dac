"""Artifact I/O shared by every stage: atomic writes and resumable jsonl logs.

Nothing is lost: a file is written to a temp name beside it and renamed over the target,
so a killed stage leaves either the old or the new file, never half of one. Per-example
records go to append-only jsonl files, one flushed line each; a line cut by a kill is
ignored (and truncated away) on resume, a bad line before the last is a RecordError naming
``file:line``. A full disk is a DiskFullError (one line; the previous file stays in place).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run directory problem (missing LATEST, missing or damaged artifacts); one line.

    Defined here, the bottom of the import graph, so that I/O can raise it; use it as
    ``esm_steer.runs.RunError``."""


class RecordError(RunError):
    """A record log with a bad line that is not its last (corrupt, not cut by a kill)."""


class DiskFullError(RunError):
    """No space left while writing: the previous complete file is still in place."""


@contextlib.contextmanager
def _disk_full_is_one_line(path: Path, kept: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(f"{path}: no space left on the device while writing it; {kept}; free space, rerun") from e


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with _disk_full_is_one_line(path, "the previous file is kept" if path.exists() else "nothing was written"):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return _atomic(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


def atomic_save(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Atomic write through any saver taking a path (np.save, df.to_parquet, fig.savefig...).

    The temp name keeps the target's suffix so savers that infer the format from it work.
    """
    path = Path(path)

    def write(tmp: str) -> None:
        alt = tmp + path.suffix
        try:
            save(alt)
            os.replace(alt, tmp)
        finally:
            if os.path.exists(alt):
                os.unlink(alt)

    return _atomic(path, write)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete records of a jsonl file ([] if absent); a cut last line is skipped."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:  # bytes: a byte that breaks UTF-8 is reported with its line too
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                if line.endswith(b"\n"):
                    raise RecordError(
                        f"{path}:{i}: not valid JSON (a corrupt record, not a cut one); "
                        "repair or delete that line, or delete the file to regenerate it"
                    ) from None
                log.warning("%s: ignoring a cut last line (a killed run)", path)
                continue
            yield rec


class JsonlAppender:
    """Append-only per-record log that a rerun resumes from.

    ``done_keys`` holds the key of every complete record already on disk; a cut last
    line from a killed run is truncated away before appending.
    """

    def __init__(self, path: str | os.PathLike, key: Callable[[dict], Any] | str = "id"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = (lambda r: r[key]) if isinstance(key, str) else key
        self.records: list[dict] = []
        self._repair()
        self.records = read_jsonl(self.path)
        self.done_keys = {self._key(r) for r in self.records}

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: dropping a cut last record (%d bytes) from a killed run", self.path, len(data) - cut)
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def _write(self, text: str) -> None:
        with _disk_full_is_one_line(self.path, "a cut last record is dropped on resume"):
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

    def append(self, record: dict) -> None:
        k = self._key(record)
        if k in self.done_keys:
            raise ValueError(f"{self.path}: record {k!r} is already written")
        self._write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.records.append(record)
        self.done_keys.add(k)

    def extend(self, records: Iterable[dict]) -> None:
        """Append several records as one write (one question's rollouts, say)."""
        records = list(records)
        keys = [self._key(r) for r in records]
        dup = [k for k in keys if k in self.done_keys]
        if dup or len(set(keys)) != len(keys):
            raise ValueError(f"{self.path}: records {dup or keys} are already written")
        self._write("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
        self.records.extend(records)
        self.done_keys.update(keys)
