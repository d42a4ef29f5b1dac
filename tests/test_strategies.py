"""Online strategies as registered variants: the registry, a toy variant run through the
esm-eval CLI on the tiny model, and the one-line errors for names that are not registered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import esm_steer
from esm_steer.config import ConfigError
from esm_steer.esm.strategies import STRATEGIES, Strategy, register_strategy, strategy_class
from esm_steer.evaluate import records as R
from esm_steer.io import read_jsonl

sys.path.insert(0, str(Path(__file__).parent / "faults"))
from fault_lib import ESM_OVERRIDES, run_offline, tiny_engine  # noqa: E402

CONF = Path(esm_steer.__file__).parent / "conf"


def test_every_builtin_strategy_has_its_online_yaml():
    builtin = {n for n, c in STRATEGIES.items() if c.__module__ == "esm_steer.esm.strategies"}
    assert builtin == {"esm", "no_memory", "no_probing", "static"}
    assert builtin == {p.stem for p in (CONF / "online").glob("*.yaml")}


def test_a_name_is_registered_once_and_unknown_names_are_one_line():
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("esm")(type("Other", (Strategy,), {}))
    with pytest.raises(ConfigError, match=r"^eval.methods: unknown online strategy 'nope' \(registered: esm, "):
        strategy_class("nope", "eval.methods")


@pytest.fixture(scope="module")
def engine():
    eng = tiny_engine()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, engine) -> Path:
    """mine -> select -> memory on the tiny model, at <root>/debug/run1."""
    return run_offline(tmp_path_factory.mktemp("outputs") / "debug" / "run1", engine)


# esm-eval's main in a child process (Hydra configures logging for the process it runs in), with
# the toy strategy imported and the tiny model as the engine
CHILD = """
import sys
sys.path[:0] = [{tests!r}, {faults!r}]
import toy_strategy  # registers first_retrieved, as an entry point would
from fault_lib import tiny_engine
from esm_steer import cli, runtime

engine = tiny_engine()
runtime.build_engine = lambda cfg: engine
sys.argv = ["esm-eval", *{argv!r}]
cli.eval_()
"""


def _esm_eval(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    tests = Path(__file__).parent
    argv = [*ESM_OVERRIDES, f"outputs.root_dir={run_dir.parent.parent}", "outputs.run_id=run1", *args]
    code = CHILD.format(tests=str(tests), faults=str(tests / "faults"), argv=argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_a_toy_strategy_runs_through_the_esm_eval_cli(run_dir):
    r = _esm_eval(run_dir, "eval.methods=[greedy,first_retrieved]")
    assert r.returncode == 0, r.stderr[-3000:]
    table = pd.read_csv(run_dir / "tables" / "main_results_single.csv")
    assert list(table["method"]) == ["greedy", "first_retrieved"]
    recs = read_jsonl(R.per_example_path(run_dir, R.method_tag("first_retrieved", 10)))
    steps = [s for r in recs for s in r["steps"] if s["gate"] == "ok"]
    assert steps, "the tiny model's memory gave no control point with tools"
    for s in steps:  # the toy's rule, not esm's: the first retrieved tool, no probe decoded
        assert s["chosen"] == s["candidates"][1]["tool"] and s["scale"] > 0
        assert all(c["logprob"] is None for c in s["candidates"])
    assert all(r["probe_tokens_used"] == 0 for r in recs)


def test_an_unregistered_method_stops_the_cli_in_one_line(run_dir):
    r = _esm_eval(run_dir, "eval.methods=[greedy,nope]")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("esm-eval: eval.methods: unknown online strategy 'nope'") and "\n" not in err, err


def test_an_installed_package_adds_a_strategy_through_its_entry_point(tmp_path, monkeypatch):
    (tmp_path / "plugin_strategy.py").write_text(
        "from esm_steer.esm.strategies import Strategy, register_strategy\n\n"
        "@register_strategy('plugin_null')\nclass PluginNull(Strategy):\n"
        "    def act(self, batch, ex, step, ret):\n        batch.set_steer(ex.row, None)\n"
    )
    dist = tmp_path / "plugin_strategy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-strategy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[esm_steer.strategies]\nplugin_null = plugin_strategy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cls = strategy_class("plugin_null", "eval.methods")
        assert cls.name == "plugin_null" and cls.__module__ == "plugin_strategy"
    finally:
        STRATEGIES.pop("plugin_null", None)
