"""Stage III (memory), the driver of ``esm-memory``: build the index (:mod:`.memory_index`:
its entries, keys and files) from the library of this run dir, and save it."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from esm_steer.esm import artifacts
from esm_steer.esm.library import Library
from esm_steer.esm.memory_index import build_memory
from esm_steer.runs import RunError, write_latest

log = logging.getLogger(__name__)


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
        entries_of=str(cfg.offline_memory.entries),
        null_anchors=bool(cfg.offline_memory.null_anchors),
    )
    memory.save(run.dir)
    per_tool = len(memory) / len(library)
    log.info(
        "memory: %d entries from %d tools (%.1f per tool, %d null anchors), d=%d, centered=%s normalised=%s, "
        "model %s layer %s",
        len(memory),
        len(library),
        per_tool,
        sum(e["tool_id"] is None for e in memory.entries),
        memory.meta["d"],
        memory.meta["centered"],
        memory.normalised,
        memory.meta["model"],
        memory.meta["layer"],
    )
    write_latest(run.dir)
