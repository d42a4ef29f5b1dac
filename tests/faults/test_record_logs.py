"""Append-only record logs are not hashed: a cut last line is dropped and regenerated on
resume; a bad line in the middle stops the run with one line naming file:line."""

from __future__ import annotations

import pytest
from fault_lib import run_eval_greedy, run_mine, tiny_engine

from esm_steer.io import RecordError, read_jsonl


@pytest.fixture(scope="module")
def engine():
    eng = tiny_engine()
    yield eng
    eng.close()


def corrupt_line(path, n: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[n - 1] = b'{"id": "broken' + b"\n"
    path.write_bytes(b"".join(lines))


def test_a_bad_middle_line_of_the_eval_records_is_one_line(tmp_path, engine):
    run_eval_greedy(tmp_path, engine)
    records = next((tmp_path / "eval").rglob("per_example.jsonl"))
    corrupt_line(records, 2)
    with pytest.raises(RecordError) as e:
        run_eval_greedy(tmp_path, engine)
    assert str(e.value).startswith(f"{records}:2: not valid JSON") and "\n" not in str(e.value)


def test_a_cut_last_rollout_is_regenerated_and_a_bad_middle_one_stops_mine(tmp_path, engine):
    ref = run_mine(tmp_path, engine)
    rollouts = tmp_path / "mine" / "rollouts.jsonl"
    want = read_jsonl(rollouts)
    rollouts.write_bytes(rollouts.read_bytes()[:-7])  # a kill mid-write
    assert run_mine(tmp_path, engine)["rollouts"] == ref["rollouts"]
    assert read_jsonl(rollouts) == want
    corrupt_line(rollouts, 3)
    with pytest.raises(RecordError, match=r"rollouts.jsonl:3: not valid JSON"):
        run_mine(tmp_path, engine)
