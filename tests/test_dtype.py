"""model.dtype=auto: resolved from the device's capability (an injected probe stands in for CPUs
and GPUs this machine is not), recorded in config_resolved.json, and refused across dtypes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from esm_steer.config import ESMConfig, ModelConfig, validate
from esm_steer.engine import precision
from esm_steer.engine.precision import CPUCapability, resolve_config, resolve_dtype

AVX2 = CPUCapability("AVX2", bf16_units=False, detail="no amx/avx512_bf16")
AMX = CPUCapability("AVX512", bf16_units=True, detail="amx+avx512_bf16")


def test_auto_is_the_default_and_a_valid_choice():
    assert ModelConfig().dtype == "auto"
    validate(OmegaConf.structured(ESMConfig))  # raises on a value outside model.dtype's choices


def test_auto_on_cpu_follows_the_bf16_units():
    no_units = resolve_dtype("auto", "cpu", cpu_probe=lambda: AVX2)
    assert no_units.name == "float32" and no_units.torch_dtype == torch.float32
    assert "AVX2" in no_units.reason and "no bf16" in no_units.reason and no_units.warning is None
    units = resolve_dtype("auto", "cpu", cpu_probe=lambda: AMX)
    assert units.name == "bfloat16" and "AVX512" in units.reason


def test_auto_on_cuda_is_bf16_where_supported_else_fp16():
    never = lambda: pytest.fail("the CPU probe must not run for a CUDA device")  # noqa: E731
    assert resolve_dtype("auto", "cuda:1", cpu_probe=never, cuda_probe=lambda: True).name == "bfloat16"
    assert resolve_dtype("auto", "cuda", cpu_probe=never, cuda_probe=lambda: False).name == "float16"


def test_explicit_bf16_without_units_runs_with_one_warning():
    slow = resolve_dtype("bfloat16", "cpu", cpu_probe=lambda: AVX2)
    assert slow.name == "bfloat16" and "slower than float32" in slow.warning and "auto" in slow.warning
    assert resolve_dtype("bfloat16", "cpu", cpu_probe=lambda: AMX).warning is None
    assert resolve_dtype("float32", "cpu", cpu_probe=lambda: AVX2).warning is None


def test_unknown_dtype_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="model.dtype=fp8"):
        resolve_dtype("fp8", "cpu", cpu_probe=lambda: AMX)


def test_probe_honours_the_isa_caps_of_an_emulated_avx2_run():
    """ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA cap torch's kernels (bf16 matmul becomes emulated):
    the probe must then report no bf16 units, whatever the hardware has."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    code = "from esm_steer.engine.precision import probe_cpu; c = probe_cpu(); print(c.isa, c.bf16_units)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    isa, units = out.stdout.split()
    assert units == "False" and not isa.startswith("AVX512")  # AVX2 on x86 (DEFAULT below it)


def test_resolve_config_records_the_resolved_dtype(monkeypatch, caplog):
    monkeypatch.setattr(precision, "probe_cpu", lambda: AVX2)
    cfg = OmegaConf.structured(ESMConfig)
    cfg.model.device = "cpu"
    with caplog.at_level(logging.INFO, logger="esm_steer.engine.precision"):
        assert resolve_config(cfg.model).name == "float32"
    assert cfg.model.dtype == "float32" and "AVX2" in caplog.text
    assert resolve_config(cfg.model) is None  # explicit now: resolved once


def test_start_run_writes_the_resolved_dtype(monkeypatch, tmp_path):
    from esm_steer.runs import start_run

    monkeypatch.setattr(precision, "probe_cpu", lambda: AMX)
    cfg = OmegaConf.structured(ESMConfig)
    cfg.model.device = "cpu"
    start_run(cfg, run_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config_resolved.json").read_text())["model"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("cap,expected", [(AVX2, torch.float32), (AMX, torch.bfloat16)])
def test_engine_starts_at_the_resolved_dtype(monkeypatch, tmp_path, tokenizer, tiny_model, cap, expected):
    from esm_steer.engine.hf import HFEngine

    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(precision, "probe_cpu", lambda: cap)
    cfg = ModelConfig(name_or_path=str(folder), gguf_file=None, dtype="auto", device="cpu", steer_layer=1)
    engine = HFEngine.from_config(cfg)
    try:
        assert next(engine.model.parameters()).dtype == expected
        assert engine.info.dtype == str(expected).removeprefix("torch.")
    finally:
        engine.close()


def test_eval_refuses_a_library_mined_at_another_dtype(tmp_path):
    from esm_steer.evaluate import methods
    from esm_steer.runs import RunError

    class Lib:
        meta = {"dtype": "bfloat16"}

    class Info:
        model_id, steer_layer, dtype = "m", 1, "float32"

    class Engine:
        info = Info()

    cache = {"library": Lib(), "memory": None}  # loaded: make_policy checks before building the policy
    cfg = OmegaConf.structured(ESMConfig)
    with pytest.raises(RunError, match="dtype: 'bfloat16' -> 'float32'.*model.dtype=bfloat16"):
        methods.make_policy(Engine(), tmp_path, cfg, "esm", cache)
