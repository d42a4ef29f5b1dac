"""Benchmark the HF engine on the embedded model (bf16, CPU) against vLLM, and print the ratios.

    python scripts/bench_engine.py                    # defaults: a few minutes on 1 thread
    python scripts/bench_engine.py --threads 2 --new-tokens 64

Measured in one run, so that machine noise (other jobs on the CPU) hits both sides of each
ratio alike:
  1. steered (a random vector on every row) vs unsteered decode at batch 16   (goal >= 0.95)
  2. batch 32 vs batch 1 decode tokens/s                                      (goal >= 8x)
  3. n=16 continuations of a 256-token prefix: KV fork vs re-encoding each    (goal >= 3x)
  4. HF vs vLLM unsteered tokens/s, and vLLM steered (engine/vllm_steer.py, a different vector
     on every row) vs unsteered, where vLLM is installed                       (goal >= 0.8)
  5. mining's hidden states on vLLM (prompt + rollout, every position at layer ℓ): the steering
     hook's capture (model.vllm_hidden_states=capture) vs a teacher-forced pass of the HF copy
     (=hf), on --mine-seqs sequences, interleaved
  6. ESM eval wall time (the online policy, docs/method.md) on the same --esm-questions arith
     questions (the debug preset's prompt and control points), HF vs vLLM, chunk by chunk in
     turn; the library and memory are built from the model's own states (3 tools), or read
     from a run's artifacts with --artifacts <run dir> (its library/ and memory/)
EOS is disabled during the timed decodes of 1-3 so every row decodes exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from esm_steer.config import ControlPointsConfig, ModelConfig, OnlineConfig  # noqa: E402
from esm_steer.engine import SamplingSpec, load_engine, vllm_steer  # noqa: E402

QUESTIONS = [
    "What is 7 + 5? Think step by step.",
    "Tom has 12 apples and gives away 4. How many are left?",
    "Write a short sentence about the sea.",
    "A box holds 6 eggs. How many eggs are in 3 boxes? Explain.",
    "Name three prime numbers and say why they are prime.",
    "What is 15 minus 9? Show your work.",
    "Explain what a triangle is to a child.",
    "If a train goes 60 km in one hour, how far does it go in 2 hours?",
]


def prepared(engine, prompts, steer=False):
    """A prefilled batch that has decoded one (untimed) token; optionally every row steered."""
    batch = engine.start(prompts)
    if steer:
        g = torch.Generator().manual_seed(0)
        for r in batch.active_rows():
            batch.set_steer(r, torch.randn(engine.info.hidden_size, generator=g))
    batch.step()
    return batch


def interleaved_tps(engine, prompt_sets, new_tokens, steer=(False, False)):
    """Decode tokens/s of two batches stepped alternately, one step each in turn, so that
    load from other jobs on the machine hits both sides of the ratio alike."""
    batches = [prepared(engine, p, s) for p, s in zip(prompt_sets, steer)]
    spent = [0.0, 0.0]
    for _ in range(new_tokens):
        for k, b in enumerate(batches):
            t0 = time.perf_counter()
            b.step()
            spent[k] += time.perf_counter() - t0
    return [len(p) * new_tokens / t for p, t in zip(prompt_sets, spent)]


def fork_vs_reencode(engine, prefix, n, cont_tokens):
    """Seconds to produce n continuations of `cont_tokens` tokens of one prefix."""
    t0 = time.perf_counter()
    batch = engine.start([prefix])
    batch.fork(batch.active_rows()[0], n - 1)
    t_ready_fork = time.perf_counter() - t0
    for _ in range(cont_tokens):
        batch.step(1.0)
    t_fork = time.perf_counter() - t0

    t0 = time.perf_counter()
    batch = engine.start([prefix] * n)
    t_ready_re = time.perf_counter() - t0
    for _ in range(cont_tokens):
        batch.step(1.0)
    t_re = time.perf_counter() - t0
    return t_fork, t_re, t_ready_fork, t_ready_re


def mining_states_wall(veng, seqs, reps: int = 2) -> dict[str, float]:
    """Seconds of ``hidden_states`` on `seqs` per source (capture | hf), interleaved, after one
    untimed call of each (the HF copy loads there), and the largest relative difference."""
    spent, states = {"capture": 0.0, "hf": 0.0}, {}
    for how in spent:
        veng.model_cfg.vllm_hidden_states = how
        states[how] = veng.hidden_states(seqs[:2])
    for _ in range(reps):
        for how in spent:
            veng.model_cfg.vllm_hidden_states = how
            t0 = time.perf_counter()
            states[how] = veng.hidden_states(seqs)
            spent[how] += time.perf_counter() - t0
    veng.model_cfg.vllm_hidden_states = "auto"
    rel = max(float(((a - b).norm(dim=-1) / b.norm(dim=-1)).mean()) for a, b in zip(states["capture"], states["hf"]))
    return {k: v / reps for k, v in spent.items()} | {"rel": rel}


def esm_artifacts(engine, prompts, artifacts: str | None):
    """(library, memory): a run's, or 3 tools from the model's states at the first prompts."""
    from esm_steer.esm.library import Library, Tool
    from esm_steer.esm.memory import Memory, l2_normalise

    if artifacts:
        return Library.load(artifacts), Memory.load(artifacts)
    last = torch.stack([h[-1] for h in engine.hidden_states(prompts[:3])])
    scale, d, g = float(last.norm(dim=-1).mean()), last.shape[1], torch.Generator().manual_seed(0)
    tools, keys, entries = [], [], []
    for i, q in enumerate([0.5, 0.3, 0.8]):
        v = torch.randn(d, generator=g)
        states = torch.stack([last[(i + j) % 3] + 0.05 * scale / d**0.5 * torch.randn(d, generator=g) for j in (0, 1)])
        tools.append(Tool(f"t{i}", f"q{i}", 0, q, 0.3 * scale * v / v.norm(), states.mean(0), states))
        for s in states:
            entries.append({"entry_id": len(entries), "tool_id": f"t{i}", "question_id": f"q{i}", "m": 0, "Q": q})
            keys.append(s.numpy())
    return Library(tools, {"hidden_size": d}), Memory(l2_normalise(np.stack(keys)), entries, {"normalised": True})


def esm_eval_wall(engines, n_questions: int, artifacts: str | None, chunk: int = 16):
    """Seconds of the online policy (esm, debug preset) per engine on the same arith questions,
    the engines taking the chunks in turn; and whether their kept tokens agree."""
    from hydra import compose, initialize_config_module

    import esm_steer.cli  # noqa: F401 - registers the schema and resolvers
    from esm_steer import runtime
    from esm_steer.esm.online import OnlinePolicy

    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["experiment=debug"])
    examples = runtime.load_examples(cfg, runtime.eval_split(cfg), n_questions)
    prompts = runtime.prompt_ids(engines[0], cfg, examples)
    library, memory = esm_artifacts(engines[0], prompts, artifacts)
    online = OnlineConfig(**{k: cfg.online[k] for k in cfg.online if k in OnlineConfig.__dataclass_fields__})
    cp = ControlPointsConfig(segment_delimiter=cfg.control_points.segment_delimiter, M=cfg.control_points.M)
    T = int(cfg.decode.max_new_tokens)
    spent, tokens = [0.0] * len(engines), [[] for _ in engines]
    for lo in range(0, len(prompts), chunk):
        for k, e in enumerate(engines):
            t0 = time.perf_counter()
            out = OnlinePolicy(e, library, memory, online, cp).run(prompts[lo : lo + chunk], T)
            spent[k] += time.perf_counter() - t0
            tokens[k] += [r.token_ids for r in out]
    same = sum(a == b for a, b in zip(tokens[0], tokens[-1]))
    return spent, same, len(prompts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared CPU)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=48, help="timed decode steps per measurement")
    ap.add_argument("--steer-batch", type=int, default=16)
    ap.add_argument("--big-batch", type=int, default=32)
    ap.add_argument("--prefix-tokens", type=int, default=256)
    ap.add_argument("--n-cont", type=int, default=16)
    ap.add_argument("--cont-tokens", type=int, default=8, help="tokens per continuation (probes: 4-8)")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--mine-seqs", type=int, default=64, help="prompt + rollout sequences of the hidden-state timing")
    ap.add_argument("--esm-questions", type=int, default=64, help="arith questions of the ESM eval timing (0: skip)")
    ap.add_argument("--artifacts", default=None, help="a run dir whose library/ and memory/ the ESM timing uses")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(gguf_file="embedded", dtype=args.dtype, backend="hf", device="cpu", num_threads=args.threads)
    t0 = time.perf_counter()
    engine = load_engine(cfg, seed=0)
    print(f"model {engine.info.model_id} {args.dtype}, {args.threads} thread(s), load {time.perf_counter() - t0:.1f} s")
    eos = engine.eos_token_ids
    engine.eos_token_ids = set()  # every row decodes exactly new_tokens tokens

    prompts = [engine.encode_chat(QUESTIONS[i % len(QUESTIONS)]) for i in range(max(args.big_batch, args.steer_batch))]
    rows = []

    # 1. steered vs unsteered at batch 16
    p16 = prompts[: args.steer_batch]
    un_tps, st_tps = interleaved_tps(engine, [p16, p16], args.new_tokens, steer=(False, True))
    rows += [(f"decode b={args.steer_batch} unsteered", un_tps), (f"decode b={args.steer_batch} steered", st_tps)]

    # 2. batch 32 vs batch 1
    b1, b32 = interleaved_tps(engine, [prompts[:1], prompts[: args.big_batch]], args.new_tokens)
    rows += [("decode b=1", b1), (f"decode b={args.big_batch}", b32)]

    # 3. n continuations of a prefix: fork vs re-encode
    text = " ".join(QUESTIONS) * 20
    prefix = engine.encode_chat("Continue this text.")
    prefix = (prefix + engine.tokenizer(text, add_special_tokens=False)["input_ids"])[: args.prefix_tokens]
    fork_vs_reencode(engine, prefix, 2, 2)  # warm-up
    t_fork, t_re, r_fork, r_re = fork_vs_reencode(engine, prefix, args.n_cont, args.cont_tokens)

    # reference: transformers' own generate at batch 16 (greedy, EOS ignored)
    engine.eos_token_ids = eos
    tok = engine.tokenizer
    enc = tok.pad([{"input_ids": p} for p in p16], return_tensors="pt")
    with torch.inference_mode():
        engine.model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=engine.pad_id)
        t0 = time.perf_counter()
        engine.model.generate(
            **enc,
            max_new_tokens=args.new_tokens + 1,
            min_new_tokens=args.new_tokens + 1,
            do_sample=False,
            pad_token_id=engine.pad_id,
        )
        hf_gen = len(p16) * (args.new_tokens + 1) / (time.perf_counter() - t0)  # includes its prefill
    rows.append((f"transformers generate b={args.steer_batch} (incl. prefill)", hf_gen))

    # 4. vLLM
    vllm_note = "vLLM not installed: HF vs vLLM skipped (make install-vllm)"
    if not args.skip_vllm and importlib.util.find_spec("vllm") is not None:
        spec = SamplingSpec(max_new_tokens=args.new_tokens, temperature=0.8)
        t0 = time.perf_counter()
        out = engine.generate(p16, spec)
        hf_tps = sum(s.num_tokens for r in out for s in r) / (time.perf_counter() - t0)
        veng = load_engine(
            ModelConfig(gguf_file="embedded", dtype=args.dtype, backend="vllm", enforce_eager=True), seed=0
        )
        vllm_steer.install(veng)  # eager engine: the per-request steering hook at layer ℓ
        veng.generate(p16[:2], SamplingSpec(max_new_tokens=4))
        g = torch.Generator().manual_seed(0)
        ranges = [[(len(p), 10**9, torch.randn(veng.info.hidden_size, generator=g), 1.0)] for p in p16]  # one per row
        spent, toks = [0.0, 0.0], [0, 0]
        for _ in range(2):  # unsteered and steered (a different vector on every row), interleaved
            for k in (0, 1):
                t0 = time.perf_counter()
                out = veng.generate(p16, spec) if k == 0 else vllm_steer.steered_generate(veng, p16, ranges, spec)
                spent[k] += time.perf_counter() - t0
                toks[k] += sum(s.num_tokens for r in out for s in r)
        v_tps, vs_tps = toks[0] / spent[0], toks[1] / spent[1]
        rows += [
            ("HF generate (sampling)", hf_tps),
            ("vLLM generate (sampling)", v_tps),
            ("vLLM steered generate (sampling, eager)", vs_tps),
        ]
        vllm_note = (
            f"HF / vLLM unsteered tokens/s: {hf_tps / v_tps:.2f}\n"
            f"  vLLM steered / unsteered tokens/s (eager): {vs_tps / v_tps:.3f}   (>= 0.8)"
        )
        if args.mine_seqs > 0:
            k = -(-args.mine_seqs // len(p16))  # rollouts per prompt
            rollouts = veng.generate(p16, SamplingSpec(max_new_tokens=2 * args.new_tokens, temperature=0.8, n=k))
            seqs = [p + s.token_ids for p, r in zip(p16, rollouts) for s in r][: args.mine_seqs]
            w = mining_states_wall(veng, seqs)
            n_tok = sum(len(q) for q in seqs)
            vllm_note += (
                f"\n  mining hidden states, {len(seqs)} prompt + rollout sequences ({n_tok} tokens): vLLM capture "
                f"{w['capture']:.2f} s, HF copy {w['hf']:.2f} s (HF / capture {w['hf'] / w['capture']:.2f}); "
                f"mean relative difference <= {w['rel']:.4f}"
            )
        if args.esm_questions > 0:
            (t_hf, t_v), same, n = esm_eval_wall([engine, veng], args.esm_questions, args.artifacts)
            vllm_note += (
                f"\n  ESM eval (online policy, debug preset) on {n} arith questions: HF {t_hf:.1f} s, "
                f"vLLM {t_v:.1f} s (HF / vLLM {t_hf / t_v:.2f}); same kept tokens on {same}/{n}"
            )
        veng.close()

    print(f"\n{'measurement':45s} {'tok/s':>8s}")
    for name, v in rows:
        print(f"{name:45s} {v:8.1f}")
    print(f"\n{args.n_cont} continuations x {args.cont_tokens} tokens of a {len(prefix)}-token prefix:")
    print(f"  fork      {t_fork:6.2f} s  (rows ready after {r_fork:.2f} s)")
    print(f"  re-encode {t_re:6.2f} s  (rows ready after {r_re:.2f} s)")
    print("\nratios (goal):")
    print(f"  steered / unsteered at b={args.steer_batch}: {st_tps / un_tps:.3f}   (>= 0.95)")
    print(f"  b={args.big_batch} / b=1 tokens/s:          {b32 / b1:.1f}x   (>= 8x)")
    print(f"  re-encode / fork time:           {t_re / t_fork:.1f}x   (>= 3x; prefill only {r_re / r_fork:.1f}x)")
    print(f"  {vllm_note}")


if __name__ == "__main__":
    main()
