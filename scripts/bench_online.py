"""Benchmark the online ESM policy against greedy decoding on the embedded model (issue 5, item 5).

    python scripts/bench_online.py                                   # synthetic library + memory
    python scripts/bench_online.py --artifact-run-dir outputs/debug/latest
    python scripts/bench_online.py experiment=debug decode.max_new_tokens=64 online.probe_tokens=4

On the same eval examples and T_max (``decode.max_new_tokens``), in one run:
  1. ESM wall time / greedy wall time       (goal <= 1.5)
  2. probe tokens / used (kept) tokens       (goal <= 0.5)
Greedy and ESM alternate for ``--repeats`` rounds and the fastest round of each counts, so
that load from other jobs on the machine hits both sides alike.

The policy needs a library and a memory. ``--artifact-run-dir`` reads them from a run dir made
by ``esm-mine/select/memory``; without it a SYNTHETIC pair of the right shape is built: B tools
with random vectors (norm ``--synthetic-vnorm`` x the mean layer-ℓ state norm) and 4 memory
entries per tool whose keys are the mean layer-ℓ state of the eval prompts plus random noise,
so that every retrieval passes the gates (every control point probes: a worst case for 2).
Extra arguments are Hydra overrides of the ``eval`` config (``experiment=debug`` by default).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("bench_online")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from esm_steer.config import register_configs, validate

    register_configs()
    with initialize_config_module(config_module="esm_steer.conf", version_base=None):
        cfg = hydra_compose(config_name="eval", overrides=overrides)
    validate(cfg)
    return cfg


def synthetic_artifacts(engine, prompts, B: int, vnorm: float, seed: int = 0):
    """A Library of B random tools and a Memory of 4 entries per tool, shaped for `engine`."""
    from esm_steer.esm.library import Library, Tool
    from esm_steer.esm.memory import Memory, l2_normalise

    d = engine.info.hidden_size
    states = torch.stack([h[-1] for h in engine.hidden_states(prompts)])  # [n, d] real layer-ℓ states
    mean, spread = states.mean(0), states.std(0).clamp_min(1e-3)
    h_norm = float(states.norm(dim=-1).mean())
    g = torch.Generator().manual_seed(seed)
    tools, keys, entries = [], [], []
    for i in range(B):
        v = torch.randn(d, generator=g)
        anchors = mean + spread * torch.randn(4, d, generator=g)
        q = float(torch.rand((), generator=g))
        tools.append(
            Tool(f"s{i:04d}", f"synthetic{i}", i % 3, q, vnorm * h_norm * v / v.norm(), anchors.mean(0), anchors)
        )
        for a in anchors:
            entries.append(
                {
                    "entry_id": len(entries),
                    "tool_id": tools[-1].tool_id,
                    "question_id": f"synthetic{i}",
                    "m": i % 3,
                    "Q": q,
                }
            )
            keys.append(a.numpy())
    meta = {"model_id": engine.info.model_id, "steer_layer": engine.info.steer_layer, "hidden_size": d}
    memory = Memory(l2_normalise(np.stack(keys)), entries, {"normalised": True, "model": engine.info.model_id})
    return Library(tools, meta), memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact-run-dir", default=None, help="run dir with library/ and memory/ (else synthetic)")
    ap.add_argument("--examples", type=int, default=None, help="eval examples (default: task.max_eval_examples)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating greedy/ESM rounds; the fastest of each counts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", default="esm", choices=["esm", "no_memory", "no_probing"])
    ap.add_argument("--synthetic-vnorm", type=float, default=0.1, help="synthetic ‖v‖ / mean ‖h‖")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the eval config")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from esm_steer import runtime
    from esm_steer.engine import SamplingSpec, load_engine
    from esm_steer.esm.online import OnlinePolicy, summarize

    overrides = list(args.overrides)
    if not any(o.startswith("experiment=") for o in overrides):
        overrides.insert(0, "experiment=debug")
    cfg = compose(overrides)
    T = int(cfg.decode.max_new_tokens)

    engine = load_engine(cfg.model, cfg.seed)
    examples = runtime.load_examples(cfg, cfg.task.eval_split, args.examples or "auto")
    prompts = runtime.prompt_ids(engine, cfg, examples)

    if args.artifact_run_dir:
        from esm_steer.esm.library import Library
        from esm_steer.esm.memory import Memory

        library = Library.load(args.artifact_run_dir)
        memory = Memory.load(args.artifact_run_dir, engine.info.model_id, engine.info.steer_layer)
        source = f"artifacts from {args.artifact_run_dir}"
    else:
        library, memory = synthetic_artifacts(engine, prompts, int(cfg.offline_select.B), args.synthetic_vnorm)
        source = f"SYNTHETIC library/memory (random vectors ‖v‖={args.synthetic_vnorm}·‖h‖, keys near real states)"
    online = copy.deepcopy(cfg.online)
    online.variant = args.variant
    policy = OnlinePolicy(engine, library, memory, online, cfg.control_points)

    # warm-up (allocator, first-call overheads) on two prompts, untimed
    engine.generate(prompts[:2], SamplingSpec(max_new_tokens=4))
    policy.run(prompts[:2], 4)

    t_greedy, t_esm = [], []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        greedy = [s[0] for s in engine.generate(prompts, SamplingSpec(max_new_tokens=T))]
        t_greedy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        results = policy.run(prompts, T)
        t_esm.append(time.perf_counter() - t0)

    s = summarize(results)
    greedy_tokens = sum(len(g.token_ids) for g in greedy)
    wall_ratio = min(t_esm) / min(t_greedy)
    probe_ratio = s["probe_tokens_used"] / max(1, s["tokens_used"])
    print(
        f"\nbench_online: {engine.info.model_id} ({engine.info.dtype}, {args.threads} thread(s)), "
        f"{len(prompts)} examples of {cfg.task.dataset}, T_max={T}, batch_size={cfg.model.batch_size}, "
        f"variant={args.variant}"
    )
    print(f"  {source}: {len(library.tools)} tools, {len(memory.entries)} entries")
    print(
        f"  online: k_retrieve={online.k_retrieve} L={online.L} probe_tokens={online.probe_tokens} "
        f"k_scale={online.k_scale}; control points: "
        f"delimiter={cfg.control_points.segment_delimiter!r} M={cfg.control_points.M}"
    )
    print(f"  greedy: {min(t_greedy):.2f}s ({greedy_tokens} tokens)   rounds {[round(t, 2) for t in t_greedy]}")
    print(
        f"  ESM:    {min(t_esm):.2f}s ({s['tokens_used']} kept + {s['probe_tokens_used']} probe tokens, "
        f"{s['control_points']} control points, null rate {s['null_rate']:.2f}, gates {s['gates']})   "
        f"rounds {[round(t, 2) for t in t_esm]}"
    )
    print(f"  ESM wall / greedy wall      = {wall_ratio:.2f}   (goal <= 1.5)")
    print(f"  probe tokens / used tokens  = {probe_ratio:.2f}   (goal <= 0.5)")


if __name__ == "__main__":
    main()
