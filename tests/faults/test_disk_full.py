"""A full disk: a writer whose target raises OSError(ENOSPC) leaves the previous complete file
in place (and its record), and the run stops with one line."""

from __future__ import annotations

import errno
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fault_lib import esm_cfg

from esm_steer import provenance
from esm_steer.esm import memory as memory_stage
from esm_steer.esm.library import Library, Tool
from esm_steer.esm.memory_index import Memory
from esm_steer.io import DiskFullError, JsonlAppender, atomic_write_json, read_jsonl
from esm_steer.runs import Run
from esm_steer.token2048 import schema


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def half_then_full(path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY partial")
    full_disk()


def tiny_library(n: int = 3, d: int = 8) -> Library:
    g = torch.Generator().manual_seed(0)
    tools = []
    for i in range(n):
        v, key, states = (torch.randn(*shape, generator=g) for shape in ((d,), (d,), (3, d)))
        tools.append(Tool(f"t{i:04d}", f"q{i}", i % 2, 1.0 - i / 10, v, key, states))
    return Library(tools, {"model_id": "tiny", "steer_layer": 1, "hidden_size": d})


def test_full_disk_while_writing_the_memory_keeps_the_previous_one(tmp_path, monkeypatch):
    tiny_library().save(tmp_path)
    cfg = esm_cfg("memory", ("mode=seed",))  # its tools have no P/N split: one entry per state
    memory_stage.run(cfg, Run(tmp_path, cfg))
    before = {p.name: p.read_bytes() for p in (tmp_path / "memory").iterdir()}
    monkeypatch.setattr(np, "save", half_then_full)
    with pytest.raises(DiskFullError) as e:
        memory_stage.run(cfg, Run(tmp_path, cfg))
    msg = str(e.value)
    assert "\n" not in msg and "memory/keys.npy: no space left" in msg and "previous file is kept" in msg
    files = {p.name: p.read_bytes() for p in (tmp_path / "memory").iterdir()}
    assert not [n for n in files if n.endswith(".tmp") or n.endswith(".npy.tmp.npy")]  # no temp left behind
    assert files["keys.npy"] == before["keys.npy"]  # the previous complete file
    # the stage did not finish: its readers are told to rerun it, not handed a mix
    with pytest.raises(provenance.ArtifactError, match="esm-memory was stopped while writing it"):
        Memory.load(tmp_path)
    monkeypatch.undo()
    memory_stage.run(cfg, Run(tmp_path, cfg))
    assert len(Memory.load(tmp_path)) == 9


def test_full_disk_while_writing_json_keeps_the_previous_file(tmp_path, monkeypatch):
    atomic_write_json(tmp_path / "summary.json", {"a": 1})
    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(DiskFullError, match=r"summary.json: no space left.*previous file is kept"):
        atomic_write_json(tmp_path / "summary.json", {"a": 2})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_full_disk_while_appending_a_record_is_one_line_and_resumes(tmp_path, monkeypatch):
    log = JsonlAppender(tmp_path / "rollouts.jsonl")
    log.append({"id": 0})
    real_open = open

    class FillsHalfWay:  # the disk fills half way through the line
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            full_disk()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("esm_steer.io.open", FillsHalfWay, raising=False)
    with pytest.raises(DiskFullError, match="rollouts.jsonl: no space left.*dropped on resume"):
        log.append({"id": 1, "text": "a longer record"})
    monkeypatch.undo()
    resumed = JsonlAppender(tmp_path / "rollouts.jsonl")  # the cut line is dropped
    assert resumed.done_keys == {0}
    resumed.append({"id": 1})
    assert [r["id"] for r in read_jsonl(tmp_path / "rollouts.jsonl")] == [0, 1]


def test_full_disk_while_writing_a_parquet_keeps_the_file_and_its_record(tmp_path, monkeypatch):
    path = tmp_path / "token2048" / schema.STAGE2
    old = schema.table(schema.STAGE2, [{"question_id": 0, "sample_id": 0}], {"seed": 0})
    schema.write(path, old)
    monkeypatch.setattr(pq, "write_table", lambda tbl, where, **kw: half_then_full(where))
    with pytest.raises(DiskFullError, match="stage2_input.parquet: no space left"):
        schema.write(path, schema.table(schema.STAGE2, [], {"seed": 0}))
    monkeypatch.undo()
    assert schema.read(path).equals(old)  # verified against its record: the old file, intact
