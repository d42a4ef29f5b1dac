"""GPU memory between vLLM's reservation and the HF copy that computes hidden states.

vLLM reserves ``model.gpu_memory_utilization`` of the card (weights + KV cache) when it starts;
the HF copy (``model.vllm_hidden_states=hf``, or ``auto`` on a compiled engine) loads later, on
the first ``hidden_states`` call, next to it. Lowering the fraction at start by the copy's share
keeps that load from running out of memory on a card under 80 GB.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors import safe_open

from esm_steer.engine.hf.engine import _TOKENS_PER_FORWARD as HF_TOKENS_PER_FORWARD

log = logging.getLogger(__name__)


def hf_copy_bytes(path: str, hf_cfg, dtype: str) -> int:
    """GPU bytes of the HF copy: its weights at `dtype` (parameter counts from the safetensors
    headers) plus one forward chunk of activations up to layer ℓ."""
    params = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                params += math.prod(st.get_slice(k).get_shape())
    size = getattr(torch, dtype, torch.bfloat16).itemsize if dtype != "auto" else 2
    hidden = int(hf_cfg.hidden_size)
    inter = int(getattr(hf_cfg, "intermediate_size", 4 * hidden))
    # the residual stream, attention and MLP intermediates of one forward chunk
    activations = HF_TOKENS_PER_FORWARD * (4 * hidden + 3 * inter) * size
    return params * size + activations


def gpu_memory_fraction(model_cfg, path: str, hf_cfg, dtype: str) -> float:
    """``model.gpu_memory_utilization``, lowered on a GPU by the HF copy's share of the card when
    hidden states will come from it."""
    frac = float(model_cfg.gpu_memory_utilization)
    how = str(getattr(model_cfg, "vllm_hidden_states", "auto") or "auto")
    if not torch.cuda.is_available() or not (how == "hf" or (how == "auto" and not model_cfg.enforce_eager)):
        return frac
    total = torch.cuda.get_device_properties(0).total_memory
    return lowered_fraction(frac, hf_copy_bytes(path, hf_cfg, dtype), total)


def lowered_fraction(frac: float, copy_bytes: int, total_bytes: int) -> float:
    new = round(frac - copy_bytes / total_bytes, 3)
    if new < 0.1:
        raise RuntimeError(
            f"the HF copy for hidden states needs {copy_bytes / 2**30:.1f} GiB of the GPU's {total_bytes / 2**30:.0f} "
            "GiB, too much next to vLLM: set model.enforce_eager=true (hidden states from the steering hook)"
        )
    log.info(
        "vLLM: gpu_memory_utilization %.3f -> %.3f, leaving %.1f GiB for the HF copy that computes hidden states "
        "(model.vllm_hidden_states=hf or auto on a compiled engine; model.enforce_eager=true needs no copy)",
        frac,
        new,
        copy_bytes / 2**30,
    )
    return new
