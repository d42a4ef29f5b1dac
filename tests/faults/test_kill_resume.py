"""SIGKILL at random points of the long stages (mine, eval, token-2048 continue), then resume:
the final artifacts equal those of an uninterrupted run with the same seed.

Each stage runs in a child process on the tiny random model (``fault_lib.py``), is killed once
its output has grown past a random point (plus a random delay, so the kill may land mid-write),
killed again after a restart, and then resumed to the end in this process."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from fault_lib import run_eval_greedy, run_mine, run_token2048, tiny_engine

from esm_steer.io import read_jsonl
from esm_steer.token2048 import schema

LIB = Path(__file__).with_name("fault_lib.py")
RNG = random.Random(20261203)


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_at(stage: str, run_dir: Path, progress, point: int, timeout: float = 90.0) -> int:
    """Start the stage in a child process; SIGKILL it once ``progress()`` reaches ``point``
    (after a random delay of up to 0.2 s). Returns the child's exit status (−9 when killed)."""
    child = subprocess.Popen([sys.executable, str(LIB), stage, str(run_dir)], stderr=subprocess.DEVNULL)
    end = time.monotonic() + timeout
    while child.poll() is None and progress() < point and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(RNG.uniform(0.0, 0.2))
    child.send_signal(signal.SIGKILL)
    return child.wait()


@pytest.fixture(scope="module")
def engine():
    eng = tiny_engine()
    yield eng
    eng.close()


def killed_twice(stage: str, run_dir: Path, progress, total: int) -> list[int]:
    first = RNG.randint(1, max(1, total // 2))
    codes = [kill_at(stage, run_dir, progress, first)]
    codes.append(kill_at(stage, run_dir, progress, RNG.randint(first + 1, max(first + 1, total - 1))))
    assert -signal.SIGKILL in codes, "no kill landed before the stage finished"
    return codes


def test_mine_killed_twice_resumes_to_the_uninterrupted_candidates(tmp_path, engine):
    ref = run_mine(tmp_path / "ref", engine)
    rollouts = tmp_path / "killed" / "mine" / "rollouts.jsonl"
    killed_twice("mine", tmp_path / "killed", lambda: lines(rollouts), ref["rollouts"])
    got = run_mine(tmp_path / "killed", engine)
    assert got["rollouts"] == ref["rollouts"]
    key = lambda r: (r["question_id"], r["sample_id"])
    a, b = read_jsonl(tmp_path / "ref/mine/rollouts.jsonl"), read_jsonl(rollouts)
    assert len({key(r) for r in b}) == len(b)  # no duplicates
    assert sorted(a, key=key) == sorted(b, key=key)
    assert read_jsonl(tmp_path / "ref/mine/candidates.jsonl") == read_jsonl(tmp_path / "killed/mine/candidates.jsonl")
    for r in read_jsonl(rollouts.with_name("candidates.jsonl")):
        for sub in ("vectors", "keys"):
            x = torch.load(tmp_path / f"ref/mine/{sub}/{r['id']}.pt", weights_only=True)
            y = torch.load(tmp_path / f"killed/mine/{sub}/{r['id']}.pt", weights_only=True)
            assert all(torch.equal(x[k], y[k]) for k in x) if isinstance(x, dict) else torch.equal(x, y)


def test_eval_killed_twice_resumes_to_the_uninterrupted_records_and_table(tmp_path, engine):
    run_eval_greedy(tmp_path / "ref", engine)
    records = next((tmp_path / "ref" / "eval").rglob("per_example.jsonl"))
    target = tmp_path / "killed" / records.relative_to(tmp_path / "ref")
    killed_twice("eval", tmp_path / "killed", lambda: lines(target), lines(records))
    run_eval_greedy(tmp_path / "killed", engine)
    drop = ("wall_s",)  # timing is the only thing a resumed record may differ in
    strip = lambda rs: sorted(({k: v for k, v in r.items() if k not in drop} for r in rs), key=lambda r: r["id"])
    a, b = read_jsonl(records), read_jsonl(target)
    assert len({r["id"] for r in b}) == len(b)
    assert strip(a) == strip(b)
    ta = pd.read_csv(tmp_path / "ref" / "tables" / "main_results_single.csv")
    tb = pd.read_csv(tmp_path / "killed" / "tables" / "main_results_single.csv")
    same = [c for c in ta.columns if "wall" not in c and "per_s" not in c and "time" not in c]
    pd.testing.assert_frame_equal(ta[same], tb[same])


def test_token2048_continue_killed_twice_resumes_to_the_uninterrupted_tables(tmp_path, engine):
    run_token2048(tmp_path / "ref", engine)
    parts = tmp_path / "killed" / "token2048" / schema.STAGE3_PARTS
    progress = lambda: len(list(parts.glob("part-*.parquet"))) if parts.is_dir() else 0
    killed_twice("token2048", tmp_path / "killed", progress, 4)
    run_token2048(tmp_path / "killed", engine)
    for name in (schema.STAGE1, schema.STAGE2, schema.STAGE3, schema.FINAL):
        a = pq.read_table(tmp_path / "ref" / "token2048" / name)
        b = pq.read_table(tmp_path / "killed" / "token2048" / name)
        assert a.equals(b), name
    s3 = pq.read_table(tmp_path / "killed" / "token2048" / schema.STAGE3).to_pandas()
    assert not s3.duplicated(["question_id", "sample_id", "continuation_id"]).any()
