"""The library: the steering tools chosen by Stage II (select), read by memory and online.

A tool is one mined candidate (question q, control point m): its steering vector v, its
quality Q, its key (mean mining state) and the mining states themselves (the memory's
anchors). On disk, under ``<run dir>/library/``:

- ``library.jsonl``        one line per tool: tool_id, question_id, m, Q, v_norm, n_states, meta
- ``vectors/<tool_id>.pt`` v, float32 [d]
- ``keys/<tool_id>.pt``    {"key": [d], "states": [n, d]}
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
from esm_steer.io import atomic_torch_save, atomic_write_json, atomic_write_jsonl, read_jsonl
from esm_steer.runs import RunError

log = logging.getLogger(__name__)

LIBRARY_DIR = "library"


def tool_id(i: int) -> str:
    return f"t{i:04d}"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# ---------------------------------------------------------------- steering tensors on disk
# mine/ and library/ share one format: vectors/<id>.pt (v [d]) and keys/<id>.pt
# ({"key": [d], "states": [n, d]}).


def save_steering(root: Path, item_id: str, vector: torch.Tensor, key: torch.Tensor, states: torch.Tensor) -> None:
    atomic_torch_save(root / "vectors" / f"{item_id}.pt", vector.detach().float().contiguous())
    atomic_torch_save(
        root / "keys" / f"{item_id}.pt",
        {"key": key.detach().float().contiguous(), "states": states.detach().float().contiguous()},
    )


def prune_steering(root: Path, keep: set[str]) -> None:
    """Remove tensors of ids no longer listed (a rerun with a smaller pool leaves none stale)."""
    for sub in ("vectors", "keys"):
        for p in (root / sub).glob("*.pt"):
            if p.stem not in keep:
                p.unlink()


def steering_files(item_ids) -> list[str]:
    """The tensor files of these ids, relative to their stage dir (for the manifest)."""
    return [f"{sub}/{i}.pt" for i in item_ids for sub in ("vectors", "keys")]


def load_steering(root: Path, item_id: str, stage: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vector, key, states) of one id; RunError naming the stage that writes a missing or unreadable file."""
    from esm_steer.esm.common import require

    vpath = require(root / "vectors" / f"{item_id}.pt", stage)
    kpath = require(root / "keys" / f"{item_id}.pt", stage)
    rebuild = provenance.command(stage, root.resolve().parent.name)
    with provenance.reading(kpath, rebuild):
        keys = torch.load(kpath, map_location="cpu", weights_only=True)
        key, states = keys["key"], keys["states"]
    with provenance.reading(vpath, rebuild):
        vector = torch.load(vpath, map_location="cpu", weights_only=True)
    return vector, key, states


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
        root = Path(run_dir) / LIBRARY_DIR
        provenance.begin(root, "select")
        for t in self.tools:
            save_steering(root, t.tool_id, t.vector, t.key, t.states)
        prune_steering(root, {t.tool_id for t in self.tools})
        atomic_write_json(root / "meta.json", self.meta)
        atomic_write_jsonl(root / "library.jsonl", [t.record() for t in self.tools])
        provenance.seal(root, "select", steering_files(t.tool_id for t in self.tools) + ["meta.json", "library.jsonl"])
        return root

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Library:
        root = Path(run_dir) / LIBRARY_DIR
        jsonl = root / "library.jsonl"
        if not jsonl.exists():
            raise RunError(f"missing {jsonl} (made by esm-select; run it into this run dir first)")
        provenance.verify(root, "select")
        meta = provenance.read_json(root / "meta.json") if (root / "meta.json").exists() else {}
        tools = []
        for r in read_jsonl(jsonl):
            tid = r["tool_id"]
            vector, key, states = load_steering(root, tid, "select")
            tools.append(
                Tool(
                    tool_id=tid,
                    question_id=str(r["question_id"]),
                    m=int(r["m"]),
                    Q=float(r["Q"]),
                    vector=vector,
                    key=key,
                    states=states,
                    meta=r.get("meta", {}),
                )
            )
        return cls(tools, meta)
