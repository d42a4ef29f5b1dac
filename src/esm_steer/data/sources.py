"""Where a split's rows come from: a local file (jsonl / parquet / json), else the hub.

Loading order: a local ``<data_root>/<task>/<split>.jsonl|.parquet|.json`` (or
``<data_root>/<split>.*`` when data_root is the task folder itself), else
``datasets.load_dataset(hub_id, hub_config, split)`` (``datasets`` is imported only then).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from esm_steer.data.example import DataError

EXTENSIONS = (".jsonl", ".parquet", ".json")


def read_rows(path: Path) -> list[dict]:
    """The rows of a .parquet, a .json array or a .jsonl file; DataError names the bad line."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of rows")
        return data
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def local_candidates(task: str, split: str, data_root: str | Path) -> list[Path]:
    """The local files tried for ``task`` / ``split``, in order."""
    root = Path(data_root).expanduser()
    return [d / f"{split}{ext}" for d in (root / task, root) for ext in EXTENSIONS]


def read_local(task: str, split: str, data_root: str | Path | None) -> tuple[list[dict] | None, str]:
    """(rows, path) of the first local file found, or (None, what was tried)."""
    if data_root is None:
        return None, "no data_root"
    cands = local_candidates(task, split, data_root)
    found = next((p for p in cands if p.is_file()), None)
    if found is None:
        return None, f"{cands[0].parent}/{split}.jsonl|parquet|json, {cands[-1].parent}/{split}.*"
    return read_rows(found), str(found)


def read_hub(task: str, split: str, hub_id: str, hub_config: str | None, hub_split: str, tried: str) -> list[dict]:
    """The rows of the hub dataset's ``hub_split``; DataError (one line) when it cannot be loaded."""
    try:
        from datasets import load_dataset

        ds = load_dataset(hub_id, hub_config, split=hub_split)
    except Exception as e:  # noqa: BLE001 - offline, missing split, no datasets: one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"task={task} split={split}: no local file ({tried}) and the hub load of "
            f"{hub_id} (config={hub_config}, split={hub_split}) failed: {type(e).__name__}: {msg}"
        ) from None
    return [dict(r) for r in ds]
