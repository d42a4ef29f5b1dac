"""hparams_search=esm_optuna end to end through the CLI on the embedded model at tiny sizes: offline
once, a 3-trial Optuna search on the validation split, then eval.best_of runs the best trial on test."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import yaml

from esm_steer.evaluate.jobs import parse_overrides
from test_tuning_e2e import BIN, _cli

pytestmark = pytest.mark.integration


def _same(got, want) -> bool:
    """A sampled value as the override or the config holds it (str, number, bool)."""
    if isinstance(want, bool) or isinstance(want, str):
        return str(got).lower() == str(want).lower()
    return float(got) == pytest.approx(want)


def test_optuna_search_on_val_then_best_of_on_test(tmp_path):
    for entry in ("mine", "select", "memory"):
        _cli(tmp_path, entry, *(["outputs.run_id=latest"] if entry != "mine" else []))
    artifacts = tmp_path / "out" / "debug" / "latest"
    res = _cli(
        tmp_path,
        "eval",
        "hparams_search=esm_optuna",  # a multirun by itself: no -m
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.params={model.steer_layer:'choice(15)'}",  # the layer the artifacts were mined at
        f"eval.artifact_run_dir={artifacts}",
        "outputs.suite_id=opt",
    )
    sweep = tmp_path / "out" / "_suite" / "opt"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) == {
        "online.k_scale",
        "online.tau_null",
        "online.rho",
        "online.L",
        "model.steer_layer",
        "online.inject",
        "online.retrieve_same_m",
    }
    ranking = pd.read_csv(sweep / "tables" / "suite_ranking.csv")
    assert len(ranking) == 3 and set(ranking["split"]) == {"val"} and set(ranking["sweeper"]) == {"optuna"}
    # the trials differ, so the search really sampled (seeded in the preset)
    assert ranking["online.k_scale"].nunique() == 3
    winner = ranking.iloc[0]
    assert winner["objective"] == "accuracy" and winner["objective_value"] == pytest.approx(best["best_value"])
    chosen = parse_overrides(winner["overrides"].split(" "))
    for key, value in best["best_params"].items():
        assert _same(chosen[key], value), key  # rank 1 is the sweeper's best trial
    assert "differs from the sweeper's best trial" not in res.stdout + res.stderr
    # each trial returned its own objective: the value of its esm row
    for _, row in ranking.iterrows():
        main = pd.read_csv(sweep / str(int(row["job_num"])) / "tables" / "main_results_single.csv")
        assert main.loc[main["method"] == "esm", "accuracy"].item() == pytest.approx(row["objective_value"])

    _cli(tmp_path, "eval", f"eval.best_of={sweep}", "outputs.run_id=best")
    run_dir = tmp_path / "out" / "debug" / "best"
    info = json.loads((run_dir / "best_of.json").read_text())
    assert info["sweeper"] == "optuna" and info["job_num"] == int(winner["job_num"])
    assert not any(o.startswith("hparams_search") for o in info["overrides"])
    cfg = json.loads((run_dir / "config_resolved.json").read_text())
    assert cfg["eval"]["split"] == "test"
    for key, value in best["best_params"].items():
        section, name = key.split(".")
        assert _same(cfg[section][name], value), key
    main = pd.read_csv(run_dir / "tables" / "main_results_single.csv")
    assert list(main["method"]) == ["greedy", "esm"] and (main["n"] == 3).all()
    assert [p.name for p in (tmp_path / "out" / "_suite").iterdir()] == ["opt"]  # the test run was no search


def test_optuna_search_refuses_the_test_split(tmp_path):
    res = subprocess.run(
        [
            str(BIN / "esm-eval"),
            "hparams_search=esm_optuna",
            "eval.split=test",
            f"outputs.root_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "esm-eval: eval.split=test: an Optuna search tunes on the validation split" in res.stderr
    assert not list((tmp_path / "out").rglob("main_results_single.csv"))
