"""esm-eval: per-example records, resume after a kill, tables, artifacts resolution.

A fake engine and a fake online policy give known answers, so every number is checkable;
one test runs greedy through the real HF backend on the tiny model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from hydra import compose, initialize_config_module

import esm_steer.cli  # noqa: F401 - registers the schema and resolvers
from esm_steer.data.tasks import Example
from esm_steer.engine.base import EngineInfo, Sample
from esm_steer.esm import common
from esm_steer.evaluate import eval as ev
from esm_steer.evaluate import records as R
from esm_steer.evaluate.report import TABLE_COLUMNS
from esm_steer.io import read_jsonl
from esm_steer.runs import Run, RunError

N = 20
EXAMPLES = [Example(id=f"q{i:03d}", question=f"What is {i} + 1?", gold=str(i + 1)) for i in range(N)]


def greedy_right(i: int) -> bool:
    return i % 3 == 0


def esm_right(i: int, variant: str = "esm") -> bool:
    return i % 2 == 0 if variant == "esm" else i % 4 == 0


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in eval catches it."""


class FakeEngine:
    """Answers prompt [i] with the gold of example i when greedy_right(i); i % 7 == 0 truncates."""

    def __init__(self, kill_after_calls: int | None = None, fail_ids: tuple[int, ...] = ()):
        self.info = EngineInfo("fake", 2, 8, 1, "float32", "fake")
        self.tokenizer = None
        self.calls = 0
        self.kill_after_calls = kill_after_calls
        self.fail_ids = fail_ids

    def generate(self, prompts, spec):
        self.calls += 1
        if self.kill_after_calls is not None and self.calls > self.kill_after_calls:
            raise Killed()
        out = []
        for (i,) in prompts:
            if i in self.fail_ids:
                raise RuntimeError(f"boom on {i}")
            ans = EXAMPLES[i].gold if greedy_right(i) else "0"
            n = min(spec.max_new_tokens, 5 + i)
            finish = "length" if i % 7 == 0 else "stop"
            out.append([Sample(list(range(n)), f"Thinking.\n\nThe answer is {ans}.", [0.0] * n, finish, 1)])
        return out


class FakePolicy:
    def __init__(self, variant: str):
        self.variant = variant

    def run(self, prompts, max_new_tokens):
        out = []
        for (i,) in prompts:
            ans = EXAMPLES[i].gold if esm_right(i, self.variant) else "0"
            steps = [
                {"m": 0, "offset": 0, "retrieved": [[3, 0.9], [5, 0.4]], "gate": "ok",
                 "candidates": [{"tool": 3, "A_hat": 0.5, "logprob": -1.0, "score": 0.42}], "chosen": 3, "scale": 0.42},
                {"m": 1, "offset": 2, "retrieved": [], "gate": "min_entries", "candidates": [], "chosen": None, "scale": None},
            ]  # fmt: skip
            probe = 0 if self.variant == "no_probing" else 8
            out.append(SimpleNamespace(token_ids=[1, 2, 3, 4], text=f"Thinking.\n\nThe answer is {ans}.", finish_reason="stop",
                                       tokens_used=4, probe_tokens_used=probe, budget_used=4 + probe, steps=steps))  # fmt: skip
        return out


def compose_cfg(overrides: list[str] | None = None, entry: str = "eval"):
    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        return compose(config_name=entry, overrides=["decode.max_new_tokens=16", "model.batch_size=4"] + (overrides or []))


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(common, "load_examples", lambda cfg, split, max_examples="auto": list(EXAMPLES))
    monkeypatch.setattr(common, "prompt_ids", lambda eng, cfg, exs: [[EXAMPLES.index(e)] for e in exs])
    monkeypatch.setattr(ev, "make_policy", lambda engine, art, cfg, variant, cache: FakePolicy(variant))


def make_artifacts(run_dir: Path) -> Path:
    for d in ("library", "memory"):
        (run_dir / d).mkdir(parents=True, exist_ok=True)
        (run_dir / d / "x.jsonl").write_text("{}\n")
    return run_dir


def test_eval_writes_records_tables_figures_cases(tmp_path, fakes):
    cfg = compose_cfg(["eval.ablations=[no_memory,no_probing]", "eval.max_cases=3"])
    run = Run(make_artifacts(tmp_path / "run"), cfg)
    by = ev.run(cfg, run, engine=FakeEngine())

    recs = read_jsonl(run.dir / "eval" / "greedy_T16" / "per_example.jsonl")
    assert [r["id"] for r in recs] == [e.id for e in EXAMPLES]
    assert set(R.RECORD_FIELDS) <= set(recs[0])
    assert [r["correct"] for r in recs] == [greedy_right(i) for i in range(N)]
    esm = read_jsonl(run.dir / "eval" / "esm_T16" / "per_example.jsonl")
    assert all(r["budget_used"] == r["tokens_used"] + r["probe_tokens_used"] for r in esm)
    assert esm[0]["steps"][0]["chosen"] == 3 and esm[0]["steps"][1]["chosen"] is None

    main = pd.read_csv(run.dir / "tables" / "main_results_single.csv")
    assert list(main.columns) == TABLE_COLUMNS
    assert list(main["method"]) == ["greedy", "esm"]
    assert main.loc[0, "accuracy"] == pytest.approx(sum(map(greedy_right, range(N))) / N)
    assert main.loc[0, "truncation_rate"] == pytest.approx(3 / N)  # 0, 7, 14
    assert pd.isna(main.loc[0, "delta_vs_greedy"])
    d = sum(esm_right(i) for i in range(N)) / N - sum(map(greedy_right, range(N))) / N
    assert main.loc[1, "delta_vs_greedy"] == pytest.approx(d)
    assert main.loc[1, "delta_ci_low"] <= d <= main.loc[1, "delta_ci_high"]
    assert main.loc[1, "probe_overhead"] == pytest.approx(2.0)
    assert main.loc[0, "ci_low"] < main.loc[0, "accuracy"] < main.loc[0, "ci_high"]

    abl = pd.read_csv(run.dir / "tables" / "ablation.csv")
    assert list(abl.columns) == TABLE_COLUMNS
    assert list(abl["method"]) == ["esm", "no_memory", "no_probing"]
    assert abl.loc[2, "probe_overhead"] == 0

    for f in ("tables/diagnostics_T16.csv", "tables/diagnostics_T16.json", "figures/tokens_hist_T16.pdf",
              "figures/tokens_hist_T16.png", "cases/cases_T16.md", "eval/esm_T16/meta.json"):  # fmt: skip
        assert (run.dir / f).is_file(), f
    cases = (run.dir / "cases" / "cases_T16.md").read_text()
    assert "### q002" in cases and "### q015" in cases and "### q010" not in cases  # improved 2 4 8 (10), regressed 3 9 15
    assert "⟦m=0 → t0003 ×0.42⟧Thinking.\n\n⟦m=1 → null⟧The answer is" in cases
    diag = pd.read_csv(run.dir / "tables" / "diagnostics_T16.csv")
    assert list(diag["method"]) == ["greedy", "esm", "no_memory", "no_probing"]
    assert diag.set_index("method").loc["esm", "null_rate"] == pytest.approx(0.5)
    assert set(by) == {"greedy", "esm", "no_memory", "no_probing"}


def test_tag_prefixes_the_eval_dir(tmp_path, fakes):
    cfg = compose_cfg(["eval.methods=[greedy]", "eval.tag=dbg"])
    run = Run(tmp_path, cfg)
    ev.run(cfg, run, engine=FakeEngine())
    assert (tmp_path / "eval" / "dbg_greedy_T16" / "per_example.jsonl").is_file()


def test_per_example_resumes_after_a_kill_without_duplicates(tmp_path, fakes):
    cfg = compose_cfg(["eval.methods=[greedy]"])
    ref = Run(tmp_path / "ref", cfg)
    ev.run(cfg, ref, engine=FakeEngine())
    want = read_jsonl(ref.dir / "eval" / "greedy_T16" / "per_example.jsonl")

    run = Run(tmp_path / "killed", cfg)
    with pytest.raises(Killed):
        ev.run(cfg, run, engine=FakeEngine(kill_after_calls=2))  # 2 chunks of 4 written
    path = run.dir / "eval" / "greedy_T16" / "per_example.jsonl"
    assert len(read_jsonl(path)) == 8
    with open(path, "a") as f:  # a record cut in the middle of its line by the kill
        f.write('{"id": "q008", "question": "What')
    engine = FakeEngine()
    ev.run(cfg, run, engine=engine)
    got = read_jsonl(path)
    assert engine.calls == 3  # only the 12 missing examples, in chunks of 4
    assert len(got) == N and len({r["id"] for r in got}) == N
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(got) == strip(want)


def test_failed_generation_is_recorded_and_the_run_goes_on(tmp_path, fakes):
    cfg = compose_cfg(["eval.methods=[greedy]"])
    run = Run(tmp_path, cfg)
    ev.run(cfg, run, engine=FakeEngine(fail_ids=(5,)))
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "eval" / "greedy_T16" / "per_example.jsonl")}
    assert len(recs) == N
    assert recs["q005"]["finish_reason"] == R.FINISH_ERROR and recs["q005"]["correct"] is False
    assert "boom" in recs["q005"]["error"]
    assert recs["q006"]["correct"] == greedy_right(6)  # its chunk mates were retried alone


def test_missing_artifacts_is_one_line_naming_dir_and_command(tmp_path, fakes):
    cfg = compose_cfg()
    with pytest.raises(RunError) as e:
        ev.run(cfg, Run(tmp_path, cfg), engine=FakeEngine())
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "esm-mine" in msg


def test_greedy_needs_no_artifacts(tmp_path, fakes):
    cfg = compose_cfg(["eval.methods=[greedy]"])
    ev.run(cfg, Run(tmp_path, cfg), engine=FakeEngine())
    assert (tmp_path / "tables" / "main_results_single.csv").is_file()
    assert not (tmp_path / "tables" / "ablation.csv").exists()


def test_run_offline_if_missing_runs_the_stages_into_this_run(tmp_path, fakes, monkeypatch):
    ran = []

    def offline(cfg, run):
        ran.append(run.dir)
        make_artifacts(run.dir)

    monkeypatch.setattr(ev, "run_offline_stages", offline)
    cfg = compose_cfg(["eval.run_offline_if_missing=true"])
    ev.run(cfg, Run(tmp_path, cfg), engine=FakeEngine())
    assert ran == [tmp_path]


@pytest.mark.parametrize("chdir", [True, False])
def test_artifact_run_dir_latest_resolves(tmp_path, monkeypatch, chdir):
    root = tmp_path / "outputs"
    arts = make_artifacts(root / "offline" / "20250101_000000")
    (root / "offline" / "LATEST").write_text("20250101_000000\n")
    if chdir:
        monkeypatch.chdir(tmp_path)
    cfg = compose_cfg([f"outputs.root_dir={root}", "eval.artifact_run_dir=outputs/offline/latest"])
    run = Run(tmp_path / "evalrun", cfg)
    assert ev.resolve_artifact_dir(cfg, run).resolve() == arts.resolve()
    # the artifacts are read in place, never copied into the eval run
    assert not (run.dir / "library").exists()


def test_artifact_run_dir_without_artifacts_fails_in_one_line(tmp_path):
    (tmp_path / "outputs" / "offline" / "r1").mkdir(parents=True)
    (tmp_path / "outputs" / "offline" / "LATEST").write_text("r1\n")
    cfg = compose_cfg([f"outputs.root_dir={tmp_path / 'outputs'}", "eval.artifact_run_dir=outputs/offline/latest"])
    with pytest.raises(RunError, match="has no library and memory") as e:
        ev.resolve_artifact_dir(cfg, Run(tmp_path / "x", cfg))
    assert "\n" not in str(e.value)


def test_greedy_through_the_hf_backend_on_the_tiny_model(tmp_path, tiny_model, tokenizer):
    from esm_steer.engine.hf import HFEngine

    cfg = compose_cfg(["eval.methods=[greedy]", "task.max_eval_examples=3", "decode.max_new_tokens=6"])
    engine = HFEngine(tiny_model, tokenizer, steer_layer=None, batch_size=2)
    run = Run(tmp_path, cfg)
    ev.run(cfg, run, engine=engine)
    recs = read_jsonl(tmp_path / "eval" / "greedy_T6" / "per_example.jsonl")
    assert len(recs) == 3
    for r in recs:
        assert 0 < r["tokens_used"] <= 6 and r["probe_tokens_used"] == 0 and r["steps"] == []
        assert r["response"] == tokenizer.decode(r["token_ids"], skip_special_tokens=True)
    main = pd.read_csv(tmp_path / "tables" / "main_results_single.csv")
    assert len(main) == 1 and main.loc[0, "n"] == 3 and main.loc[0, "T_max"] == 6


def test_rerun_with_other_online_settings_refuses_to_mix_records(tmp_path, fakes):
    cfg = compose_cfg(["eval.methods=[esm]"])
    run = Run(make_artifacts(tmp_path), cfg)
    ev.run(cfg, run, engine=FakeEngine())
    ev.run(cfg, run, engine=FakeEngine())  # same settings: resumes (nothing to do)
    cfg2 = compose_cfg(["eval.methods=[esm]", "online.k_scale=0.5"])
    with pytest.raises(RunError, match=r"online\.k_scale: 1\.0 -> 0\.5") as e:
        ev.run(cfg2, Run(tmp_path, cfg2), engine=FakeEngine())
    assert "\n" not in str(e.value)
    cfg3 = compose_cfg(["eval.methods=[esm]", "online.k_scale=0.5", "eval.tag=k05"])
    ev.run(cfg3, Run(tmp_path, cfg3), engine=FakeEngine())  # a new tag is a new record log
    assert len(read_jsonl(tmp_path / "eval" / "k05_esm_T16" / "per_example.jsonl")) == N


def test_a_finished_eval_reruns_without_a_model(tmp_path, fakes, monkeypatch):
    cfg = compose_cfg(["eval.methods=[greedy,esm]"])
    run = Run(make_artifacts(tmp_path), cfg)
    ev.run(cfg, run, engine=FakeEngine())
    (tmp_path / "tables" / "main_results_single.csv").unlink()
    monkeypatch.setattr(common, "build_engine", lambda cfg: pytest.fail("no engine needed"))
    ev.run(cfg, run)
    main = pd.read_csv(tmp_path / "tables" / "main_results_single.csv")
    assert len(main) == 2 and list(main["model"]) == ["fake", "fake"]
