"""Run directories, LATEST pointers, resumable/atomic I/O, control-point segments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from esm_steer.engine.segments import SegmentTracker, control_point_offsets, segment_spans
from esm_steer.io import JsonlAppender, atomic_write_json, read_jsonl
from esm_steer.runs import RunError, read_latest, resolve_run_id, resolve_run_path, write_latest


def test_latest_roundtrip_and_errors(tmp_path):
    with pytest.raises(RunError, match="LATEST does not exist"):
        read_latest(tmp_path, "exp")
    run = tmp_path / "exp" / "20260101_000000"
    run.mkdir(parents=True)
    write_latest(run)
    assert (tmp_path / "exp" / "LATEST").read_text().strip() == run.name
    assert resolve_run_id(str(tmp_path), "exp", "latest") == run.name
    assert resolve_run_path(tmp_path / "exp" / "latest") == run
    (tmp_path / "exp" / "LATEST").write_text("  \n")
    with pytest.raises(RunError, match="is empty"):
        read_latest(tmp_path, "exp")
    # explicit ids pass through; null gives one timestamp per process
    assert resolve_run_id(str(tmp_path), "exp", "abc") == "abc"
    assert resolve_run_id(str(tmp_path), "exp", None) == resolve_run_id(str(tmp_path), "x", None)
    with pytest.raises(RunError, match="does not exist"):
        resolve_run_path(tmp_path / "exp" / "nope")


def test_latest_without_pointer_is_one_line_and_leaves_no_dir(tmp_path):
    exe = Path(sys.executable).parent / "esm-mine"
    r = subprocess.run(
        [str(exe), f"outputs.root_dir={tmp_path}", "outputs.run_name=exp", "outputs.run_id=latest"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "LATEST does not exist" in lines[0]
    assert not (tmp_path / "exp" / "latest").exists()


def test_jsonl_appender_resumes_and_drops_cut_line(tmp_path):
    p = tmp_path / "r.jsonl"
    a = JsonlAppender(p)
    a.extend([{"id": 1}, {"id": 2}])
    with pytest.raises(ValueError, match="already written"):
        a.append({"id": 2})
    with open(p, "a") as f:  # a kill in the middle of a write
        f.write('{"id": 3, "tex')
    b = JsonlAppender(p)
    assert b.done_keys == {1, 2}
    b.append({"id": 3})
    assert [r["id"] for r in read_jsonl(p)] == [1, 2, 3]


def test_atomic_write_leaves_no_temp(tmp_path):
    atomic_write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]


def test_segment_tracker_matches_str_count():
    text = "a\n\nb\n\n\nc\n\n\n\nd.\n\nThe end\n"
    for pieces in ([text], list(text), ["a\n", "\nb", "\n\n\nc\n", "\n\n", "\nd.\n\nThe", " end\n"]):
        t = SegmentTracker("\n\n")
        for p in pieces:
            t.feed(p)
        assert t.count == text.count("\n\n")


def test_control_point_offsets_on_merged_tokens():
    # tokens: "Step 1", ".\n\nThe" (completes a delimiter inside a merged token), " next", "\n\n", "Done"
    pieces = ["Step 1", ".\n\nThe", " next", "\n\n", "Done"]
    assert control_point_offsets(pieces, "\n\n", M=4) == [0, 2, 4]
    assert control_point_offsets(pieces, "\n\n", M=2) == [0, 2]
    assert control_point_offsets(pieces, "\n\n", M=1) == [0]
    # a delimiter as the very last token opens no segment
    assert control_point_offsets(["a", "\n\n"], "\n\n", M=3) == [0]
    assert segment_spans([0, 2, 4], 5) == [(0, 2), (2, 4), (4, 5)]


def test_run_ids_stay_strings():
    from esm_steer.cli import quote_ids

    assert quote_ids(["outputs.run_id=20261122_001700", "seed=1"]) == ["outputs.run_id='20261122_001700'", "seed=1"]
    assert quote_ids(["outputs.run_id='x_1'"]) == ["outputs.run_id='x_1'"]


def test_explicit_run_id_with_underscore_is_used_verbatim(tmp_path):
    exe = Path(sys.executable).parent / "esm-eval"
    r = subprocess.run(
        [
            str(exe),
            f"outputs.root_dir={tmp_path}",
            "outputs.run_name=exp",
            "outputs.run_id=20261122_001700",
            "nosuch.stage=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 2  # stopped by the precheck; now compose for real:
    r = subprocess.run(
        [
            str(exe),
            "--cfg",
            "all",
            "--resolve",
            f"outputs.root_dir={tmp_path}",
            "outputs.run_name=exp",
            "outputs.run_id=20261122_001700",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path}/exp/20261122_001700" in r.stdout
