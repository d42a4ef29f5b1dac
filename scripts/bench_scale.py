"""How the cost of mining and ESM eval grows with the answer budget T and the question count n.

    python scripts/bench_scale.py                         # T = 64 256 1024 4096 at n = 4; n = 8 32 128 at T = 64
    python scripts/bench_scale.py --T 64 256 --n 8 32     # fewer points first
    python scripts/bench_scale.py --json out.json         # also write the rows

Each point runs in its own process (so its peak RSS is its own): the embedded model (float32,
one thread, HF backend) on gsm8k questions from the shared data folder (``--data-root``, default
``../shared/data``), mine (K rollouts per question at T) -> select -> memory, then the ESM policy
on n test questions at T_max = T. EOS is switched off (``--eos`` keeps it): the 135M model stops
after ~100-300 tokens, and the point is the cost of an answer that really is T tokens long
(position / KV-cache arithmetic, control points, tensor sizes), not its quality.

Printed per point: per-token time of mining (rollout tokens) and of ESM eval (kept + probe
tokens), peak RSS, artifact bytes per question (mine/, library/, memory/), probe tokens / kept
tokens; then the fitted growth of each quantity against T and against n: the log-log slope, read
as flat (< 0.3), linear (0.3-1.5) or quadratic (> 1.5)."""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    ("T", "T", "{:d}"),
    ("n", "n", "{:d}"),
    ("mine_s", "mine s", "{:.1f}"),
    ("mine_ms_per_token", "mine ms/tok", "{:.2f}"),
    ("esm_s", "esm s", "{:.1f}"),
    ("esm_ms_per_token", "esm ms/tok", "{:.2f}"),
    ("probe_per_kept", "probe/kept", "{:.3f}"),
    ("control_points_per_q", "cp/q", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("mine_bytes_per_q", "mine B/q", "{:.0f}"),
    ("library_bytes_per_q", "library B/q", "{:.0f}"),
    ("memory_bytes_per_q", "memory B/q", "{:.0f}"),
]
GROWTH = ["mine_ms_per_token", "esm_ms_per_token", "probe_per_kept", "peak_rss_mb", "mine_bytes_per_q"]


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0


def one_point(T: int, n: int, K: int, data_root: str, out: Path, eos: bool) -> dict:
    """Mine + select + memory + ESM eval at (T, n) in this process; the row of the table."""
    import torch
    from hydra import compose, initialize_config_module

    import esm_steer.cli  # noqa: F401 - registers the schema and resolvers
    from esm_steer import runtime
    from esm_steer.config import validate
    from esm_steer.io import read_jsonl
    from esm_steer.pipelines import stage_function
    from esm_steer.runs import start_run

    torch.set_num_threads(1)
    over = [
        "task=gsm8k",
        f"task.data_root={data_root}",
        f"task.max_train_examples={n}",
        f"task.max_eval_examples={n}",
        "model.dtype=float32",
        "model.batch_size=16",
        f"offline_mine.K={K}",
        f"offline_mine.K_pos={K // 2}",
        f"offline_mine.K_neg={K // 2}",
        f"offline_mine.max_new_tokens={T}",
        "offline_mine.pos_source=rollout_or_gold",  # the 135M model rarely solves gsm8k
        f"decode.max_new_tokens={T}",
        "control_points.M=8",
        "offline_select.B=16",
        "offline_select.min_per_control_point=0",
        "eval.methods=[esm]",
        "eval.ablations=[]",
        f"outputs.root_dir={out}",
    ]
    run_dir = out / "run"

    def cfg_for(entry):
        with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
            cfg = compose(config_name=entry, overrides=over)
        validate(cfg)
        return cfg

    engine = runtime.build_engine(cfg_for("mine"))
    if not eos:
        engine.eos_token_ids = set()  # answers of exactly T tokens
    walls = {}
    for entry in ("mine", "select", "memory", "eval"):
        cfg = cfg_for(entry)
        t0 = time.perf_counter()
        stage_function(entry)(cfg, start_run(cfg, run_dir, stage=entry), engine=engine)
        walls[entry] = time.perf_counter() - t0
    rollouts = read_jsonl(run_dir / "mine" / "rollouts.jsonl")
    (esm_dir,) = [d for d in (run_dir / "eval").iterdir() if d.name.startswith("esm")]
    recs = read_jsonl(esm_dir / "per_example.jsonl")
    mine_tokens = sum(r["tokens"] for r in rollouts)
    kept = sum(r["tokens_used"] for r in recs)
    probe = sum(r["probe_tokens_used"] for r in recs)
    return {
        "T": T,
        "n": n,
        "K": K,
        "mine_s": walls["mine"],
        "mine_tokens": mine_tokens,
        "mine_ms_per_token": 1000 * walls["mine"] / max(1, mine_tokens),
        "esm_s": walls["eval"],
        "kept_tokens": kept,
        "probe_tokens": probe,
        "esm_ms_per_token": 1000 * walls["eval"] / max(1, kept + probe),
        "probe_per_kept": probe / max(1, kept),
        "control_points_per_q": sum(len(r.get("steps") or []) for r in recs) / max(1, len(recs)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mine_bytes_per_q": dir_bytes(run_dir / "mine") / n,
        "library_bytes_per_q": dir_bytes(run_dir / "library") / n,
        "memory_bytes_per_q": dir_bytes(run_dir / "memory") / n,
        "memory_entries": len(read_jsonl(run_dir / "memory" / "entries.jsonl")),
        "hidden_size": engine.info.hidden_size,
        "eos": eos,
        "select_memory_s": walls["select"] + walls["memory"],
    }


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (None with < 2 usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def growth(s: float | None) -> str:
    if s is None:
        return "-"
    label = "falling" if s < -0.3 else "flat" if s < 0.3 else "linear" if s <= 1.5 else "quadratic"
    return f"{s:+.2f} ({label})"


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(f.format(r[k]) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="*", default=[64, 256, 1024, 4096], help="budgets (at --n-for-T)")
    ap.add_argument("--n-for-T", type=int, default=4, help="questions at each T of the T sweep")
    ap.add_argument("--n", type=int, nargs="*", default=[8, 32, 128], help="question counts (at --T-for-n)")
    ap.add_argument("--T-for-n", type=int, default=64)
    ap.add_argument("--K", type=int, default=2, help="rollouts per mined question")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--eos", action="store_true", help="stop at EOS (default: answers of exactly T tokens)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"))
    ap.add_argument("--report", type=Path, default=None, help="print the table of an earlier --json")
    ap.add_argument("--point", type=int, nargs=2, metavar=("T", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:  # child: one point, its row as the last stdout line
        row = one_point(args.point[0], args.point[1], args.K, args.data_root, args.work, args.eos)
        print("ROW " + json.dumps(row))
        return
    if args.report:
        report(json.loads(args.report.read_text()), args)
        return
    points = [(T, args.n_for_T) for T in args.T] + [(args.T_for_n, n) for n in args.n]
    rows: list[dict] = []
    for T, n in dict.fromkeys(points):
        work = args.work / f"T{T}_n{n}"
        subprocess.run(["rm", "-rf", str(work)], check=True)
        cmd = [sys.executable, __file__, "--point", str(T), str(n), "--K", str(args.K), "--data-root", args.data_root]
        cmd += ["--work", str(work)] + (["--eos"] if args.eos else [])
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = [x for x in res.stdout.splitlines() if x.startswith("ROW ")]
        if res.returncode or not line:
            sys.exit(f"bench_scale: point T={T} n={n} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[-1][4:]))
        print(f"bench_scale: T={T} n={n} done in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    report(rows, args)


def report(rows: list[dict], args) -> None:
    by_T = [r for r in rows if r["n"] == args.n_for_T]
    by_n = [r for r in rows if r["T"] == args.T_for_n]
    K, eos = rows[0]["K"], rows[0]["eos"]
    print(f"\nbench_scale: embedded SmolLM2-135M float32, 1 thread, gsm8k, K={K}, M=8, eos={eos}")
    print(table(rows))
    print("\nfitted growth (log-log slope):")
    print(f"| quantity | vs T (n={args.n_for_T}) | vs n (T={args.T_for_n}) |\n|---|---|---|")
    for k in GROWTH:
        sT = slope([r["T"] for r in by_T], [r[k] for r in by_T])
        sn = slope([r["n"] for r in by_n], [r[k] for r in by_n])
        print(f"| {k} | {growth(sT)} | {growth(sn)} |")


if __name__ == "__main__":
    main()
