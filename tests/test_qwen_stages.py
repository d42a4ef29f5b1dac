"""Every stage on the seed's model configs (``model=qwen3_4b`` and ``model=r1_distill_qwen_1_5b``)
pointed at the tiny Qwen fixtures (``make fixtures``), HF backend: mine -> select -> memory ->
eval -> case, and token-2048 stage=all, with 0 errors; and the README's one-command check
``esm-eval experiment=debug model=qwen3_4b model.name_or_path=<dir>`` from an empty outputs dir.

Random weights write junk, so no answer is right: mining takes its positives from the gold
solutions (``offline_mine.pos_source=rollout_or_gold``). The delimiter is the seed's "\\n\\n",
which Qwen's BPE merges into ".\\n\\n" and the like."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from esm_steer import runtime
from esm_steer.config import validate
from esm_steer.io import read_jsonl
from esm_steer.pipelines import stage_function
from esm_steer.runs import start_run
from qwen_fixtures import QWEN3, R1, fixture_dir

T = 32
SMALL = [
    "experiment=debug",
    "model.steer_layer=2",
    "model.dtype=float32",
    "model.batch_size=16",
    "task.max_train_examples=4",
    "task.max_eval_examples=4",
    "offline_mine.K=4",
    "offline_mine.K_pos=2",
    "offline_mine.K_neg=2",
    f"offline_mine.max_new_tokens={T}",
    "offline_mine.pos_source=rollout_or_gold",
    f"decode.max_new_tokens={T}",
    "control_points.M=4",
    "control_points.first_m=0",  # a random model seldom writes the delimiter: steer from the prompt's end
    "offline_select.B=4",
    "eval.ablations=[no_probing]",
    "token2048.n_questions=2",
    "token2048.n_prefix=2",
    "token2048.prefix_tokens=8",
    "token2048.n_cont=2",
    "token2048.max_new_tokens=16",
    "token2048.questions_per_shard=1",
]
SEED_CONFIGS = {QWEN3: "qwen3_4b", R1: "r1_distill_qwen_1_5b"}


def compose_cfg(entry: str, name: str, root: Path, extra: list[str] = ()):
    import esm_steer.cli  # noqa: F401 - registers the schema and resolvers

    overrides = [*SMALL, f"model={SEED_CONFIGS[name]}", f"model.name_or_path={fixture_dir(name)}"]
    overrides += [f"outputs.root_dir={root}", *extra]
    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        cfg = compose(config_name=entry, overrides=overrides)
    cfg.control_points.segment_delimiter = "\n\n"  # the seed's (a CLI override cannot write a newline)
    validate(cfg)
    return cfg


@pytest.fixture(scope="module", params=[QWEN3, R1])
def staged(request, tmp_path_factory):
    """One engine, the stages in order into one run dir: (name, run dir, engine)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    run_dir = root / "run"
    engine = runtime.build_engine(compose_cfg("mine", name, root))
    for entry in ("mine", "select", "memory", "eval", "case"):
        extra = ["eval.example_ids=[0,1]", "eval.tag=case"] if entry == "case" else []
        cfg = compose_cfg(entry, name, root, extra)
        stage_function(entry)(cfg, start_run(cfg, run_dir, stage=entry), engine=engine)
    cfg = compose_cfg("token2048", name, root, ["stage=all"])
    stage_function("token2048", "all")(cfg, start_run(cfg, root / "t2048", stage="token2048_all"), engine=engine)
    yield name, root, engine
    engine.close()


def test_mine_select_memory(staged):
    name, root, engine = staged
    run = root / "run"
    summary = json.loads((run / "mine" / "summary.json").read_text())
    assert summary["rollouts"] == 4 * 4 and sum(summary["finish_reasons"].values()) == 16
    assert summary["model_id"] == str(fixture_dir(name)) and summary["hidden_size"] == 128
    assert summary["candidates_kept"] > 0
    assert all(0 <= int(m) < 4 for m in summary["candidates_per_m"])
    for r in read_jsonl(run / "mine" / "rollouts.jsonl"):
        assert r["tokens"] == len(r["token_ids"]) <= T
        assert (r["finish_reason"] == "length") == (r["tokens"] == T) or r["finish_reason"] == "stop"
        assert not set(r["token_ids"]) & engine.eos_token_ids  # EOS ends a rollout, it is not in it
    lib = read_jsonl(run / "library" / "library.jsonl")
    assert 0 < len(lib) <= 4
    entries = read_jsonl(run / "memory" / "entries.jsonl")
    assert len(entries) >= len(lib) and (run / "memory" / "keys.npy").is_file()


def test_eval_and_case_have_no_errors_and_record_steps(staged):
    name, root, _ = staged
    run = root / "run"
    methods = {}
    for d in (run / "eval").iterdir():
        if (d / "per_example.jsonl").is_file():
            methods[d.name] = read_jsonl(d / "per_example.jsonl")
    assert any(k.startswith("case") for k in methods), sorted(methods)
    evals = {k: v for k, v in methods.items() if not k.startswith("case")}
    assert len(evals) >= 3, sorted(evals)  # greedy, esm, no_probing
    steps = 0
    for tag, recs in methods.items():
        assert recs and all(r["finish_reason"] != "error" for r in recs), tag
        for r in recs:
            assert r["tokens_used"] <= T if "tokens_used" in r else True
            steps += len(r.get("steps") or [])
    assert steps > 0, "no online step was recorded"
    table = pd.read_csv(run / "tables" / "main_results_single.csv")
    assert set(table["n"]) == {4}
    assert list((run / "cases").glob("*.md"))


def test_token2048_all(staged):
    _, root, _ = staged
    out = root / "t2048" / "token2048"
    final = pd.read_parquet(out / "final_best.parquet")
    stage3 = pd.read_parquet(out / "stage3_output.parquet")
    assert len(final) == 2 and len(stage3) == 2 * 2 * 2
    assert json.loads((out / "summary.json").read_text())


def run_eval_cli(tmp_path: Path, extra: list[str] = ()) -> None:
    """The README's command: the seed's config with a local folder, nothing else prepared."""
    exe = Path(sys.executable).parent / "esm-eval"
    args = [
        "experiment=debug",
        "model=qwen3_4b",
        f"model.name_or_path={fixture_dir(QWEN3)}",
        "model.steer_layer=2",
        "model.dtype=float32",
        "task.max_train_examples=4",
        "task.max_eval_examples=2",
        "offline_mine.K=4",
        "offline_mine.K_pos=2",
        "offline_mine.K_neg=2",
        "offline_mine.max_new_tokens=16",
        "offline_mine.pos_source=rollout_or_gold",
        "decode.max_new_tokens=16",
        "control_points.first_m=0",
        "offline_select.B=4",
        "eval.ablations=[]",
        f"outputs.root_dir={tmp_path / 'out'}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([str(exe), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (table,) = (tmp_path / "out").glob("debug/*/tables/main_results_single.csv")
    assert set(pd.read_csv(table)["method"]) >= {"greedy", "esm"}


def test_esm_eval_cli_on_the_seed_config_from_empty_outputs(tmp_path):
    run_eval_cli(tmp_path)
