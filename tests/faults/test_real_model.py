"""The real embedded model: a tiny pipeline (mine -> select -> memory), memory/index.faiss cut
to its first 100 bytes, then ``esm-eval`` through its entry point: one line, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fault_lib import esm_cfg, select_and_index

from esm_steer import runtime
from esm_steer.esm.mine import mine

pytestmark = pytest.mark.integration

REAL = (
    "task.max_train_examples=3",
    "offline_mine.K=2",
    "offline_mine.K_pos=1",
    "offline_mine.K_neg=1",
    "offline_mine.max_new_tokens=12",
    "offline_select.B=2",
    "model.num_threads=1",
)


def test_truncated_faiss_index_after_a_real_pipeline_is_one_line(tmp_path):
    run_dir = tmp_path / "outputs" / "debug" / "run1"
    cfg = esm_cfg("mine", REAL)
    engine = runtime.build_engine(cfg)
    try:
        examples = runtime.load_examples(cfg, cfg.task.train_split)
        mine(cfg, run_dir, engine, examples, runtime.prompt_ids(engine, cfg, examples))
    finally:
        engine.close()
    select_and_index(run_dir, REAL)
    index = run_dir / "memory" / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    exe = str(Path(sys.executable).parent / "esm-eval")
    args = [exe, "experiment=debug", f"outputs.root_dir={tmp_path / 'outputs'}", "outputs.run_id=run1"]
    args += ["eval.methods=[esm]", "eval.ablations=[]", "task.max_eval_examples=2"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]  # after the model's loading bar
    assert last.startswith("esm-eval: ") and f"{index}: size 100 bytes" in last and "esm-memory" in last, last
