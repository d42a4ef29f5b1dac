"""STIR's presets (issue 22): experiment=stir_math composes with the values of STIR's released
configs/math.yaml, and experiment=stir_debug runs end to end from an empty outputs dir on the
embedded model with every STIR mechanism in force."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import esm_steer.cli  # noqa: F401 - registers the schema and resolvers
from esm_steer.config import validate
from esm_steer.evaluate.records import method_tag, per_example_path
from esm_steer.io import read_jsonl

BIN = Path(sys.executable).parent

# STIR's configs/math.yaml (sznnzs/LLM-Latent-Action), as docs/method.md "STIR mode" maps its keys
STIR_MATH = {
    "model.name_or_path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "model.backend": "vllm",
    "model.steer_layer": 16,
    "model.max_model_len": 16384,
    "model.gpu_memory_utilization": 0.8,
    "task.dataset": "math500",
    "task.max_train_examples": 100,
    "task.max_eval_examples": 400,
    "decode.max_new_tokens": 16384,
    "control_points.segment_delimiter": "\n\n",
    "control_points.M": 8,
    "control_points.first_m": 1,
    "offline_mine.K": 8,
    "offline_mine.K_pos": 2,
    "offline_mine.K_neg": 3,
    "offline_mine.keep_top_C": 128,
    "offline_mine.pos_source": "rollout_or_gold",
    "offline_mine.vector": "control_point",
    "offline_select.B": 256,
    "offline_select.lambda_diversity": 0.5,
    "offline_select.min_per_control_point": 8,
    "offline_memory.center_keys": False,
    "offline_memory.entries": "contrast",
    "offline_memory.null_anchors": True,
    "online.k_retrieve": 8,
    "online.L": 4,
    "online.probe_tokens": 4,
    "online.beta": 2.0,
    "online.rho": 0.1,
    "online.k_scale": 1.0,
    "online.tau_null": 0.0,
    "online.inject": "impulse",
    "online.probe_scale": 1.0,
    "online.null_score": "anchors",
    "online.retrieve_same_m": True,
}


def test_stir_math_composes_with_stirs_released_values():
    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["experiment=stir_math"])
    validate(cfg)
    got = {k: OmegaConf.select(cfg, k) for k in STIR_MATH}
    assert got == STIR_MATH
    # the default split is disjoint: STIR's overlap only as an explicit override
    assert cfg.eval.allow_mining_overlap is False


@pytest.mark.integration
def test_stir_debug_runs_end_to_end_from_an_empty_outputs_dir(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    root = tmp_path / "out"
    cmd = [
        str(BIN / "esm-eval"),
        "experiment=stir_debug",
        "task.max_train_examples=8",
        "task.max_eval_examples=3",
        f"outputs.root_dir={root}",
        "outputs.run_id=r",
    ]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    run = root / "stir_debug" / "r"
    # offline stages ran into this run dir: a contrast memory with one null anchor per tool
    meta = (run / "memory" / "meta.txt").read_text()
    assert "entries: contrast" in meta and "null_anchors: True" in meta
    entries = read_jsonl(run / "memory" / "entries.jsonl")
    tools = [e for e in entries if e["tool_id"] is not None]
    assert tools and {e["state"] for e in tools} == {"neg_mean"}
    assert sum(e["tool_id"] is None and e["state"] == "pos_mean" for e in entries) == len(tools)
    main = pd.read_csv(run / "tables" / "main_results_single.csv")
    assert list(main["method"]) == ["greedy", "esm"] and (main["n"] == 3).all() and (main["n_errors"] == 0).all()
    ablation = pd.read_csv(run / "tables" / "ablation.csv")
    assert {"no_memory", "no_probing"} <= set(ablation["method"])
    steps = [s for r in read_jsonl(per_example_path(run, method_tag("esm", 64))) for s in r["steps"]]
    # first_m = 1: the end of the prompt (m = 0) is never a control point
    assert steps and min(s["m"] for s in steps) >= 1
