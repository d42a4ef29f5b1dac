"""esm_steer.provenance: settings diffs, check-or-write, manifests and their verification."""

from __future__ import annotations

import logging

import pytest

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
