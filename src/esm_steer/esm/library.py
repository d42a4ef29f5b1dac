"""The library: the steering tools chosen by Stage II (select), read by memory and online.

A tool is one mined candidate (question q, control point m): its steering vector v, its
quality Q, its key (mean mining state) and the mining states themselves (the memory's
anchors); docs/method.md, Stage II. On disk, under ``<run dir>/library/`` (names and the tensor
format: ``esm_steer.esm.artifacts``):

- ``library.jsonl``        one line per tool: tool_id, question_id, m, Q, v_norm, n_states, meta
- ``vectors/<tool_id>.pt``, ``keys/<tool_id>.pt``: v and {"key", "states"}
- ``meta.json``            model_id, steer_layer, hidden_size, created (+ how it was selected)
- ``manifest.json``        size and sha256 of each file above, written last (``esm_steer.provenance``)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esm_steer import provenance
from esm_steer.esm import artifacts
from esm_steer.io import atomic_write_json, atomic_write_jsonl, read_jsonl

log = logging.getLogger(__name__)


def tool_id(i: int) -> str:
    return f"t{i:04d}"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class Tool:
    tool_id: str
    question_id: str
    m: int
    Q: float
    vector: torch.Tensor  # [d] steering direction v (not normalised)
    key: torch.Tensor  # [d] mean of the mining states
    states: torch.Tensor  # [n, d] h at the last token before control point m, one per rollout
    meta: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {
            "tool_id": self.tool_id,
            "question_id": self.question_id,
            "m": int(self.m),
            "Q": float(self.Q),
            "v_norm": float(self.vector.norm()),
            "n_states": int(self.states.shape[0]),
            "meta": self.meta,
        }


class Library:
    def __init__(self, tools: list[Tool], meta: dict):
        self.tools = list(tools)
        self.meta = dict(meta)
        self._by_id = {t.tool_id: t for t in self.tools}

    def __len__(self) -> int:
        return len(self.tools)

    def __iter__(self):
        return iter(self.tools)

    def by_id(self, tool_id: str) -> Tool:
        try:
            return self._by_id[tool_id]
        except KeyError:
            raise KeyError(f"no tool {tool_id!r} in the library ({len(self.tools)} tools)") from None

    def top_by_q(self, n: int) -> list[Tool]:
        """The n tools of highest Q (ties: question id, m), e.g. the no_memory ablation's pool."""
        return sorted(self.tools, key=lambda t: (-t.Q, t.question_id, t.m))[:n]

    # ------------------------------------------------------------ disk

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write every file; library.jsonl goes last so a complete jsonl means a complete library,
        then the manifest of their sizes and hashes."""
        root = Path(run_dir) / artifacts.LIBRARY_DIR
        stage = artifacts.MAKER[artifacts.LIBRARY_DIR]
        provenance.begin(root, stage)
        for t in self.tools:
            artifacts.save_steering(root, t.tool_id, t.vector, t.key, t.states)
        ids = [t.tool_id for t in self.tools]
        artifacts.prune_steering(root, set(ids))
        atomic_write_json(root / artifacts.LIBRARY_META, self.meta)
        atomic_write_jsonl(root / artifacts.LIBRARY_JSONL, [t.record() for t in self.tools])
        provenance.seal(root, stage, artifacts.steering_files(ids) + [artifacts.LIBRARY_META, artifacts.LIBRARY_JSONL])
        return root

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Library:
        root = Path(run_dir) / artifacts.LIBRARY_DIR
        stage = artifacts.MAKER[artifacts.LIBRARY_DIR]
        jsonl = artifacts.require(root / artifacts.LIBRARY_JSONL, stage)
        provenance.verify(root, stage)
        meta_path = root / artifacts.LIBRARY_META
        meta = provenance.read_json(meta_path) if meta_path.exists() else {}
        tools = [
            Tool(
                tool_id=r["tool_id"],
                question_id=str(r["question_id"]),
                m=int(r["m"]),
                Q=float(r["Q"]),
                meta=r.get("meta", {}),
                **artifacts.load_steering(root, r["tool_id"]),
            )
            for r in read_jsonl(jsonl)
        ]
        return cls(tools, meta)
