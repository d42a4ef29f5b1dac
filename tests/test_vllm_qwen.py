"""The seed's model families on vLLM (``make test-vllm``), with the tiny Qwen fixtures
(``make fixtures``): float32 HF <-> vLLM parity of greedy and of steered decoding on the tiny
Qwen3 and Qwen2 (the steering hook inside vLLM's Qwen3 / Qwen2 decoder layers), and every stage
on the seed's model configs with one eager engine per model: mine (hidden states from the
capture hook) -> select -> memory -> eval -> case, and token-2048 stage=all, with 0 errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from esm_steer import runtime
from esm_steer.engine import vllm_steer
from esm_steer.engine.base import SamplingSpec
from esm_steer.io import read_jsonl
from esm_steer.pipelines import stage_function
from esm_steer.runs import start_run
from qwen_fixtures import QWEN3, R1, hf_engine
from test_qwen_fixtures import QUESTIONS
from test_qwen_stages import compose_cfg, run_eval_cli
from test_vllm_backend import need_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.integration]
VLLM = ["model.backend=vllm", "model.enforce_eager=true", "model.max_model_len=1024"]
N_NEW = 24


@pytest.fixture(scope="module", params=[QWEN3, R1])
def engines(request, tmp_path_factory):
    """(name, HF engine, vLLM engine, root) of one fixture; one vLLM engine at a time in this process."""
    need_vllm()
    name = request.param
    root = tmp_path_factory.mktemp(f"vllm-{name}")
    hf = hf_engine(name)
    v = runtime.build_engine(compose_cfg("mine", name, root, VLLM))
    yield name, hf, v, root
    v.close()
    hf.close()


def _prompts(eng):
    return [eng.encode_chat(q) for q in QUESTIONS]


def test_greedy_parity_float32(engines):
    _, hf, v, _ = engines
    spec = SamplingSpec(max_new_tokens=N_NEW)
    a, b = hf.generate(_prompts(hf), spec), v.generate(_prompts(hf), spec)
    for x, y in zip(a, b):
        assert x[0].token_ids == y[0].token_ids and x[0].finish_reason == y[0].finish_reason
        assert max((abs(p - q) for p, q in zip(x[0].logprobs, y[0].logprobs)), default=0.0) < 1e-3
    assert any(s[0].finish_reason == "stop" for s in a)  # EOS is honoured by both


def test_steered_decode_parity_float32(engines):
    """A vector from the first generated token, switched to another after 5 tokens: vLLM's
    per-request ranges give HF's tokens (the hook sits after decoder layer ℓ in both)."""
    _, hf, v, _ = engines
    prompts = _prompts(hf)
    g = torch.Generator().manual_seed(0)
    scale = float(hf.hidden_states([prompts[0]])[0][-1].norm())
    v1, v2 = (x / x.norm() * scale for x in torch.randn(2, hf.hidden_size, generator=g))
    ref = []
    for p in prompts:
        b = hf.start([p], max_new_tokens=N_NEW)
        (r,) = b.active_rows()
        b.set_steer(r, v1)
        while b.active_rows() and len(b.tokens(r)) < 5:
            b.step()
        if b.active_rows():  # a row may stop at EOS before the switch
            b.set_steer(r, v2)
        while b.active_rows():
            b.step()
        ref.append(list(b.tokens(r)))
    plain = [s[0].token_ids for s in hf.generate(prompts, SamplingSpec(max_new_tokens=N_NEW))]
    assert ref != plain  # the vectors change the tokens, so equality below means something
    ranges = [[(len(p), len(p) + 4, v1, 1.0), (len(p) + 5, 10**9, v2, 1.0)] for p in prompts]
    got = vllm_steer.steered_generate(v, prompts, ranges, SamplingSpec(max_new_tokens=N_NEW))
    assert [s[0].token_ids for s in got] == ref


def test_every_stage_on_vllm(engines):
    name, _, v, root = engines
    run_dir = root / "run"
    for entry in ("mine", "select", "memory", "eval", "case"):
        extra = ["eval.example_ids=[0,1]", "eval.tag=case"] if entry == "case" else []
        cfg = compose_cfg(entry, name, root, VLLM + extra)
        stage_function(entry)(cfg, start_run(cfg, run_dir, stage=entry), engine=v)
    cfg = compose_cfg("token2048", name, root, VLLM + ["stage=all"])
    stage_function("token2048", "all")(cfg, start_run(cfg, root / "t2048", stage="token2048_all"), engine=v)

    summary = json.loads((run_dir / "mine" / "summary.json").read_text())
    assert summary["backend"] == "vllm" and summary["hidden_states"] == "capture"
    assert summary["rollouts"] == 16 and summary["candidates_kept"] > 0 and summary["hidden_size"] == 128
    recs = {d.name: read_jsonl(d / "per_example.jsonl") for d in (run_dir / "eval").iterdir()}
    assert len(recs) >= 4  # greedy, esm, no_probing, the case run
    for tag, rs in recs.items():
        assert rs and all(r["finish_reason"] != "error" for r in rs), tag
    assert sum(len(r.get("steps") or []) for rs in recs.values() for r in rs) > 0
    assert len(pd.read_parquet(root / "t2048" / "token2048" / "final_best.parquet")) == 2


def test_esm_eval_cli_on_vllm_from_empty_outputs(tmp_path):
    need_vllm()
    run_eval_cli(tmp_path, VLLM)  # VLLM_CACHE_ROOT from the environment (make test-vllm sets it)
