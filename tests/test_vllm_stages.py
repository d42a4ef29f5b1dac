"""Stages end to end on the vLLM backend (the embedded model, eager vLLM to keep start-up short):
esm-mine writes candidates whose vectors come from the HF pass, esm-token2048 stage=all runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from test_vllm_backend import need_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.integration]
VLLM = ["experiment=debug", "model.backend=vllm", "model.enforce_eager=true"]


def _cli(entry: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    need_vllm()
    exe = Path(sys.executable).parent / entry
    env = {**os.environ, "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(cwd / "vllm-cache"))}
    r = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _stage_dir(root: Path, name: str) -> Path:
    (d,) = root.glob(f"*/*/{name}")  # <root>/<run name>/<run id>/<stage>: the one run of the test
    return d


def test_esm_mine_on_vllm_writes_candidates(tmp_path):
    _cli("esm-mine", VLLM + ["task.max_train_examples=4", f"outputs.root_dir={tmp_path}/out"], tmp_path)
    mine = _stage_dir(tmp_path / "out", "mine")
    summary = json.loads((mine / "summary.json").read_text())
    assert summary["rollouts"] == 4 * 8 and summary["hidden_size"] == 576
    assert summary["backend"] == "vllm" and summary["hidden_states"] == "capture"  # auto on an eager engine
    cands = [json.loads(line) for line in (mine / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == summary["candidates_kept"]
    vectors = sorted((mine / "vectors").glob("*.pt"))
    assert len(vectors) == len(cands) == len(list((mine / "keys").glob("*.pt")))
    for f in vectors:
        v = torch.load(f)
        v = v.get("vector", v) if isinstance(v, dict) else v
        assert v.shape[-1] == 576 and bool(torch.isfinite(v).all())


def test_esm_token2048_all_on_vllm(tmp_path):
    small = [
        "token2048.n_questions=2",
        "token2048.questions_per_shard=1",
        "token2048.n_cont=2",
        "token2048.max_new_tokens=24",
    ]
    _cli("esm-token2048", VLLM + ["stage=all"] + small + [f"outputs.root_dir={tmp_path}/out"], tmp_path)
    out = _stage_dir(tmp_path / "out", "token2048")
    final = pd.read_parquet(out / "final_best.parquet")
    assert len(final) > 0 and (out / "summary.json").is_file()
    assert len(pd.read_parquet(out / "stage3_output.parquet")) > 0
