"""The ESM pipeline's artifacts: the dirs and files of a run dir, the stage that writes each, and
the steering-tensor format that ``mine/`` and ``library/`` share, and the reader of mine's
candidates (docs/method.md, stages I–III)::

    <run dir>/
      mine/        rollouts.jsonl, meta.json (the sampling fingerprint), candidates.jsonl,
                   keys/, vectors/, summary.json, questions.json, manifest.json
      library/     library.jsonl, meta.json, keys/, vectors/, manifest.json
      memory/      keys.npy, entries.jsonl, index.faiss [, center.npy], meta.txt, manifest.json
      eval/<tag>/  per_example.jsonl, fingerprint.json, meta.json
      tables/      main_results_single.csv, ablation.csv, diagnostics_T<T>.csv|json
      figures/, cases/  eval's figures and case files

Steering tensors, one pair per id (a candidate ``c00012`` or a tool ``t0003``):
``vectors/<id>.pt`` holds v (float32 [d]); ``keys/<id>.pt`` holds {"key": [d], "states": [n, d]}.
Each stage dir ends with ``manifest.json`` (sizes and hashes, ``esm_steer.provenance``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from esm_steer import provenance
from esm_steer.esm.candidates import Candidate
from esm_steer.io import atomic_save, read_jsonl
from esm_steer.runs import RunError

# ---------------------------------------------------------------- dirs of a run dir
MINE_DIR = "mine"
LIBRARY_DIR = "library"
MEMORY_DIR = "memory"
EVAL_DIR = "eval"
TABLES_DIR = "tables"
FIGURES_DIR = "figures"
CASES_DIR = "cases"

# the command (esm-<entry>) that writes each stage dir
MAKER = {MINE_DIR: "mine", LIBRARY_DIR: "select", MEMORY_DIR: "memory", EVAL_DIR: "eval"}

# ---------------------------------------------------------------- files
ROLLOUTS = "rollouts.jsonl"  # mine/: append-only, one line per rollout
MINE_META = "meta.json"  # mine/: model and sampling config of the rollouts (checked on resume)
CANDIDATES = "candidates.jsonl"  # mine/: written after the tensors (its presence: complete)
SUMMARY = "summary.json"  # mine/
LIBRARY_JSONL = "library.jsonl"  # library/: one line per tool, written after the tensors
LIBRARY_META = "meta.json"  # library/: model_id, steer_layer, hidden_size, how it was selected
MEMORY_KEYS = "keys.npy"
MEMORY_ENTRIES = "entries.jsonl"
MEMORY_INDEX = "index.faiss"
MEMORY_CENTER = "center.npy"
MEMORY_META = "meta.txt"  # memory/: ``key: value`` lines, written last
PER_EXAMPLE = "per_example.jsonl"  # eval/<tag>/: one record per example
FINGERPRINT = "fingerprint.json"  # eval/<tag>/: the settings its records were made under
EVAL_META = "meta.json"  # eval/<tag>/: model, method, timing
MAIN_TABLE = "main_results_single.csv"  # tables/
ABLATION_TABLE = "ablation.csv"  # tables/

VECTORS, KEYS = "vectors", "keys"  # steering-tensor subdirs of mine/ and library/


def require(path: str | os.PathLike, stage: str) -> Path:
    """The path, or RunError naming the missing file and the stage that makes it."""
    p = Path(path)
    if not p.exists():
        raise RunError(f"missing {p} (made by esm-{stage}; run it into this run dir first)")
    return p


# ---------------------------------------------------------------- steering tensors


def _save_tensors(path: Path, obj) -> None:
    atomic_save(path, lambda tmp: torch.save(obj, tmp))


def save_steering(root: Path, item_id: str, vector: torch.Tensor, key: torch.Tensor, states: torch.Tensor) -> None:
    plain = lambda t: t.detach().float().contiguous()  # noqa: E731
    _save_tensors(root / VECTORS / f"{item_id}.pt", plain(vector))
    _save_tensors(root / KEYS / f"{item_id}.pt", {"key": plain(key), "states": plain(states)})


def prune_steering(root: Path, keep: set[str]) -> None:
    """Remove tensors of ids no longer listed (a rerun with a smaller pool leaves none stale)."""
    for sub in (VECTORS, KEYS):
        for p in (root / sub).glob("*.pt"):
            if p.stem not in keep:
                p.unlink()


def steering_files(item_ids: Iterable[str]) -> list[str]:
    """The tensor files of these ids, relative to their stage dir (for the manifest)."""
    return [f"{sub}/{i}.pt" for i in item_ids for sub in (VECTORS, KEYS)]


def load_steering(root: Path, item_id: str) -> dict[str, torch.Tensor]:
    """{"vector", "key", "states"} of one id; RunError naming the stage that writes a missing or
    unreadable file (the maker of ``root``)."""
    stage = MAKER[root.name]
    vpath = require(root / VECTORS / f"{item_id}.pt", stage)
    kpath = require(root / KEYS / f"{item_id}.pt", stage)
    rebuild = provenance.command(stage, root.resolve().parent.name)
    with provenance.reading(kpath, rebuild):
        keys = torch.load(kpath, map_location="cpu", weights_only=True)
        key, states = keys["key"], keys["states"]
    with provenance.reading(vpath, rebuild):
        vector = torch.load(vpath, map_location="cpu", weights_only=True)
    return {"vector": vector, "key": key, "states": states}


def load_candidates(run_dir: str | Path) -> tuple[list[Candidate], dict]:
    """Candidates written by esm-mine and the mine summary (model id, layer, hidden size),
    after checking every file against mine/manifest.json."""
    mine_dir = Path(run_dir) / MINE_DIR
    jsonl = require(mine_dir / CANDIDATES, MAKER[MINE_DIR])
    provenance.verify(mine_dir, MAKER[MINE_DIR])
    summary = provenance.read_json(require(mine_dir / SUMMARY, MAKER[MINE_DIR]))
    out = [
        Candidate(
            question_id=str(r["question_id"]),
            m=int(r["m"]),
            Q=float(r["Q"]),
            n_pos=int(r["n_pos"]),
            n_neg=int(r["n_neg"]),
            id=r["id"],
            **load_steering(mine_dir, r["id"]),
        )
        for r in read_jsonl(jsonl)
    ]
    return out, summary
