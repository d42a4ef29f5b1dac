"""The engine against this machine's own limit: achieved / possible tokens/s, all in one run.

    python scripts/bench_roofline.py                          # HF on the embedded model, 1 thread
    .venv-vllm/bin/python scripts/bench_roofline.py           # + vLLM unsteered and steered
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python scripts/bench_roofline.py                      # as on an AVX2-only CPU (emulated)

Measured here, at the engine's dtype (``--dtype auto``: engine/precision.py) and thread count:
  1. matmul throughput for the model's own weight shapes (every linear of a decoder layer and
     the lm_head), rows = the batch: GFLOPS of one decode step's matmuls, timed shape by shape;
  2. memory bandwidth: a large copy (``--copy-mib`` read + the same written);
  3. from these, the best possible decode tokens/s at batch b (a roofline): one step reads every
     weight once (bytes / bandwidth) and computes 2 x matmul parameters FLOPs per row (FLOPs /
     matmul throughput); the slower of the two bounds the step. Batch 1 is bandwidth-bound,
     batch 32 compute-bound. Attention over the short contexts here is left out (< 2% of FLOPs);
  4. achieved: HF greedy decode at b=1 and b=--big-batch, HF steered decode (a random vector on
     every row) interleaved with unsteered, mining's hidden-state capture (teacher-forced
     prompt + rollout up to layer ℓ, against the compute limit of layers 0..ℓ at --capture-rows
     rows), and with vLLM importable, vLLM generate unsteered and steered at the big batch
     (their time includes the prefill, so their ratio is a lower bound).
EOS is disabled during the HF decodes so that every row decodes exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
from collections import Counter

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from esm_steer.config import ModelConfig  # noqa: E402
from esm_steer.engine import SamplingSpec, load_engine, vllm_steer  # noqa: E402
from esm_steer.engine.hf import decoder_layers  # noqa: E402
from esm_steer.engine.precision import matmul_gflops, probe_cpu, resolve_dtype  # noqa: E402

CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
PROMPT = "Tom has 12 apples and gives away 4. How many are left? Think step by step."


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def linear_shapes(model, upto: int | None = None) -> Counter:
    """(in, out) -> count of the decoder layers' linears (layers 0..upto), plus the lm_head when
    upto is None: the matmuls of one token's forward."""
    layers = decoder_layers(model)
    shapes: Counter = Counter()
    for layer in list(layers)[: None if upto is None else upto + 1]:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                shapes[(m.in_features, m.out_features)] += 1
    if upto is None:
        w = model.get_output_embeddings().weight
        shapes[(w.shape[1], w.shape[0])] += 1
    return shapes


def step_gflops(shapes: Counter, rows: int, dtype: torch.dtype) -> float:
    """GFLOPS of one forward's matmuls at ``rows`` rows: total FLOPs / the sum of each shape's time."""
    flops = seconds = 0.0
    for (k, n), count in shapes.items():
        f = 2 * rows * k * n
        flops += count * f
        seconds += count * f / (matmul_gflops(dtype, rows, k, n, seconds=0.1) * 1e9)
    return flops / seconds / 1e9


def copy_bandwidth(mib: int, reps: int = 5) -> float:
    """GB/s of a large copy, counting the bytes read and written (best of ``reps``)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def limits(batch: int, params: int, elem: int, bw: float, gflops: float) -> tuple[float, float]:
    """(bandwidth-bound, matmul-bound) decode tokens/s at ``batch``: a step reads every weight once
    and computes 2 x params FLOPs per row at the matmul throughput measured for ``batch`` rows."""
    return batch * bw * 1e9 / (params * elem), gflops * 1e9 / (2 * params)


def decode_tps(engine, batches, new_tokens: int, steer=None) -> list[tuple[float, float]]:
    """(mean, best-step) decode tokens/s of prefilled batches stepped in turn (one step each), so
    that load from other jobs hits them alike; ``steer[k]``: a random vector on every row of batch
    k. The best step is what the ratios use: like the best-of timings of the limits, it is what the
    machine does when no other job holds the core."""
    states = []
    g = torch.Generator().manual_seed(0)
    for k, prompts in enumerate(batches):
        b = engine.start(prompts)
        if steer and steer[k]:
            for r in b.active_rows():
                b.set_steer(r, torch.randn(engine.info.hidden_size, generator=g))
        b.step()  # untimed: the first decode step
        states.append(b)
    steps: list[list[float]] = [[] for _ in batches]
    for _ in range(new_tokens):
        for k, b in enumerate(states):
            t0 = time.perf_counter()
            b.step()
            steps[k].append(time.perf_counter() - t0)
    return [(len(p) * len(t) / sum(t), len(p) / min(t)) for p, t in zip(batches, steps)]


def vllm_tps(model_cfg, prompts, new_tokens: int):
    """(mean, best-round) tokens/s of vLLM (eager) greedy generate, unsteered and steered (a vector
    on every row), in turn."""
    veng = load_engine(model_cfg, seed=0)
    try:
        vllm_steer.install(veng)
        spec = SamplingSpec(max_new_tokens=new_tokens, temperature=0.0)
        veng.generate(prompts[:2], SamplingSpec(max_new_tokens=4))  # warm-up
        g = torch.Generator().manual_seed(0)
        ranges = [[(len(p), 10**9, torch.randn(veng.info.hidden_size, generator=g), 1.0)] for p in prompts]
        rounds: list[list[float]] = [[], []]  # tok/s of each round, unsteered and steered in turn
        for _ in range(2):
            for k in (0, 1):
                t0 = time.perf_counter()
                if k == 0:
                    out = veng.generate(prompts, spec)
                else:
                    out = vllm_steer.steered_generate(veng, prompts, ranges, spec)
                rounds[k].append(sum(s.num_tokens for r in out for s in r) / (time.perf_counter() - t0))
        return tuple((sum(r) / len(r), max(r)) for r in rounds)
    finally:
        veng.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared CPU)")
    ap.add_argument("--new-tokens", type=int, default=32, help="timed decode steps per measurement")
    ap.add_argument("--big-batch", type=int, default=32)
    ap.add_argument("--capture-seqs", type=int, default=32, help="prompt + rollout sequences of the capture timing")
    ap.add_argument("--capture-rows", type=int, default=256, help="rows of the matmuls bounding the capture")
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(gguf_file="embedded", dtype=args.dtype, backend="hf", device="cpu", num_threads=args.threads)
    engine = load_engine(cfg, seed=0)
    dtype, model = engine.dtype, engine.model
    cap = probe_cpu()
    caps = {k: os.environ[k] for k in CAPS if os.environ.get(k)}
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__} capability {cap.isa} ({cap.detail})")
    print(f"  {'EMULATED by ' + ' '.join(f'{k}={v}' for k, v in caps.items()) if caps else 'native ISA (no caps)'}")
    print(f"model {engine.info.model_id}, {args.threads} thread(s); model.dtype={args.dtype} -> ", end="")
    print(resolve_dtype(args.dtype, "cpu").reason)

    shapes = linear_shapes(model)
    params = sum(k * n * c for (k, n), c in shapes.items())
    elem = torch.empty(0, dtype=dtype).element_size()
    gf = {b: step_gflops(shapes, b, dtype) for b in (1, args.big_batch)}
    upto = linear_shapes(model, engine.steer_layer)
    params_upto = sum(k * n * c for (k, n), c in upto.items())
    gf_capture = step_gflops(upto, args.capture_rows, dtype)
    bw = copy_bandwidth(args.copy_mib)
    print(f"matmul parameters {params / 1e6:.1f} M ({params * elem / 2**20:.0f} MiB at {engine.info.dtype})")
    print(
        f"matmul throughput, the model's shapes: {gf[1]:.1f} GFLOPS at 1 row, {gf[args.big_batch]:.1f} at "
        f"{args.big_batch} rows, {gf_capture:.1f} at {args.capture_rows} rows (layers 0..{engine.steer_layer})"
    )
    print(f"memory bandwidth (copy of {args.copy_mib} MiB, read + write): {bw:.1f} GB/s")

    engine.eos_token_ids = set()
    prompt = engine.encode_chat(PROMPT)
    big = [prompt] * args.big_batch
    b1, bbig = decode_tps(engine, [[prompt], big], args.new_tokens)
    un, st = decode_tps(engine, [big, big], args.new_tokens, steer=[False, True])
    lim1, limb = limits(1, params, elem, bw, gf[1]), limits(args.big_batch, params, elem, bw, gf[args.big_batch])
    rows = [
        ("HF greedy decode b=1", *b1, *lim1),
        (f"HF greedy decode b={args.big_batch}", *bbig, *limb),
        (f"HF unsteered decode b={args.big_batch} (steer pair)", *un, *limb),
        (f"HF steered decode b={args.big_batch}", *st, *limb),
    ]

    # mining's capture: prompt + a rollout, every position at layer ℓ (teacher-forced)
    rollout = engine.generate([prompt], SamplingSpec(max_new_tokens=96, temperature=0.8))[0][0].token_ids
    seqs = [prompt + rollout[: 32 + i % 64] for i in range(args.capture_seqs)]
    engine.hidden_states(seqs[:2])
    walls = []
    for _ in range(2):
        t0 = time.perf_counter()
        engine.hidden_states(seqs)
        walls.append(time.perf_counter() - t0)
    n_tok = sum(len(s) for s in seqs)
    cap_lim = (float("inf"), gf_capture * 1e9 / (2 * params_upto))  # many rows per weight read: matmul-bound
    name = f"mining capture, {len(seqs)} seqs to layer {engine.steer_layer}"
    rows.append((name, 2 * n_tok / sum(walls), n_tok / min(walls), *cap_lim))

    note = "vLLM: not importable here (run with .venv-vllm/bin/python)"
    if not args.skip_vllm and importlib.util.find_spec("vllm") is not None:
        vcfg = ModelConfig(dtype=args.dtype, backend="vllm", enforce_eager=True, max_model_len=1024)
        v_un, v_st = vllm_tps(vcfg, big, args.new_tokens)
        rows += [(f"vLLM generate b={args.big_batch} (incl. prefill)", *v_un, *limb)]
        rows += [(f"vLLM steered generate b={args.big_batch} (incl. prefill)", *v_st, *limb)]
        note = f"vLLM steered / unsteered (best rounds): {v_st[1] / v_un[1]:.3f}"

    head = f"{'measurement':48s} {'tok/s':>7s} {'best':>7s} {'bandwidth':>9s} {'matmul':>7s} {'best/possible':>13s}"
    print("\n" + head)
    for name, mean, best, by_bw, by_mm in rows:
        print(f"{name:48s} {mean:7.1f} {best:7.1f} {by_bw:9.1f} {by_mm:7.1f} {best / min(by_bw, by_mm):13.3f}")
    print("tok/s: mean; best: the fastest step (HF) or round; possible: the lower of the two limits")
    print(f"\nHF steered / unsteered decode at b={args.big_batch}: {st[0] / un[0]:.3f} mean, {st[1] / un[1]:.3f} best")
    print(f"HF greedy b=1 / bandwidth-bound: {b1[1] / lim1[0]:.2f}")
    print(f"HF greedy b={args.big_batch} / matmul-bound: {bbig[1] / limb[1]:.2f}   (goal >= 0.30)")
    print(note)


if __name__ == "__main__":
    main()
