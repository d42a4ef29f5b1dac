"""Every artifact a stage reads, deleted, cut in half or with one byte flipped: the stage stops
with one line naming the file and the command that rebuilds it, and writes nothing.

The ESM pipeline (mine -> select -> memory) and token-2048 run once per module on the tiny
random model; each case damages one file of a copy and runs the stage that reads it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fault_lib import FAULTS, esm_cfg, run_offline, run_token2048, snapshot, tiny_engine

from esm_steer.esm import memory as memory_stage
from esm_steer.esm import select as select_stage
from esm_steer.evaluate import case as case_stage
from esm_steer.evaluate import eval as ev
from esm_steer.runs import Run, RunError
from esm_steer.token2048 import schema

MAKER = {"mine": "mine", "library": "select", "memory": "memory"}
MINE_FILES = ["mine/candidates.jsonl", "mine/summary.json", "mine/keys/c00000.pt", "mine/vectors/c00000.pt"]
LIBRARY_FILES = ["library/library.jsonl", "library/meta.json", "library/keys/t0000.pt", "library/vectors/t0000.pt"]
MEMORY_FILES = ["memory/keys.npy", "memory/entries.jsonl", "memory/meta.txt", "memory/index.faiss", "memory/center.npy"]


@pytest.fixture(scope="module")
def engine():
    eng = tiny_engine()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def esm_run(tmp_path_factory, engine) -> Path:
    """A complete mine -> select -> memory run dir, at outputs/debug/run1."""
    return run_offline(tmp_path_factory.mktemp("outputs") / "debug" / "run1", engine)


def _eval(run_dir: Path, engine) -> None:
    cfg = esm_cfg("eval")
    ev.run(cfg, Run(run_dir, cfg), engine=engine)


def _case(run_dir: Path, engine) -> None:
    cfg = esm_cfg("case", ("eval.example_ids=[0,1]",))
    case_stage.run(cfg, Run(run_dir, cfg), engine=engine)


def _select(run_dir: Path, engine) -> None:
    cfg = esm_cfg("select")
    select_stage.run(cfg, Run(run_dir, cfg))


def _memory(run_dir: Path, engine) -> None:
    cfg = esm_cfg("memory")
    memory_stage.run(cfg, Run(run_dir, cfg))


# stage -> (its call, the files it reads, the dirs it writes)
READERS = {
    "select": (_select, MINE_FILES, ["library"]),
    "memory": (_memory, LIBRARY_FILES, ["memory"]),
    "eval": (_eval, LIBRARY_FILES + MEMORY_FILES, ["eval", "tables"]),
    "case": (_case, ["library/vectors/t0000.pt", "memory/index.faiss", "memory/keys.npy"], ["eval", "cases"]),
}
CASES = [(s, f, k) for s, (_, files, _) in READERS.items() for f in files for k in FAULTS]


def assert_one_line(e: BaseException, path: Path, rebuild: str) -> None:
    msg = str(e)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    assert rebuild in msg, msg


@pytest.mark.parametrize("stage,artifact,fault", CASES, ids=[f"{s}-{f}-{k}" for s, f, k in CASES])
def test_damaged_esm_artifact_stops_the_reader_in_one_line(esm_run, engine, tmp_path, stage, artifact, fault):
    run_dir = tmp_path / "debug" / "run1"
    shutil.copytree(esm_run, run_dir)
    call, _, outputs = READERS[stage]
    before = {d: snapshot(run_dir / d) for d in outputs}
    FAULTS[fault](run_dir / artifact)
    with pytest.raises(RunError) as e:
        call(run_dir, engine)
    assert_one_line(e.value, run_dir / artifact, f"esm-{MAKER[artifact.split('/')[0]]}")
    # nothing written, nothing overwritten (eval opens its record log, empty, with its fingerprint, first)
    kept = lambda files: {k: v for k, v in files.items() if v and not k.endswith("fingerprint.json")}
    after = {d: kept(snapshot(run_dir / d)) for d in outputs}
    assert after == before


def test_the_cli_prints_one_line_and_exits_2(esm_run, tmp_path):
    """Through the real entry point: no traceback, the rebuild command with this run's overrides."""
    root = tmp_path / "outputs"
    shutil.copytree(esm_run, root / "debug" / "run1")
    FAULTS["truncated"](root / "debug" / "run1" / "library" / "vectors" / "t0001.pt")
    exe = Path(sys.executable).parent / "esm-memory"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    args = [str(exe), "experiment=debug", f"outputs.root_dir={root}", "outputs.run_id=run1"]
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "library/vectors/t0001.pt: size" in lines[0] and "esm-select" in lines[0]
    assert "outputs.run_id=run1" in lines[0]


def test_a_stage_killed_while_writing_is_named(esm_run, engine, tmp_path):
    """select stopped between its first file and its manifest: memory is told so, not fed a mix."""
    run_dir = tmp_path / "debug" / "run1"
    shutil.copytree(esm_run, run_dir)
    from esm_steer import provenance

    provenance.begin(run_dir / "library", "select")
    with pytest.raises(provenance.ArtifactError, match=r"library: esm-select was stopped while writing it.*esm-select"):
        _memory(run_dir, engine)


# ---------------------------------------------------------------- token-2048


@pytest.fixture(scope="module")
def t2048_run(tmp_path_factory, engine) -> Path:
    run_dir = tmp_path_factory.mktemp("t2048") / "run1"
    run_token2048(run_dir, engine)
    return run_dir


PART1 = f"{schema.STAGE1_PARTS}/part-00001-of-00004.parquet"
PART3 = f"{schema.STAGE3_PARTS}/part-00002-of-00004.parquet"
# (stage, file it reads, outputs removed first so that the stage has work, maker)
T2048 = [
    ("prepare", schema.STAGE1, [schema.STAGE2], "sample"),
    ("continue", schema.STAGE2, [schema.STAGE3_PARTS, schema.STAGE3, schema.FINAL], "prepare"),
    ("select", schema.STAGE3, [schema.STAGE3_PARTS, schema.FINAL], "continue"),
    ("select", PART3, [schema.STAGE3, schema.FINAL], "continue"),
    ("sample", PART1, [schema.STAGE1, schema.STAGE2], "sample"),
]
# a missing merged file or part is work its own stage redoes (the merged stage 3: the test below)
HEALED = {("prepare", schema.STAGE1), ("sample", PART1)}
T2048_CASES = [(s, f, k, rm, m) for s, f, rm, m in T2048 for k in FAULTS if not (k == "missing" and f == schema.STAGE3)]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
        schema.provenance.unseal_file(path)


@pytest.mark.parametrize(
    "stage,artifact,fault,removed,maker", T2048_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in T2048_CASES]
)
def test_damaged_parquet_stops_the_next_stage_in_one_line(
    t2048_run, engine, tmp_path, stage, artifact, fault, removed, maker
):
    run_dir = tmp_path / "run1"
    shutil.copytree(t2048_run, run_dir)
    out = run_dir / "token2048"
    for name in removed:
        _remove(out / name)
    before = snapshot(out)
    FAULTS[fault](out / artifact)
    if fault == "missing" and (stage, artifact) in HEALED:  # resumable work: the stage redoes it
        run_token2048(run_dir, engine, stage)
        assert pq.read_table(out / artifact).equals(pq.read_table(t2048_run / "token2048" / artifact))
        return
    before.pop(artifact, None)
    with pytest.raises(RunError) as e:
        run_token2048(run_dir, engine, stage)
    msg = str(e.value)
    assert "\n" not in msg and f"stage={maker}" in msg, msg
    assert Path(artifact).name in msg, msg
    after = snapshot(out)
    after.pop(artifact, None)
    assert after == before  # no partial output


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_merged_stage3_is_remerged_from_its_parts(t2048_run, engine, tmp_path, fault):
    """The merge is stage 3's own output: select rebuilds it from the intact parts."""
    run_dir = tmp_path / "run1"
    shutil.copytree(t2048_run, run_dir)
    out = run_dir / "token2048"
    FAULTS[fault](out / schema.STAGE3)
    run_token2048(run_dir, engine, "select")
    ref = t2048_run / "token2048"
    assert pq.read_table(out / schema.STAGE3).equals(pq.read_table(ref / schema.STAGE3))
    assert pq.read_table(out / schema.FINAL).equals(pq.read_table(ref / schema.FINAL))
