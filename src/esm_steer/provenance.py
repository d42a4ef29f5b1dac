"""Provenance of every artifact: the settings that made it, and the bytes that were written.

Settings. A stage records the config values its output depends on (a fingerprint: JSON beside
a record log or a stage dir, or the metadata of a parquet file) and a rerun compares them:
:func:`fingerprint` (config keys -> values), :func:`diff`, :func:`check_same` (the one refusal: one
line naming the file and the differing keys), :func:`check_or_write` (JSON),
:func:`with_parquet_meta` / :func:`check_parquet_meta` (parquet). A rerun never silently mixes
outputs made under other settings.

Bytes. A stage records the size and sha256 of every file it writes in ``<stage dir>/manifest.json``
({"stage", "complete", "command", "files": {relative path: {size, sha256}}}), written atomically
after the files (:func:`begin` marks a stage dir being rewritten, :func:`seal` completes it).
Parquet files of token-2048 carry one sidecar each (``<file>.manifest.json``), since shard
processes write into one dir at once. A reader calls :func:`verify` (or :func:`verify_file`)
before it loads: a missing, truncated or altered file stops the run with one line naming the
file, what is wrong and the command that rebuilds it. Files are hashed once per load.

Append-only record logs (rollouts, per-example records) are not hashed: a cut last line is
dropped on resume and a bad line in the middle is an error naming it (:mod:`esm_steer.io`).
Old run dirs without a manifest are read with one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from esm_steer.io import atomic_write_json
from esm_steer.runs import RunError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIDECAR = ".manifest.json"  # <file>.manifest.json: one parquet file's record
_CHUNK = 1 << 20
_warned: set[str] = set()
_verified: dict[str, tuple] = {}  # path -> stat signature of a file already hashed in this process


class ArtifactError(RunError):
    """An artifact on disk is missing, cut short or altered; one line with the rebuild command."""


# ---------------------------------------------------------------- settings


def fingerprint(cfg: DictConfig, keys: Sequence[str]) -> dict:
    """The values of the dotted config ``keys`` (resolved, plain JSON types): what an artifact depends on."""
    out = {}
    for k in keys:
        v = OmegaConf.select(cfg, k, throw_on_missing=True)
        out[k] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    return out


def diff(old: Any, new: Any, prefix: str = "", shared: bool = False) -> list[str]:
    """``key: old -> new`` for every leaf that differs (nested dicts by dotted key); ``shared``:
    only keys both sides have (an artifact written before a key was recorded is not refused)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) & set(new) if shared else set(old) | set(new)
        out = []
        for k in sorted(keys):
            out += diff(old.get(k), new.get(k), f"{prefix}{k}.", shared)
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_same(found: dict, expected: dict, what: str, remedy: str, shared: bool = False) -> None:
    """RunError, one line, when ``found`` (what made an artifact) differs from ``expected`` (this run):
    ``<what> made with other settings (key: old -> new; ...): <remedy>``. ``what`` names the file."""
    changed = diff(found, expected, shared=shared)
    if changed:
        more = "; ..." if len(changed) > 3 else ""
        raise RunError(f"{what} made with other settings ({'; '.join(changed[:3])}{more}): {remedy}")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); delete it and rerun the stage that writes it") from None


def check_or_write(
    path: str | os.PathLike,
    fingerprint: dict,
    what: str,
    remedy: str,
    check: bool = True,
    shared: bool = False,
    extra: dict | None = None,
) -> None:
    """Refuse (:func:`check_same`) when the JSON at ``path`` holds another fingerprint, then write this one.

    ``what`` names what would be mixed ("<file> holds 12 records"), ``remedy`` what to do instead;
    ``check=False`` only writes (nothing on disk depends on the old fingerprint); ``extra``: written
    beside the fingerprint, never compared."""
    path = Path(path)
    extra = extra or {}
    if check and path.exists():
        old = {k: v for k, v in read_json(path).items() if k not in extra}
        check_same(old, fingerprint, what, remedy, shared)
    atomic_write_json(path, {**fingerprint, **extra})


def with_parquet_meta(schema: pa.Schema, key: bytes, fingerprint: dict) -> pa.Schema:
    """``schema`` carrying ``fingerprint`` as JSON under ``key`` (the parquet form of a fingerprint)."""
    return schema.with_metadata({key: json.dumps(fingerprint, sort_keys=True).encode()})


def parquet_meta(path: str | os.PathLike, key: bytes, rebuild: str = "rerun the stage that writes it") -> dict:
    """The JSON provenance stored under ``key`` in a parquet file's schema metadata ({} if none)."""
    with reading(path, rebuild):
        md = pq.read_schema(path).metadata or {}
    return json.loads(md[key]) if key in md else {}


def check_parquet_meta(path: str | os.PathLike, key: bytes, expected: dict, rebuild: str = "rerun its stage") -> dict:
    """The file's provenance; RunError (:func:`check_same`, keys both have) when one of ``expected`` differs."""
    found = parquet_meta(path, key, rebuild)
    check_same(found, expected, str(path), "use the same values or a new run dir (outputs.run_id)", shared=True)
    return found


# ---------------------------------------------------------------- bytes


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    path = Path(path)
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _hydra_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except Exception:  # noqa: BLE001 - outside a Hydra job there is nothing to copy
        return []


def command(entry: str, run_id: str, stage: str | None = None) -> str:
    """The command line that (re)writes an artifact: this job's overrides, its run id."""
    drop = ("outputs.run_id=", "stage=", "hydra.")
    args = [a for a in _hydra_overrides() if not a.lstrip("+~").startswith(drop)]
    parts = [f"esm-{entry}"] + ([f"stage={stage}"] if stage else []) + (args or ["..."])
    return " ".join(parts + [f"outputs.run_id={run_id}"])


def begin(stage_dir: str | os.PathLike, entry: str) -> None:
    """Mark ``stage_dir`` as being rewritten: a reader of a dir whose stage was killed before
    :func:`seal` is told so, instead of reading a mix of old and new files."""
    stage_dir = Path(stage_dir)
    if (stage_dir / MANIFEST).exists() or any(stage_dir.glob("*")):
        atomic_write_json(stage_dir / MANIFEST, {"stage": entry, "complete": False, "files": {}})


def seal(stage_dir: str | os.PathLike, entry: str, files: Iterable[str | os.PathLike], run_id: str | None = None):
    """Write ``stage_dir/manifest.json`` with the size and sha256 of ``files`` (relative to
    ``stage_dir``); call it after every file is written."""
    stage_dir = Path(stage_dir)
    run_id = run_id or stage_dir.resolve().parent.name
    recs = {Path(f).as_posix(): file_record(stage_dir / f) for f in sorted(map(str, files))}
    manifest = {
        "stage": entry,
        "complete": True,
        "command": command(entry, run_id),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "files": recs,
    }
    path = atomic_write_json(stage_dir / MANIFEST, manifest)
    for rel in recs:
        remember(stage_dir / rel)
    return path


def _signature(path: Path) -> tuple:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def remember(path: Path) -> None:
    """``path`` as just written or checked: not hashed again in this process while untouched."""
    _verified[str(path.resolve())] = _signature(path)


def _check(path: Path, rec: dict, rebuild: str) -> None:
    """One file against its record; ArtifactError (missing / size / hash) naming the rebuild."""
    if not path.exists():
        raise ArtifactError(f"{path}: missing; rebuild it: {rebuild}")
    key = str(path.resolve())
    if _verified.get(key) == _signature(path):
        return  # hashed already in this process and untouched since
    size = path.stat().st_size
    if size != rec["size"]:
        raise ArtifactError(f"{path}: size {size} bytes, {rec['size']} were written (cut short); rebuild it: {rebuild}")
    if sha256_file(path) != rec["sha256"]:
        raise ArtifactError(f"{path}: hash differs from the one written (altered); rebuild it: {rebuild}")
    remember(path)


def _warn_once(where: Path, text: str) -> None:
    if str(where) not in _warned:
        _warned.add(str(where))
        log.warning("%s: %s", where, text)


def verify(stage_dir: str | os.PathLike, entry: str, rebuild: str | None = None) -> dict | None:
    """Check every file of ``stage_dir``'s manifest before loading (ArtifactError, one line).

    ``entry``: the command that writes the dir (``mine``, ``select``, ``memory``); the rebuild
    command is the one the manifest recorded, else ``rebuild``, else ``esm-<entry> ... outputs.run_id=<id>``.
    Returns the manifest, or None for an old dir without one (one warning)."""
    stage_dir = Path(stage_dir)
    path = stage_dir / MANIFEST
    fallback = rebuild or command(entry, stage_dir.resolve().parent.name)
    if not path.exists():
        _warn_once(stage_dir, f"no {MANIFEST} (written before file verification): its files are not checked")
        return None
    manifest = read_json(path)
    if not manifest.get("complete"):
        raise ArtifactError(f"{stage_dir}: esm-{entry} was stopped while writing it; rebuild it: {fallback}")
    cmd = manifest.get("command") or fallback
    if " ... " in cmd and rebuild:
        cmd = rebuild
    for rel, rec in manifest.get("files", {}).items():
        _check(stage_dir / rel, rec, cmd)
    return manifest


# ---------------------------------------------------------------- single files (token-2048 parquet)


def sidecar(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR)


def unseal_file(path: str | os.PathLike) -> None:
    """Drop a file's record (with the file)."""
    with contextlib.suppress(FileNotFoundError):
        sidecar(path).unlink()


def seal_file(path: str | os.PathLike, rebuild: str, written: str | os.PathLike | None = None) -> Path:
    """Record one file's size and sha256 (and how to rebuild it) beside it. ``written``: the
    temp file about to be renamed to ``path`` (the record then lands before the file does, so
    a full disk or a kill leaves the old file with its old record)."""
    path = Path(path)
    out = atomic_write_json(sidecar(path), {**file_record(written or path), "command": rebuild})
    if written is None:
        remember(path)
    return out


def verify_file(path: str | os.PathLike, rebuild: str) -> None:
    """Check one file against its sidecar; ArtifactError naming the file and ``rebuild``."""
    path = Path(path)
    side = sidecar(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing; rebuild it: {rebuild}")
    if not side.exists():
        _warn_once(path, f"no {side.name} (written before file verification): not checked")
        return
    rec = read_json(side)
    _check(path, rec, rec.get("command") if rec.get("command") and " ... " not in rec["command"] else rebuild)


@contextlib.contextmanager
def reading(path: str | os.PathLike, rebuild: str) -> Iterator[None]:
    """A file that passed (or had no) verification yet cannot be parsed: one line, not a
    library traceback (faiss, pyarrow, torch)."""
    try:
        yield
    except (RunError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - any parser's error on a damaged file
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ArtifactError(f"{path}: cannot be read ({type(e).__name__}: {first}); rebuild it: {rebuild}") from None
