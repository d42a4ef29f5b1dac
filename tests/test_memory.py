"""Stage III (memory): entries per (tool, state), unit keys, faiss = brute-force cosine, guards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from esm_steer.config import ESMConfig
from esm_steer.esm.library import Library, Tool
from esm_steer.esm.memory import run
from esm_steer.esm.memory_index import Memory, build_memory
from esm_steer.runs import Run, RunError
from modes import with_seed_mode


def make_library(n_tools=5, d=12, seed=0, model_id="fake-model", layer=3) -> Library:
    g = torch.Generator().manual_seed(seed)
    tools = []
    for i in range(n_tools):
        states = torch.randn(2 + i % 3, d, generator=g) * 5
        tools.append(
            Tool(f"t{i:04d}", f"q{i}", i % 2, 1.0 - 0.1 * i, torch.randn(d, generator=g), states.mean(0), states, {})
        )
    return Library(tools, {"model_id": model_id, "steer_layer": layer, "hidden_size": d, "created": "now"})


def test_one_entry_per_tool_state_with_unit_keys():
    lib = make_library()
    mem = build_memory(lib, normalize_keys=True)
    assert len(mem) == sum(t.states.shape[0] for t in lib) == mem.keys.shape[0]
    assert mem.keys.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mem.keys, axis=1), 1.0, atol=1e-5)
    e = mem.entries[3]
    assert set(e) >= {"entry_id", "tool_id", "question_id", "m", "Q"}
    tool = lib.by_id(e["tool_id"])
    np.testing.assert_allclose(
        mem.keys[3], (tool.states[e["state"]] / tool.states[e["state"]].norm()).numpy(), atol=1e-6
    )
    raw = build_memory(lib, normalize_keys=False)
    np.testing.assert_allclose(raw.keys[0], lib.tools[0].states[0].numpy())


def test_faiss_top_k_equals_brute_force_cosine(tmp_path):
    mem = build_memory(make_library(n_tools=8), normalize_keys=True)
    mem.save(tmp_path)
    mem = Memory.load(tmp_path, "fake-model", 3)
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(6, 12)).astype(np.float32) * 7  # not normalised: search does it
    sims, idx = mem.search(queries, k=5)
    assert sims.shape == idx.shape == (6, 5) and sims.dtype == np.float32 and idx.dtype == np.int64
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    kn = mem.keys / np.linalg.norm(mem.keys, axis=1, keepdims=True)
    cos = qn @ kn.T
    expect = np.argsort(-cos, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(idx, expect)
    np.testing.assert_allclose(sims, np.take_along_axis(cos, expect, 1), atol=1e-5)


def test_fewer_entries_than_k_gives_minus_one():
    mem = build_memory(make_library(n_tools=1), normalize_keys=True)  # 2 entries
    sims, idx = mem.search(np.ones((1, 12), np.float32), k=4)
    assert list(idx[0, 2:]) == [-1, -1] and np.isneginf(sims[0, 2:]).all()


def test_load_refuses_another_model_or_layer_in_one_line(tmp_path):
    build_memory(make_library(), True).save(tmp_path)
    with pytest.raises(RunError) as e:
        Memory.load(tmp_path, model_id="other-model", steer_layer=3)
    msg = str(e.value)
    assert "\n" not in msg and "fake-model" in msg and "other-model" in msg
    with pytest.raises(RunError, match=r"meta.txt records a memory made with other settings \(layer: 3 -> 7\)"):
        Memory.load(tmp_path, model_id="fake-model", steer_layer=7)
    assert len(Memory.load(tmp_path)) == len(Memory.load(tmp_path, "fake-model", 3))


def test_missing_memory_names_the_file_and_stage(tmp_path):
    with pytest.raises(RunError, match=r"memory/meta.txt.*esm-memory"):
        Memory.load(tmp_path)


def test_memory_stage_writes_every_file(tmp_path):
    cfg = with_seed_mode(OmegaConf.structured(ESMConfig))  # one entry per state
    OmegaConf.update(cfg, "decode.max_new_tokens", 64, merge=False)
    run_dir = tmp_path / "debug" / "r1"
    make_library().save(run_dir)
    run(cfg, Run(run_dir, cfg))
    for name in ("keys.npy", "entries.jsonl", "meta.txt", "index.faiss"):
        assert (run_dir / "memory" / name).exists()
    meta = (run_dir / "memory" / "meta.txt").read_text()
    for key in ("model: fake-model", "layer: 3", "d: 12", "N: ", "normalised: True", "created: "):
        assert key in meta
    mem = Memory.load(run_dir, "fake-model", 3)
    assert mem.meta["N"] == len(mem) and mem.meta["T_max"] == 64 and mem.normalised
    assert mem.index.ntotal == len(mem)
    assert (tmp_path / "debug" / "LATEST").read_text().strip() == "r1"


def test_memory_stage_without_library_names_select(tmp_path):
    cfg = OmegaConf.structured(ESMConfig)
    with pytest.raises(RunError, match=r"library.jsonl.*esm-select"):
        run(cfg, Run(tmp_path, cfg))


def test_centered_keys_search_is_cosine_of_centred_vectors(tmp_path):
    lib = make_library(n_tools=6)
    for t in lib.tools:  # a large shared component, as in real residual streams
        t.states += 40.0
    mem = build_memory(lib, normalize_keys=True, center_keys=True)
    assert mem.meta["centered"] and mem.center is not None
    np.testing.assert_allclose(np.linalg.norm(mem.keys, axis=1), 1.0, atol=1e-5)
    raw = np.concatenate([t.states.numpy() for t in lib.tools])
    mem.save(tmp_path)
    mem = Memory.load(tmp_path, "fake-model", 3)
    q = raw[:3] + 0.01
    sims, idx = mem.search(q, k=4)
    c = raw - raw.mean(0)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    qc = (q - raw.mean(0)) / np.linalg.norm(q - raw.mean(0), axis=1, keepdims=True)
    expect = np.argsort(-(qc @ cn.T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(idx, expect)
    assert idx[0, 0] == 0 and idx[1, 0] == 1
    # uncentred, the shared component makes every key look alike
    plain = build_memory(lib, normalize_keys=True, center_keys=False)
    assert (plain.keys @ plain.keys.T).mean() > 0.9 > (mem.keys @ mem.keys.T).mean()
