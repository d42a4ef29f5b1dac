"""esm_steer.provenance: settings diffs, check-or-write, manifests and their verification."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from esm_steer import provenance
from esm_steer.runs import RunError


def test_diff_names_every_changed_leaf_by_dotted_key():
    old = {"a": 1, "b": {"c": 2, "d": 3}}
    assert provenance.diff(old, {"a": 1, "b": {"c": 5, "d": 3}, "e": 0}) == ["b.c: 2 -> 5", "e: None -> 0"]
    assert provenance.diff(old, old) == []


def test_check_or_write_refuses_other_settings_and_writes_matching_ones(tmp_path):
    path = tmp_path / "fingerprint.json"
    provenance.check_or_write(path, {"seed": 0}, "x holds 3 records", "use a new run")
    provenance.check_or_write(path, {"seed": 0}, "x holds 3 records", "use a new run")
    with pytest.raises(RunError, match=r"x holds 3 records made with other settings \(seed: 0 -> 1\): use a new run"):
        provenance.check_or_write(path, {"seed": 1}, "x holds 3 records", "use a new run")
    provenance.check_or_write(path, {"seed": 1}, "x", "y", check=False)
    assert provenance.read_json(path) == {"seed": 1}


def test_fingerprint_reads_dotted_keys_resolved():
    cfg = OmegaConf.create({"task": {"budget": 64}, "mine": {"max_new_tokens": "${task.budget}"}, "p": {"a": [1]}})
    assert provenance.fingerprint(cfg, ["mine.max_new_tokens", "p"]) == {"mine.max_new_tokens": 64, "p": {"a": [1]}}


def test_shared_diff_ignores_keys_one_side_lacks():
    old, new = {"a": 1, "s": {"x": 1}}, {"a": 2, "s": {"x": 1, "y": 2}, "b": 3}
    assert provenance.diff(old, new, shared=True) == ["a: 1 -> 2"]
    assert provenance.diff(old, new) == ["a: 1 -> 2", "b: None -> 3", "s.y: None -> 2"]


def test_check_or_write_records_extra_keys_without_comparing_them(tmp_path):
    path = tmp_path / "meta.json"
    provenance.check_or_write(path, {"model": "m"}, "x", "y", extra={"layer": 3})
    provenance.check_or_write(path, {"model": "m"}, "x", "y", extra={"layer": 7})
    assert provenance.read_json(path) == {"model": "m", "layer": 7}
    with pytest.raises(RunError, match=r"^f holds rollouts made with other settings \(model: 'm' -> 'n'\): z$"):
        provenance.check_or_write(path, {"model": "n"}, "f holds rollouts", "z", extra={"layer": 7})


def test_parquet_fingerprint_round_trip_and_refusal(tmp_path):
    path = tmp_path / "a.parquet"
    schema = provenance.with_parquet_meta(pa.schema([("x", pa.int64())]), b"k", {"seed": 0, "n": 2})
    pq.write_table(pa.Table.from_pydict({"x": [1]}, schema=schema), path)
    assert provenance.parquet_meta(path, b"k") == {"seed": 0, "n": 2}
    assert provenance.check_parquet_meta(path, b"k", {"seed": 0, "new_key": 1})["n"] == 2  # unrecorded: accepted
    with pytest.raises(RunError) as e:
        provenance.check_parquet_meta(path, b"k", {"seed": 1, "n": 3})
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "n: 2 -> 3; seed: 0 -> 1" in msg


def test_manifest_catches_size_and_hash_and_names_the_command(tmp_path):
    d = tmp_path / "run7" / "library"
    (d / "keys").mkdir(parents=True)
    (d / "keys" / "a.pt").write_bytes(b"0123456789")
    (d / "library.jsonl").write_text('{"tool_id": "t0"}\n')
    provenance.seal(d, "select", ["keys/a.pt", "library.jsonl"])
    assert provenance.verify(d, "select")["files"]["keys/a.pt"]["size"] == 10
    (d / "keys" / "a.pt").write_bytes(b"0123456788")  # same size, other bytes
    with pytest.raises(provenance.ArtifactError, match=r"a.pt: hash differs.*esm-select .* outputs.run_id=run7"):
        provenance.verify(d, "select")
    (d / "keys" / "a.pt").write_bytes(b"01234")
    with pytest.raises(provenance.ArtifactError, match=r"a.pt: size 5 bytes, 10 were written"):
        provenance.verify(d, "select")


def test_a_dir_without_manifest_is_read_with_one_warning(tmp_path, caplog):
    (tmp_path / "memory").mkdir()
    with caplog.at_level(logging.WARNING):
        assert provenance.verify(tmp_path / "memory", "memory") is None
        assert provenance.verify(tmp_path / "memory", "memory") is None
    assert sum("no manifest.json" in r.getMessage() for r in caplog.records) == 1
