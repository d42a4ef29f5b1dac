"""Shared by the fault-injection tests and their child processes: one tiny configuration per
pipeline, the tiny random engine, the stage calls, and the faults themselves.

``python tests/faults/fault_lib.py <stage> <run dir>`` runs one stage (mine, eval, token2048) on
the tiny model in a child process, for the tests that kill it with SIGKILL.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import esm_steer.cli  # noqa: F401 - registers the schema and the resolvers
from esm_steer import runtime
from esm_steer.config import ESMConfig
from esm_steer.esm import memory as memory_stage
from esm_steer.esm import select as select_stage
from esm_steer.esm.mine import mine
from esm_steer.evaluate import eval as ev
from esm_steer.runs import Run
from esm_steer.token2048 import pipeline

TESTS = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

# the ESM pipeline at a size the tiny model runs in seconds; a random model answers nothing
# right, so P and N are the better and the worse half by reward
ESM_OVERRIDES = [
    "experiment=debug",
    "task.max_train_examples=6",
    "task.max_eval_examples=6",
    "offline_mine.K=4",
    "offline_mine.K_pos=2",
    "offline_mine.K_neg=2",
    "offline_mine.max_new_tokens=10",
    "offline_mine.require_correct_and_incorrect=false",
    "offline_select.B=4",
    "offline_memory.center_keys=true",
    "control_points.first_m=0",  # a random model seldom writes a delimiter in 10 tokens: steer from m = 0
    "decode.max_new_tokens=10",
    "model.batch_size=4",  # = K: one question per generate call, the same batches on resume
    "eval.methods=[esm]",
    "eval.ablations=[]",
    "eval.run_offline_if_missing=false",
    "eval.max_cases=2",
]
TOKEN2048 = dict(n_questions=4, n_prefix=2, prefix_tokens=6, n_cont=2, max_new_tokens=8, questions_per_shard=1)


def esm_cfg(entry: str = "eval", extra: tuple[str, ...] = ()):
    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        return compose(config_name=entry, overrides=ESM_OVERRIDES + list(extra))


def token2048_cfg(stage: str = "all"):
    cfg = OmegaConf.structured(ESMConfig)
    cfg.task.dataset = "arith"
    cfg.prompt.template = "arith_3shot"
    cfg.model.batch_size = 64
    cfg.stage.name = stage
    for k, v in TOKEN2048.items():
        cfg.token2048[k] = v
    return cfg


def tiny_engine(batch_size: int = 4):
    """The tiny random Llama of tests/conftest.py (the same weights in every process)."""
    if str(TESTS) not in sys.path:  # a child process: conftest is not imported yet
        sys.path.insert(0, str(TESTS))
    from conftest import make_tiny_model  # tests/conftest.py, not a package
    from esm_steer.engine.hf import HFEngine
    from esm_steer.engine.loading import EMBEDDED, ensure_converted, load_tokenizer

    tok = load_tokenizer(str(ensure_converted("HuggingFaceTB/SmolLM2-135M-Instruct", EMBEDDED)))
    return HFEngine(make_tiny_model(len(tok)), tok, batch_size=batch_size)


def run_mine(run_dir: Path, engine) -> dict:
    cfg = esm_cfg("mine")
    examples = runtime.load_examples(cfg, cfg.task.train_split)
    return mine(cfg, run_dir, engine, examples, runtime.prompt_ids(engine, cfg, examples))


def select_and_index(run_dir: Path, extra: tuple[str, ...] = ()) -> None:
    """esm-select then esm-memory on a mined run dir (no model)."""
    for entry, stage in (("select", select_stage), ("memory", memory_stage)):
        cfg = esm_cfg(entry, extra)
        stage.run(cfg, Run(run_dir, cfg))


def run_offline(run_dir: Path, engine) -> Path:
    """A complete mine -> select -> memory run dir on the tiny model."""
    run_mine(run_dir, engine)
    select_and_index(run_dir)
    return run_dir


def run_eval_greedy(run_dir: Path, engine) -> dict:
    cfg = esm_cfg("eval", ("eval.methods=[greedy]", "model.batch_size=1"))
    return ev.run(cfg, Run(Path(run_dir), cfg), engine=engine)


def run_token2048(run_dir: Path, engine, stage: str = "all"):
    cfg = token2048_cfg(stage)
    return pipeline.run(cfg, Run(dir=Path(run_dir), cfg=cfg), engine=engine)


# ---------------------------------------------------------------- faults


def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, len(data) // 2)])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


FAULTS = {"missing": delete, "truncated": truncate, "altered": flip_byte}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): what a failed stage must not change."""
    files = sorted(root.rglob("*")) if root.exists() else []
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file()}


STAGES = {"mine": run_mine, "eval": run_eval_greedy, "token2048": run_token2048}

if __name__ == "__main__":
    stage, run_dir = sys.argv[1], Path(sys.argv[2])
    STAGES[stage](run_dir, tiny_engine())
