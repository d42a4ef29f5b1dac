"""Benchmark: stage-3 continuation with a shared prefix vs re-encoding it per continuation.

The token-2048 continue stage asks for n continuations of one long prefix. Done right, the
prefix is prefilled once and its KV cache forked n ways (``engine.generate([prefix], n=n)``);
the naive way sends n copies of the prompt (``generate([prefix] * n, n=1)``), which prefills
it n times. Both runs below decode the same number of rows in one batch with the same
sampling, so the difference is the redundant prefill. Prints tokens/s of both and the ratio
for each continuation length given (the first is the headline figure).

The ratio is bounded by (16 prefills + decode) / (1 prefill + decode): it is large while the
prefill dominates (short continuations, long prefixes, as in stage 3 with 2048-token
prefixes) and tends to 1 as decoding dominates.

    python scripts/bench_token2048.py                      # embedded SmolLM2-135M, bf16, CPU
    python scripts/bench_token2048.py --new-tokens 64 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from esm_steer.config import ModelConfig  # noqa: E402
from esm_steer.engine import SamplingSpec, load_engine  # noqa: E402

FILLER = (
    "Let me think about this step by step. First, I write down what the problem gives us and what "
    "it asks for. The quantities are related by the conditions in the statement, so I set up an "
    "equation for each condition, simplify, and check the result against the original numbers. "
)


def shared_prefix(tokenizer, length: int) -> list[int]:
    """A chat prompt plus reasoning text: exactly `length` token ids, assistant turn open."""
    messages = [{"role": "user", "content": "Mia has 9 marbles and gives away 5. How many are left?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    filler = list(tokenizer(FILLER * (length // 20 + 1), add_special_tokens=False)["input_ids"])
    return (ids + filler)[:length]


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    samples = fn()
    dt = time.perf_counter() - t0
    return dt, sum(s.num_tokens for per_prompt in samples for s in per_prompt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix-tokens", type=int, default=256)
    ap.add_argument("--n", type=int, default=16, help="continuations of the prefix")
    ap.add_argument(
        "--new-tokens",
        type=int,
        nargs="+",
        default=[32, 8],
        help="max new tokens per continuation (several: one row each)",
    )
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each; the median is reported")
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--gguf-file", default="embedded", help="'' for a hub / local model")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    mcfg = OmegaConf.structured(ModelConfig)
    mcfg.name_or_path, mcfg.gguf_file = args.model, (args.gguf_file or None)
    mcfg.dtype, mcfg.device, mcfg.num_threads = args.dtype, args.device, args.threads
    mcfg.batch_size = args.n  # both modes decode their n rows in one batch
    engine = load_engine(mcfg, seed=0)
    prefix = shared_prefix(engine.tokenizer, args.prefix_tokens)
    engine.generate([prefix[:32]], SamplingSpec(max_new_tokens=4, temperature=1.0, n=2, seed=0))  # warm-up
    dev = engine.device if hasattr(engine, "device") else args.device
    print(
        f"model {engine.info.model_id} ({engine.info.dtype}, {dev}, {args.threads} thread(s)); "
        f"prefix {len(prefix)} tokens, n={args.n}, {args.repeats} repeat(s)"
    )
    tps = lambda runs: statistics.median(tok / dt for dt, tok in runs)  # noqa: E731
    for new in args.new_tokens:
        spec = SamplingSpec(max_new_tokens=new, temperature=1.0, top_p=1.0, n=args.n, seed=0)
        one = SamplingSpec(max_new_tokens=new, temperature=1.0, top_p=1.0, n=1, seed=0)
        shared, reenc = [], []
        for _ in range(args.repeats):  # alternate, so a load change on the machine hits both
            shared.append(timed(lambda spec=spec: engine.generate([prefix], spec, prompt_seeds=[0])))
            reenc.append(
                timed(lambda one=one: engine.generate([prefix] * args.n, one, prompt_seeds=list(range(args.n))))
            )
        a, b = tps(shared), tps(reenc)
        print(f"{new} new tokens per continuation:")
        for name, runs, v in (("shared prefix (prefill once + fork)", shared, a), (f"re-encode x{args.n}", reenc, b)):
            dt, tok = sorted(runs)[len(runs) // 2]
            print(f"  {name:38s} {v:8.1f} tok/s   ({tok} tokens in {dt:.2f} s)")
        print(f"  speed-up shared / re-encode: {a / b:.2f}x (goal >= 3x)")
    engine.close()


if __name__ == "__main__":
    main()
