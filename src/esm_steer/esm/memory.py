"""Stage III (memory): the index from mining states to library tools.

One entry per (tool, mining state): every state at the tool's (q, m) — h at the last token
before control point m of each rollout of P∪N — so a tool has several anchors (docs/method.md,
Stage III).
Keys are L2-normalised when ``offline_memory.normalize_keys``; inner-product search on them
is cosine similarity (faiss ``IndexFlatIP``, exact). With ``offline_memory.center_keys`` the
mean key is subtracted first (from keys and queries alike): residual-stream states are
strongly anisotropic — raw mining keys of one task have mean pairwise cosine ≈ 0.99 — so
without centring every entry looks similar and ``min_sim`` cannot separate them.

Files under ``<run dir>/memory/``: ``keys.npy`` (float32 [N, d]), ``entries.jsonl``
(entry_id, tool_id, question_id, m, Q, state), ``meta.txt`` (``key: value`` lines: model,
layer, d, N, normalised, created, T_max), ``index.faiss`` (and ``center.npy`` when centred), then
``manifest.json`` with their sizes and hashes, checked before every load (``esm_steer.provenance``);
the names are ``esm_steer.esm.artifacts``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from esm_steer import provenance
from esm_steer.esm import artifacts
from esm_steer.esm.library import Library, now_iso
from esm_steer.io import atomic_save, atomic_write_jsonl, atomic_write_text, read_jsonl
from esm_steer.runs import RunError, write_latest

log = logging.getLogger(__name__)

STAGE = artifacts.MAKER[artifacts.MEMORY_DIR]
_META_TYPES = {"layer": int, "d": int, "N": int, "T_max": int}


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0).astype(np.float32)


def _parse_meta(text: str) -> dict:
    meta: dict = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        k, v = (s.strip() for s in line.split(":", 1))
        if k in _META_TYPES:
            meta[k] = _META_TYPES[k](v) if v not in ("", "None") else None
        elif k in ("normalised", "centered"):
            meta[k] = v.lower() in ("true", "1", "yes")
        else:
            meta[k] = v
    return meta


class Memory:
    def __init__(self, keys: np.ndarray, entries: list[dict], meta: dict, index=None, center: np.ndarray | None = None):
        self.keys = np.ascontiguousarray(keys, dtype=np.float32)
        self.center = None if center is None else np.asarray(center, dtype=np.float32)
        self.entries = list(entries)
        self.meta = dict(meta)
        if len(self.entries) != len(self.keys):
            raise ValueError(f"memory: {len(self.keys)} keys but {len(self.entries)} entries")
        self._index = index

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def normalised(self) -> bool:
        return bool(self.meta.get("normalised", False))

    @property
    def index(self):
        if self._index is None:
            import faiss

            self._index = faiss.IndexFlatIP(self.keys.shape[1])
            if len(self.keys):
                self._index.add(self.keys)
        return self._index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims [B, k] float32, idx [B, k] int64) by inner product; queries are normalised
        here when the keys are (then sims are cosines). Missing hits: idx −1, sim −inf."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.keys.shape[1]:
            raise ValueError(f"memory search: queries have d={q.shape[1]}, the memory d={self.keys.shape[1]}")
        if self.center is not None:
            q = q - self.center
        if self.normalised:
            q = l2_normalise(q)
        sims, idx = self.index.search(np.ascontiguousarray(q), int(k))
        idx = idx.astype(np.int64)
        sims = np.where(idx >= 0, sims, -np.inf).astype(np.float32)
        return sims, idx

    # ------------------------------------------------------------ disk

    def save(self, run_dir: str | os.PathLike) -> Path:
        import faiss

        root = Path(run_dir) / artifacts.MEMORY_DIR
        provenance.begin(root, STAGE)
        atomic_save(root / artifacts.MEMORY_KEYS, lambda p: np.save(p, self.keys))
        atomic_write_jsonl(root / artifacts.MEMORY_ENTRIES, self.entries)
        if self.center is not None:
            atomic_save(root / artifacts.MEMORY_CENTER, lambda p: np.save(p, self.center))
        atomic_save(root / artifacts.MEMORY_INDEX, lambda p: faiss.write_index(self.index, p))
        lines = [f"{k}: {v}" for k, v in self.meta.items()]
        atomic_write_text(root / artifacts.MEMORY_META, "\n".join(lines) + "\n")  # last: marks a complete memory
        files = [artifacts.MEMORY_KEYS, artifacts.MEMORY_ENTRIES, artifacts.MEMORY_INDEX, artifacts.MEMORY_META]
        files += [artifacts.MEMORY_CENTER] if self.center is not None else []
        provenance.seal(root, STAGE, files)
        return root

    @classmethod
    def load(cls, run_dir: str | os.PathLike, model_id: str | None = None, steer_layer: int | None = None) -> Memory:
        """The memory of a run dir; refuses one built for another model or layer."""
        root = Path(run_dir) / artifacts.MEMORY_DIR
        meta_path, keys_path, entries_path = (
            artifacts.require(root / name, STAGE)
            for name in (artifacts.MEMORY_META, artifacts.MEMORY_KEYS, artifacts.MEMORY_ENTRIES)
        )
        index_path = root / artifacts.MEMORY_INDEX
        provenance.verify(root, STAGE)
        rebuild = provenance.command(STAGE, root.resolve().parent.name)
        with provenance.reading(meta_path, rebuild):
            meta = _parse_meta(meta_path.read_text(encoding="utf-8"))
        expected = {} if model_id is None else {"model": str(model_id)}
        expected.update({} if steer_layer is None else {"layer": int(steer_layer)})
        provenance.check_same(
            {"model": str(meta.get("model")), "layer": meta.get("layer")},
            expected,
            f"{meta_path} records a memory",
            "rebuild it (esm-mine/select/memory) for this model",
            shared=True,
        )
        with provenance.reading(keys_path, rebuild):
            keys = np.load(keys_path)
        index = None
        if index_path.exists():
            import faiss

            with provenance.reading(index_path, rebuild):
                index = faiss.read_index(str(index_path))
            if index.ntotal != len(keys):
                log.warning("%s: index has %d vectors, keys.npy %d: rebuilding", root, index.ntotal, len(keys))
                index = None
        center = None
        if meta.get("centered"):
            center_path = artifacts.require(root / artifacts.MEMORY_CENTER, STAGE)
            with provenance.reading(center_path, rebuild):
                center = np.load(center_path)
        with provenance.reading(entries_path, rebuild):
            entries = read_jsonl(entries_path)
        if len(entries) != len(keys):
            raise provenance.ArtifactError(
                f"{root}: {len(keys)} keys but {len(entries)} entries (a damaged memory); rebuild it: {rebuild}"
            )
        return cls(keys, entries, meta, index, center)


def build_memory(
    library: Library, normalize_keys: bool = True, T_max: int | None = None, center_keys: bool = False
) -> Memory:
    """One entry per (tool, mining state)."""
    rows, entries = [], []
    for t in library.tools:
        states = t.states.float().numpy()
        for i, s in enumerate(states):
            entries.append(
                {
                    "entry_id": len(entries),
                    "tool_id": t.tool_id,
                    "question_id": t.question_id,
                    "m": int(t.m),
                    "Q": float(t.Q),
                    "state": i,
                }
            )
            rows.append(s)
    d = int(library.meta.get("hidden_size") or (library.tools[0].states.shape[1] if library.tools else 0))
    keys = np.stack(rows).astype(np.float32) if rows else np.zeros((0, d), np.float32)
    center = None
    if center_keys and len(keys):
        center = keys.mean(axis=0)
        keys = keys - center
    if normalize_keys:
        keys = l2_normalise(keys)
    meta = {
        "model": library.meta.get("model_id"),
        "layer": library.meta.get("steer_layer"),
        "dtype": library.meta.get("dtype"),
        "d": keys.shape[1],
        "N": keys.shape[0],
        "normalised": bool(normalize_keys),
        "centered": center is not None,
        "created": now_iso(),
        "tools": len(library),
        "T_max": T_max,
    }
    return Memory(keys, entries, meta, center=center)


def run(cfg: DictConfig, run, engine=None) -> None:
    """esm-memory (no model: ``engine`` is accepted for the one stage signature and unused)."""
    library = Library.load(run.dir)
    if not len(library):
        path = run.path(artifacts.LIBRARY_DIR, artifacts.LIBRARY_JSONL)
        raise RunError(f"{path} has no tools; rerun esm-select")
    memory = build_memory(
        library,
        bool(cfg.offline_memory.normalize_keys),
        int(cfg.decode.max_new_tokens),
        center_keys=bool(cfg.offline_memory.center_keys),
    )
    memory.save(run.dir)
    per_tool = len(memory) / len(library)
    log.info(
        "memory: %d entries from %d tools (%.1f states per tool), d=%d, centered=%s normalised=%s, model %s layer %s",
        len(memory),
        len(library),
        per_tool,
        memory.meta["d"],
        memory.meta["centered"],
        memory.normalised,
        memory.meta["model"],
        memory.meta["layer"],
    )
    write_latest(run.dir)
