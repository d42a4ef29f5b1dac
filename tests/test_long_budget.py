"""Long answers at the seed's budgets with the embedded model on real data (gsm8k, math500 from
the shared data folder, ``../shared/data``): mining with K = 4 at T, then eval of greedy and esm
with M = 8 control points at T. Checks what grows with the answer: token counts and truncation
flags, control points up to M, the probe budget, and the tensor sizes on disk.

Costly on a CPU (the 135M model decodes ~100 tok/s on 2 cores; gsm8k at T = 1024 is ~10 min a
backend uncontended), so not part of ``make test`` / ``make test-vllm``: ``make test-long`` runs them
(``ESM_LONG_BUDGETS=all``, or a list such as ``gsm8k:1024,math500:4096``; unset, this module
defines no test, so the CI suites neither run nor skip them). Measured times: README "Performance"."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from esm_steer import runtime
from esm_steer.config import validate
from esm_steer.io import read_jsonl
from esm_steer.pipelines import stage_function
from esm_steer.runs import start_run
from qwen_fixtures import shared_data
from test_vllm_backend import need_vllm

N = 8
K = 4
M = 8
ALL_CASES = [("gsm8k", 1024), ("gsm8k", 4096), ("math500", 1024), ("math500", 4096)]
WANTED = os.environ.get("ESM_LONG_BUDGETS", "")
CASES = ALL_CASES if WANTED == "all" else [c for c in ALL_CASES if f"{c[0]}:{c[1]}" in WANTED.split(",")]
BACKENDS = [pytest.param("hf", marks=pytest.mark.integration)]
BACKENDS.append(pytest.param("vllm", marks=[pytest.mark.integration, pytest.mark.vllm]))


def _cfg(entry: str, task: str, T: int, backend: str, root: Path, extra=()):
    import esm_steer.cli  # noqa: F401 - registers the schema and resolvers

    over = [
        f"task={task}",
        f"task.data_root={shared_data()}",
        f"task.max_train_examples={N}",
        f"task.max_eval_examples={N}",
        "model.dtype=float32",  # bf16 is slow on CPUs without AMX / AVX-512-BF16
        f"model.backend={backend}",
        f"offline_mine.K={K}",
        "offline_mine.K_pos=2",
        "offline_mine.K_neg=2",
        f"offline_mine.max_new_tokens={T}",
        "offline_mine.pos_source=rollout_or_gold",
        f"decode.max_new_tokens={T}",
        f"control_points.M={M}",
        "offline_select.B=16",
        "offline_select.min_per_control_point=0",
        "eval.methods=[greedy,esm]",
        "eval.ablations=[]",
        f"outputs.root_dir={root}",
        *extra,
    ]
    if backend == "vllm":
        over += ["model.enforce_eager=true", f"model.max_model_len={T + 1024}"]
    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        cfg = compose(config_name=entry, overrides=over)
    validate(cfg)
    return cfg


def _tensor_bytes(path: Path) -> int:
    obj = torch.load(path)
    tensors = obj.values() if isinstance(obj, dict) else [obj]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def long_budget_pipeline(tmp_path, task, T, backend):
    if backend == "vllm":
        need_vllm()
    run_dir = tmp_path / "run"
    engine = runtime.build_engine(_cfg("mine", task, T, backend, tmp_path))
    walls = {}
    try:
        for entry in ("mine", "select", "memory", "eval"):
            cfg = _cfg(entry, task, T, backend, tmp_path)
            t0 = time.perf_counter()
            stage_function(entry)(cfg, start_run(cfg, run_dir, stage=entry), engine=engine)
            walls[entry] = round(time.perf_counter() - t0, 1)
    finally:
        engine.close()
    print(f"long budget {task} T={T} {backend}: wall s {walls}")
    online = cfg.online
    hidden = 576

    # mining: every rollout within T, truncated exactly when it used all of T
    rollouts = read_jsonl(run_dir / "mine" / "rollouts.jsonl")
    assert len(rollouts) == N * K
    for r in rollouts:
        assert r["tokens"] == len(r["token_ids"]) <= T
        assert (r["finish_reason"] == "length") == (r["tokens"] == T)
    summary = json.loads((run_dir / "mine" / "summary.json").read_text())
    assert summary["candidates_kept"] > 0 and all(0 <= int(m) < M for m in summary["candidates_per_m"])

    # tensors on disk: keys / vectors of width 576, file sizes those of their tensors (+ pickle overhead)
    for sub in ("keys", "vectors"):
        files = sorted((run_dir / "mine" / sub).glob("*.pt"))
        assert len(files) == summary["candidates_kept"]
        for f in files:
            obj = torch.load(f)
            for t in obj.values() if isinstance(obj, dict) else [obj]:
                assert t.shape[-1] == hidden and t.dtype == torch.float32
            assert _tensor_bytes(f) <= f.stat().st_size <= _tensor_bytes(f) + 4096
    keys = np.load(run_dir / "memory" / "keys.npy")
    entries = read_jsonl(run_dir / "memory" / "entries.jsonl")
    assert keys.shape == (len(entries), hidden)
    assert (run_dir / "memory" / "keys.npy").stat().st_size == keys.nbytes + 128

    # eval: greedy and esm, tokens within T, truncation flags, control points up to M, bounded probes
    per = {d.name.split("_")[0]: read_jsonl(d / "per_example.jsonl") for d in (run_dir / "eval").iterdir()}
    assert set(per) >= {"greedy", "esm"}
    for method, recs in per.items():
        assert len(recs) == N and all(r["finish_reason"] != "error" for r in recs), method
    for r in per["esm"]:
        assert r["tokens_used"] <= T and (r["finish_reason"] == "length") == (r["tokens_used"] == T)
        steps = r.get("steps") or []
        assert 1 <= len(steps) <= M
        assert [s["m"] for s in steps] == list(range(len(steps)))
        offsets = [s["offset"] for s in steps]
        assert offsets == sorted(offsets) and all(0 <= o <= r["tokens_used"] for o in offsets)
        # each control point probes at most L tools + null for probe_tokens each
        bound = len(steps) * (int(online.L) + 1) * int(online.probe_tokens)
        assert 0 <= r["probe_tokens_used"] <= bound
        assert r["budget_used"] == r["tokens_used"] + r["probe_tokens_used"]


if CASES:  # only under make test-long: an empty parameter set would be reported as a skip

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("task, T", CASES)
    def test_long_budget_pipeline(tmp_path, task, T, backend):
        long_budget_pipeline(tmp_path, task, T, backend)
