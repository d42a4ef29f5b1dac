"""Cost of the artifact check (size + sha256 of every file of library/ and memory/) against the
wall time of esm-eval, at the demo's size (experiment=debug: the embedded SmolLM2-135M, 16 arith
questions, T_max 64, greedy + esm + two ablations).

    python scripts/bench_verify.py

The library and memory have the demo's shapes (B=12 tools of K_pos + K_neg = 8 states, d of the
model) with random vectors: the check reads bytes, so their values do not matter, and the eval
does the same work as the demo's. The check must stay under 2% of the eval wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

import esm_steer.cli  # noqa: F401 - registers the schema and the resolvers
from esm_steer import provenance, runtime
from esm_steer.esm.library import LIBRARY_DIR, Library, Tool, tool_id
from esm_steer.esm.memory import MEMORY_DIR, build_memory
from esm_steer.evaluate import eval as ev
from esm_steer.runs import Run


def cfg_for(entry: str):
    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        return compose(config_name=entry, overrides=["experiment=debug", "eval.run_offline_if_missing=false"])


def demo_sized_artifacts(run_dir: Path, cfg, info) -> None:
    """library/ and memory/ of the demo's shapes for this engine (random directions)."""
    g = torch.Generator().manual_seed(0)
    n_states = int(cfg.offline_mine.K_pos) + int(cfg.offline_mine.K_neg)
    d = info.hidden_size
    tools = []
    for i in range(int(cfg.offline_select.B)):
        states = torch.randn(n_states, d, generator=g)
        v = torch.randn(d, generator=g)
        tools.append(Tool(tool_id(i), f"q{i}", i % int(cfg.control_points.M), 1.0, v, states.mean(0), states))
    lib = Library(tools, {"model_id": info.model_id, "steer_layer": info.steer_layer, "hidden_size": d})
    lib.save(run_dir)
    om = cfg.offline_memory
    build_memory(lib, bool(om.normalize_keys), int(cfg.decode.max_new_tokens), bool(om.center_keys)).save(run_dir)


def verify_once(run_dir: Path) -> float:
    provenance._verified.clear()  # hash every file again, as a fresh process does
    t0 = time.perf_counter()
    provenance.verify(run_dir / LIBRARY_DIR, "select")
    provenance.verify(run_dir / MEMORY_DIR, "memory")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20, help="check timings (the fastest counts)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = cfg_for("eval")
    engine = runtime.build_engine(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "debug" / "bench"
        demo_sized_artifacts(run_dir, cfg, engine.info)
        files = [p for d in (LIBRARY_DIR, MEMORY_DIR) for p in (run_dir / d).rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        check = min(verify_once(run_dir) for _ in range(args.repeats))
        t0 = time.perf_counter()
        ev.run(cfg, Run(run_dir, cfg), engine=engine)
        wall = time.perf_counter() - t0
    engine.close()
    print(f"artifacts: {len(files)} files, {size / 1e6:.2f} MB (library/ + memory/ at the demo's size)")
    print(f"check (size + sha256 of each, once per load): {check * 1e3:.2f} ms")
    methods = ", ".join(ev.eval_methods(cfg))
    print(f"esm-eval wall time ({methods}, {cfg.task.max_eval_examples} questions): {wall:.1f} s")
    pct = 100 * check / wall
    print(f"check / eval wall time: {pct:.4f}% ({'under' if pct < 2 else 'OVER'} the 2% budget)")


if __name__ == "__main__":
    main()
