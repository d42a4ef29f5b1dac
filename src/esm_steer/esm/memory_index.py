"""Stage III's index (memory): from mining states to library tools; esm-memory builds it
(:mod:`esm_steer.esm.memory`), eval and case search it.

One entry per (tool, mining state): every state at the tool's (q, m) — h at the last token
before control point m of each rollout of P∪N — so a tool has several anchors (docs/method.md,
Stage III). ``offline_memory.entries: contrast`` keys a tool once, on μ⁻ (the mean failing
state), as STIR does; ``null_anchors`` turns the succeeding states (μ⁺, or each P state) into
entries without a tool (``tool_id`` null), so that null competes as "this looks like success".
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

from esm_steer import provenance
from esm_steer.esm import artifacts
from esm_steer.esm.library import Library, now_iso
from esm_steer.io import atomic_save, atomic_write_jsonl, atomic_write_text, read_jsonl
from esm_steer.runs import RunError

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
        elif k in ("normalised", "centered", "null_anchors"):
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

    def search(self, queries: np.ndarray, k: int, ms: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(sims [B, k] float32, idx [B, k] int64) by inner product; queries are normalised
        here when the keys are (then sims are cosines). Missing hits: idx −1, sim −inf.
        ``ms``: the control point of each query; only entries mined at that m are searched
        (``online.retrieve_same_m``)."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.keys.shape[1]:
            raise ValueError(f"memory search: queries have d={q.shape[1]}, the memory d={self.keys.shape[1]}")
        if self.center is not None:
            q = q - self.center
        if self.normalised:
            q = l2_normalise(q)
        if ms is None:
            return self._search(self.index, None, q, k)
        sims = np.full((len(q), int(k)), -np.inf, dtype=np.float32)
        idx = np.full((len(q), int(k)), -1, dtype=np.int64)
        for m in sorted(set(int(x) for x in ms)):
            rows = [b for b, x in enumerate(ms) if int(x) == m]
            index, ids = self._index_of_m(m)
            if index is not None:
                sims[rows], idx[rows] = self._search(index, ids, q[rows], k)
        return sims, idx

    @staticmethod
    def _search(index, ids: np.ndarray | None, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, idx = index.search(np.ascontiguousarray(q), int(k))
        idx = idx.astype(np.int64)
        if ids is not None:  # a sub-index: its rows back to the memory's entry indices
            idx = np.where(idx >= 0, ids[np.clip(idx, 0, None)], -1)
        sims = np.where(idx >= 0, sims, -np.inf).astype(np.float32)
        return sims, idx

    def _index_of_m(self, m: int):
        """(faiss index over the entries mined at m, their entry indices); (None, None) if none."""
        cache = self.__dict__.setdefault("_by_m", {})
        if m not in cache:
            import faiss

            ids = np.array([i for i, e in enumerate(self.entries) if int(e["m"]) == m], dtype=np.int64)
            index = None
            if len(ids):
                index = faiss.IndexFlatIP(self.keys.shape[1])
                index.add(np.ascontiguousarray(self.keys[ids]))
            cache[m] = (index, ids)
        return cache[m]

    @property
    def has_null_anchors(self) -> bool:
        return any(e.get("tool_id") is None for e in self.entries)

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


ENTRIES = ("states", "contrast")  # offline_memory.entries


def _tool_keys(t, entries: str, null_anchors: bool) -> list[tuple[str | None, str | int, np.ndarray]]:
    """(tool_id or None for an anchor, which state, key) of one tool's entries."""
    states = t.states.float().numpy()
    n_pos = int(t.meta.get("n_pos", 0))
    if null_anchors and not 0 < n_pos < len(states):
        raise RunError(f"tool {t.tool_id}: null anchors need its P and N states (n_pos={n_pos}, {len(states)} states)")
    if entries == "contrast":
        if not 0 < n_pos < len(states):
            raise RunError(f"tool {t.tool_id}: entries=contrast needs its P and N states (n_pos={n_pos})")
        out = [(t.tool_id, "neg_mean", states[n_pos:].mean(0))]
        return out + ([(None, "pos_mean", states[:n_pos].mean(0))] if null_anchors else [])
    if not null_anchors:
        return [(t.tool_id, i, s) for i, s in enumerate(states)]
    return [(None if i < n_pos else t.tool_id, i, s) for i, s in enumerate(states)]


def check_online(online_cfg, run_dir: str | os.PathLike) -> None:
    """Refuse, before any model loads, online keys that the memory of ``run_dir`` cannot serve
    (one line naming the keys): null scored from anchors on a memory built without them."""
    meta_path = Path(run_dir) / artifacts.MEMORY_DIR / artifacts.MEMORY_META
    if online_cfg.null_score != "anchors" or not meta_path.exists():
        return  # no memory yet: Memory.load says so, with the rebuild command
    provenance.verify(meta_path.parent, STAGE)  # a damaged memory: the rebuild command, not a wrong reason
    with provenance.reading(meta_path, provenance.command(STAGE, meta_path.parent.resolve().parent.name)):
        meta = _parse_meta(meta_path.read_text(encoding="utf-8"))
    if not meta.get("null_anchors", False):
        raise RunError(
            f"online.null_score=anchors needs null anchors, but {meta_path} records a memory built without "
            "them: rebuild it with offline_memory.null_anchors=true, or set online.null_score=zero"
        )


def build_memory(
    library: Library,
    normalize_keys: bool = True,
    T_max: int | None = None,
    center_keys: bool = False,
    entries_of: str = "states",
    null_anchors: bool = False,
) -> Memory:
    """One entry per (tool, mining state), or per tool and anchor (``entries_of``, ``null_anchors``)."""
    if entries_of not in ENTRIES:
        raise ValueError(f"offline_memory.entries={entries_of!r}: one of {', '.join(ENTRIES)}")
    rows, entries = [], []
    for t in library.tools:
        for tool, state, key in _tool_keys(t, entries_of, null_anchors):
            entries.append(
                {
                    "entry_id": len(entries),
                    "tool_id": tool,
                    "question_id": t.question_id,
                    "m": int(t.m),
                    "Q": float(t.Q),
                    "state": state,
                }
            )
            rows.append(key)
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
        "entries": entries_of,
        "null_anchors": bool(null_anchors),
    }
    return Memory(keys, entries, meta, center=center)
