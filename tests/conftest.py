"""Shared fixtures: the real SmolLM2 tokenizer and a tiny randomly initialised Llama.

The tokenizer comes from the embedded GGUF's cached safetensors conversion (made once,
~30 s, then 0.1 s). The tiny model has the real vocabulary so that chat templates, stop
strings and decoding behave as with the real model.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def embedded_dir():
    """The converted embedded model folder (config, safetensors, tokenizer)."""
    from esm_steer.engine.loading import EMBEDDED, ensure_converted

    return ensure_converted("HuggingFaceTB/SmolLM2-135M-Instruct", EMBEDDED)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from esm_steer.engine.loading import load_tokenizer

    return load_tokenizer(str(embedded_dir))


def make_tiny_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A 2-layer, 64-wide Llama with SmolLM2's vocabulary (eos = pad = 2), float32, eval mode."""
    return make_tiny_model(len(tokenizer))


def make_lively_model(vocab_size: int, seed: int = 1, scale: float = 10.0):
    """A tiny model whose weights are scaled up so that greedy decoding does not just repeat
    one token (the default init gives near-uniform logits)."""
    model = make_tiny_model(vocab_size, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


@pytest.fixture
def tiny_engine(tokenizer, tiny_model):
    """An HFEngine (float32, CPU, steer layer 1) around the session's tiny model."""
    from esm_steer.engine.hf import HFEngine

    engine = HFEngine(tiny_model, tokenizer, batch_size=8)
    yield engine
    engine._hook.remove()  # the model is shared by the session: leave it unhooked


@pytest.fixture(scope="module")
def lively_engine(tokenizer):
    """An HF engine on a tiny model whose greedy output varies from token to token."""
    from esm_steer.engine.hf import HFEngine

    engine = HFEngine(make_lively_model(len(tokenizer)), tokenizer, batch_size=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def three_prompts(tokenizer):
    """Three prompts of different lengths (left padding matters)."""
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [enc("Hello there, how are you doing today my friend?"), enc("What is 2 + 3?"), enc("Count:")]
