"""Greedy accuracy of the embedded SmolLM2-135M-Instruct on synthetic arith problems.

Used to tune the arith difficulty and prompts so that greedy accuracy sits around 1/3-1/2
(room for steering to help or hurt). One thread: other jobs share the machine.

    python scripts/calibrate_arith.py --n 40 --difficulty 1 --prompts arith_0shot arith_3shot
"""

from __future__ import annotations

import argparse
import logging
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="test problems")
    ap.add_argument("--difficulty", type=int, nargs="+", default=[1])
    ap.add_argument("--prompts", nargs="+", default=["arith_0shot", "arith_3shot"])
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy; > 0: one sample per problem (mining's regime)"
    )
    ap.add_argument("--show", type=int, default=2, help="responses printed per prompt")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from transformers import AutoModelForCausalLM

    from esm_steer import grade, load_task
    from esm_steer.data.prompts import build_messages
    from esm_steer.engine.base import chat_prompt_ids
    from esm_steer.engine.loading import EMBEDDED, ensure_converted, load_tokenizer

    d = ensure_converted("HuggingFaceTB/SmolLM2-135M-Instruct", EMBEDDED)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    tok = load_tokenizer(str(d))

    for difficulty in args.difficulty:
        examples = load_task("arith", "test", seed=args.seed, difficulty=difficulty, num_synthetic=args.n)
        for template in args.prompts:
            t0, correct, shown = time.time(), 0, 0
            for i in range(0, len(examples), args.batch):
                batch = examples[i : i + args.batch]
                ids = [chat_prompt_ids(tok, build_messages(template, ex)) for ex in batch]
                width = max(map(len, ids))
                pad = tok.pad_token_id
                input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
                with torch.no_grad():
                    out = model.generate(
                        input_ids=input_ids,
                        attention_mask=mask,
                        max_new_tokens=args.max_new_tokens,
                        do_sample=args.temperature > 0,
                        **({"temperature": args.temperature, "top_p": 0.95} if args.temperature > 0 else {}),
                        pad_token_id=pad,
                    )
                for ex, row in zip(batch, out[:, width:]):
                    text = tok.decode(row, skip_special_tokens=True)
                    ok = grade(text, ex.gold, "arith")
                    correct += ok
                    if shown < args.show:
                        shown += 1
                        print(f"--- {ex.question}\n>>> {text.strip()}\n[gold {ex.gold}, correct={ok}]")
            acc = correct / len(examples)
            mode = "greedy" if args.temperature <= 0 else f"T={args.temperature}"
            print(
                f"difficulty={difficulty} prompt={template}: {mode} accuracy {correct}/{len(examples)} "
                f"= {acc:.1%} ({time.time() - t0:.0f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
