"""The tuning workflow end to end through the CLI, on experiment=debug with the real embedded model:
offline once, a sweep over online.* on the validation split, then the best configuration once on test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
# tiny sizes: the workflow, not a result
SMALL = [
    "experiment=debug",
    "task.max_train_examples=6",
    "task.max_eval_examples=3",
    "offline_mine.K=4",
    "offline_mine.K_pos=2",
    "offline_mine.K_neg=2",
    "offline_mine.max_new_tokens=24",
    "decode.max_new_tokens=24",
    "eval.ablations=[]",
]


def _cli(tmp_path: Path, entry: str, *args: str, multirun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        str(BIN / f"esm-{entry}"),
        *(["-m"] if multirun else []),
        *SMALL,
        f"outputs.root_dir={tmp_path / 'out'}",
        *args,
    ]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


def test_sweep_on_val_then_best_of_on_test(tmp_path):
    for entry in ("mine", "select", "memory"):
        _cli(tmp_path, entry, *(["outputs.run_id=latest"] if entry != "mine" else []))
    artifacts = tmp_path / "out" / "debug" / "latest"
    _cli(
        tmp_path,
        "eval",
        "eval.split=val",
        "online.k_scale=0.5,4",
        f"eval.artifact_run_dir={artifacts}",
        "outputs.suite_id=tune",
        multirun=True,
    )
    sweep = tmp_path / "out" / "_suite" / "tune"
    ranking = pd.read_csv(sweep / "tables" / "suite_ranking.csv")
    assert len(ranking) == 2 and set(ranking["split"]) == {"val"}
    winner = ranking.iloc[0]

    _cli(tmp_path, "eval", f"eval.best_of={sweep}", "outputs.run_id=best")
    run_dir = tmp_path / "out" / "debug" / "best"
    info = json.loads((run_dir / "best_of.json").read_text())
    assert info["ranked_on_split"] == "val" and info["job_num"] == int(winner["job_num"])
    cfg = json.loads((run_dir / "config_resolved.json").read_text())
    assert cfg["eval"]["split"] == "test"
    assert cfg["online"]["k_scale"] == pytest.approx(float(info["overrides"][0].split("=")[1]))
    main = pd.read_csv(run_dir / "tables" / "main_results_single.csv")
    assert list(main["method"]) == ["greedy", "esm"] and (main["n"] == 3).all()
