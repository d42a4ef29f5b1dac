"""esm-eval: per-example records, resume after a kill, tables, artifacts resolution.

A fake engine and a fake online policy give known answers, so every number is checkable;
one test runs greedy through the real HF backend on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

import esm_steer.cli  # noqa: F401 - registers the schema and resolvers
from esm_steer import pipelines, runtime
from esm_steer.data.tasks import Example
from esm_steer.engine.base import EngineInfo, Sample
from esm_steer.evaluate import best_of, methods
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

    supports_steering = True  # the online methods run through FakePolicy

    def __init__(self, kill_after_calls: int | None = None, fail_ids=(), truncate_every: int = 7):
        self.info = EngineInfo("fake", 2, 8, 1, "float32", "fake")
        self.tokenizer = None
        self.calls = 0
        self.kill_after_calls = kill_after_calls
        self.fail_ids = fail_ids
        self.truncate_every = truncate_every

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
            finish = "length" if i % self.truncate_every == 0 else "stop"
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
                {
                    "m": 0,
                    "offset": 0,
                    "retrieved": [[3, 0.9], [5, 0.4]],
                    "gate": "ok",
                    "candidates": [{"tool": 3, "A_hat": 0.5, "logprob": -1.0, "score": 0.42}],
                    "chosen": 3,
                    "scale": 0.42,
                },
                {
                    "m": 1,
                    "offset": 2,
                    "retrieved": [],
                    "gate": "min_entries",
                    "candidates": [],
                    "chosen": None,
                    "scale": None,
                },
            ]
            probe = 0 if self.variant == "no_probing" else 8
            out.append(
                SimpleNamespace(
                    token_ids=[1, 2, 3, 4],
                    text=f"Thinking.\n\nThe answer is {ans}.",
                    finish_reason="stop",
                    tokens_used=4,
                    probe_tokens_used=probe,
                    budget_used=4 + probe,
                    steps=steps,
                )
            )
        return out


def compose_cfg(overrides: list[str] | None = None, entry: str = "eval"):
    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        return compose(
            config_name=entry, overrides=["decode.max_new_tokens=16", "model.batch_size=4"] + (overrides or [])
        )


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(runtime, "load_examples", lambda cfg, split, max_examples="auto": list(EXAMPLES))
    monkeypatch.setattr(runtime, "prompt_ids", lambda eng, cfg, exs: [[EXAMPLES.index(e)] for e in exs])
    monkeypatch.setattr(methods, "make_policy", lambda engine, art, cfg, variant, cache: FakePolicy(variant))


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

    for f in (
        "tables/diagnostics_T16.csv",
        "tables/diagnostics_T16.json",
        "figures/tokens_hist_T16.pdf",
        "figures/tokens_hist_T16.png",
        "cases/cases_T16.md",
        "eval/esm_T16/meta.json",
    ):
        assert (run.dir / f).is_file(), f
    cases = (run.dir / "cases" / "cases_T16.md").read_text()
    assert (
        "### q002" in cases and "### q015" in cases and "### q010" not in cases
    )  # improved 2 4 8 (10), regressed 3 9 15
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
    cfg = compose_cfg(["eval.methods=[greedy]", "eval.max_error_rate=0.05"])  # 1 of 20 is allowed
    run = Run(tmp_path, cfg)
    ev.run(cfg, run, engine=FakeEngine(fail_ids=(5,)))
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "eval" / "greedy_T16" / "per_example.jsonl")}
    assert len(recs) == N
    assert recs["q005"]["finish_reason"] == R.FINISH_ERROR and recs["q005"]["correct"] is False
    assert "boom" in recs["q005"]["error"]
    assert recs["q006"]["correct"] == greedy_right(6)  # its chunk mates were retried alone
    main = pd.read_csv(tmp_path / "tables" / "main_results_single.csv")
    assert main.loc[0, "n_errors"] == 1


def test_systematic_failure_stops_the_run_in_one_line(tmp_path, fakes):
    cfg = compose_cfg(["eval.methods=[greedy]"])  # default eval.max_error_rate = 0.02
    with pytest.raises(RunError) as e:
        ev.run(cfg, Run(tmp_path, cfg), engine=FakeEngine(fail_ids=range(N)))
    msg = str(e.value)
    assert "\n" not in msg and "eval greedy" in msg and f"{N} of {N}" in msg and "eval.max_error_rate" in msg
    assert "RuntimeError: boom on 0" in msg  # the first error message
    assert not (tmp_path / "tables" / "main_results_single.csv").exists()
    # the error records stay on disk (a rerun with a fixed backend has to regenerate them)
    assert len(read_jsonl(tmp_path / "eval" / "greedy_T16" / "per_example.jsonl")) == N


def test_high_truncation_warns_naming_the_key(tmp_path, fakes, caplog):
    cfg = compose_cfg(["eval.methods=[greedy,esm]"])
    with caplog.at_level("WARNING", logger="esm_steer.evaluate.eval"):
        ev.run(cfg, Run(make_artifacts(tmp_path / "a"), cfg), engine=FakeEngine(truncate_every=2))  # greedy 50%
    warns = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == ev.log.name]
    assert len(warns) == 1  # greedy only: the fake policy never truncates
    assert "eval greedy" in warns[0] and "50%" in warns[0] and "decode.max_new_tokens" in warns[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="esm_steer.evaluate.eval"):
        ev.run(cfg, Run(make_artifacts(tmp_path / "b"), cfg), engine=FakeEngine(truncate_every=7))  # 15%
    assert not [r for r in caplog.records if "decode.max_new_tokens" in r.getMessage()]


def test_missing_artifacts_is_one_line_naming_dir_and_command(tmp_path, fakes):
    cfg = compose_cfg()
    with pytest.raises(RunError) as e:
        ev.run(cfg, Run(tmp_path, cfg), engine=FakeEngine())
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "esm-mine" in msg
    # the hint for a greedy-only run names both keys (ablations also need artifacts)
    assert "'eval.methods=[greedy]' 'eval.ablations=[]'" in msg
    hint = compose_cfg(["eval.methods=[greedy]", "eval.ablations=[]", "experiment=debug"])
    ev.run(hint, Run(tmp_path / "greedy", hint), engine=FakeEngine())  # the hint works even on the debug preset


def test_greedy_needs_no_artifacts(tmp_path, fakes):
    cfg = compose_cfg(["eval.methods=[greedy]"])
    ev.run(cfg, Run(tmp_path, cfg), engine=FakeEngine())
    assert (tmp_path / "tables" / "main_results_single.csv").is_file()
    assert not (tmp_path / "tables" / "ablation.csv").exists()


def test_run_offline_if_missing_runs_the_stages_into_this_run(tmp_path, fakes, monkeypatch, caplog):
    ran = []

    def offline(cfg, run, engine=None):
        ran.append(run.dir)
        make_artifacts(run.dir)

    monkeypatch.setattr(pipelines, "run_offline", offline)
    cfg = compose_cfg(["eval.run_offline_if_missing=true", "eval.ablations=[no_memory]"])
    with caplog.at_level("INFO", logger="esm_steer"):
        pipelines.run_stage("eval", cfg, Run(tmp_path, cfg), engine=FakeEngine())  # as esm-eval runs it
    assert ran == [tmp_path]
    said = [r.getMessage() for r in caplog.records if "offline stages" in r.getMessage()]
    assert len(said) == 1  # one line: which stages, into which dir, and why
    assert "mine -> select -> memory" in said[0] and str(tmp_path) in said[0]
    assert "lacks library/ and memory/" in said[0] and "needed by esm, no_memory" in said[0]
    assert "eval.run_offline_if_missing=true" in said[0]
    caplog.clear()
    pipelines.run_stage("eval", cfg, Run(tmp_path, cfg), engine=FakeEngine())  # artifacts there: nothing runs
    assert ran == [tmp_path] and not [r for r in caplog.records if "offline stages" in r.getMessage()]


def test_debug_preset_runs_the_offline_stages_when_missing():
    cfg = compose_cfg(["experiment=debug"])
    assert cfg.eval.run_offline_if_missing is True


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
    monkeypatch.setattr(runtime, "build_engine", lambda cfg: pytest.fail("no engine needed"))
    ev.run(cfg, run)
    main = pd.read_csv(tmp_path / "tables" / "main_results_single.csv")
    assert len(main) == 2 and list(main["model"]) == ["fake", "fake"]


# ---------------------------------------------------------------- issue 13: variants, static, diagnostics, sweeps


def test_online_variant_labels_the_esm_row(tmp_path, fakes):
    cfg = compose_cfg(["online=no_memory", "eval.methods=[greedy,esm]"])
    assert cfg.online.variant == "no_memory" and ev.eval_methods(cfg) == ["greedy", "no_memory"]
    run = Run(make_artifacts(tmp_path), cfg)
    ev.run(cfg, run, engine=FakeEngine())
    main = pd.read_csv(run.dir / "tables" / "main_results_single.csv")
    assert list(main["method"]) == ["greedy", "no_memory"]
    d = sum(esm_right(i, "no_memory") for i in range(N)) / N - sum(map(greedy_right, range(N))) / N
    assert main.loc[1, "delta_vs_greedy"] == pytest.approx(d)  # the no_memory policy's answers
    assert (run.dir / "eval" / "no_memory_T16" / "per_example.jsonl").is_file()
    assert not (run.dir / "eval" / "esm_T16").exists()


def _tiny_library(engine, prompts, qs=(0.5, 0.3, 0.8), scale=0.3):
    from esm_steer.esm.library import Library, Tool
    from esm_steer.esm.memory_index import Memory, l2_normalise

    g = torch.Generator().manual_seed(0)
    last = torch.stack([h[-1] for h in engine.hidden_states(prompts)])
    norm = float(last.norm(dim=-1).mean())
    tools, keys, entries = [], [], []
    for i, q in enumerate(qs):
        v = torch.randn(engine.hidden_size, generator=g)
        states = last[i % len(prompts)][None] + 0.01 * norm * torch.randn(2, engine.hidden_size, generator=g)
        tools.append(Tool(f"t{i}", f"q{i}", 0, q, scale * norm * v / v.norm(), states.mean(0), states))
        for s in states:
            entries.append({"entry_id": len(entries), "tool_id": f"t{i}", "question_id": f"q{i}", "m": 0, "Q": q})
            keys.append(s.numpy())
    memory = Memory(l2_normalise(np.stack(keys)), entries, {"normalised": True})
    return Library(tools, {"hidden_size": engine.hidden_size}), memory


class _NoSearch:
    entries: list = []

    def search(self, queries, k):
        raise AssertionError("no_memory must not search the memory")


def test_online_no_memory_composes_to_the_no_memory_policy(lively_engine, three_prompts):
    cfg = compose_cfg(["online=no_memory", "control_points.segment_delimiter=er", "online.min_sim=-1"])
    library, _ = _tiny_library(lively_engine, three_prompts)
    label = ev.eval_methods(cfg)[1]
    cache = {"library": library, "memory": _NoSearch()}
    policy = methods.make_policy(lively_engine, None, cfg, label, cache)
    assert label == "no_memory" and policy.cfg.variant == "no_memory"
    generate, _ = methods.make_generator(label, lively_engine, cfg, None, cache)
    results = generate(three_prompts)
    steps = [s for r in results for s in r.steps]
    assert steps and all(s["retrieved"] == [] for s in steps)  # no retrieval
    top = [t for t, _ in sorted([("t0", 0.5), ("t1", 0.3), ("t2", 0.8)], key=lambda x: -x[1])][: int(cfg.online.L)]
    assert all([c["tool"] for c in s["candidates"][1:]] == top for s in steps if s["candidates"])  # the top-Q tools


def test_static_baseline_row_mean_budget_and_figures(tmp_path, fakes):
    cfg = compose_cfg(["eval.methods=[greedy,esm,static]", "eval.ablations=[no_memory]"])
    run = Run(make_artifacts(tmp_path), cfg)
    ev.run(cfg, run, engine=FakeEngine())
    main = pd.read_csv(run.dir / "tables" / "main_results_single.csv")
    assert list(main["method"]) == ["greedy", "esm", "static"] and "mean_budget" in TABLE_COLUMNS
    assert main.loc[1, "mean_budget"] == pytest.approx(4 + 8)  # kept + probe tokens
    assert main.loc[0, "mean_budget"] == pytest.approx(main.loc[0, "mean_tokens"])
    assert not pd.isna(main.loc[2, "delta_vs_greedy"])
    for f in ("acc_vs_budget_T16.png", "acc_vs_budget_T16.pdf", "steering_diagnostics_T16.png"):
        assert (run.dir / "figures" / f).stat().st_size > 1000, f
    diag = json.loads((run.dir / "tables" / "diagnostics_T16.json").read_text())["methods"]
    assert diag["greedy"]["differ_from_greedy"] is None
    # FakePolicy answers with token ids [1, 2, 3, 4]: every example differs from FakeEngine's range(n)
    assert diag["esm"]["differ_from_greedy"] == 1.0
    flips = sum(greedy_right(i) and not esm_right(i) for i in range(N))
    assert diag["esm"]["flips_greedy_right_to_wrong"] == flips
    assert diag["esm"]["flips_greedy_wrong_to_right"] == sum(not greedy_right(i) and esm_right(i) for i in range(N))
    flat = pd.read_csv(run.dir / "tables" / "diagnostics_T16.csv")
    cols = {"differ_from_greedy", "flips_greedy_right_to_wrong", "inject_ratio_median", "probe_logprob_gap_median"}
    assert cols <= set(flat.columns)


def _eval_on_lively(tmp_path, name, engine, prompts, overrides, monkeypatch):
    exs = EXAMPLES[: len(prompts)]
    monkeypatch.setattr(runtime, "load_examples", lambda cfg, split, max_examples="auto": list(exs))
    monkeypatch.setattr(runtime, "prompt_ids", lambda eng, cfg, e: [prompts[exs.index(x)] for x in e])
    library, memory = _tiny_library(engine, prompts)
    orig = methods.make_policy
    monkeypatch.setattr(
        methods,
        "make_policy",
        lambda eng, art, cfg, v, cache: orig(
            eng, art, cfg, v, cache.setdefault("library", library) and cache.setdefault("memory", memory) and cache
        ),
    )
    cfg = compose_cfg(
        [
            "mode=seed",  # the tiny library has no null anchors; steering from m = 0
            "decode.max_new_tokens=12",
            "control_points.segment_delimiter=er",
            "online.min_sim=-1",
            "online.probe_tokens=3",
            *overrides,
        ]
    )
    run = Run(make_artifacts(tmp_path / name), cfg)
    return ev.run(cfg, run, engine=engine), run


def test_large_k_scale_changes_the_tokens(tmp_path, lively_engine, three_prompts, monkeypatch):
    """Catches a silently disconnected steering path: a huge k_scale must change the tokens."""
    by, run = _eval_on_lively(tmp_path, "big", lively_engine, three_prompts, ["online.k_scale=1000"], monkeypatch)
    assert all(s["inject_norm"] > 0 for r in by["esm"] for s in r["steps"] if s["chosen"] is not None)
    assert [r["token_ids"] for r in by["esm"]] != [r["token_ids"] for r in by["greedy"]]
    diag = json.loads((run.dir / "tables" / "diagnostics_T12.json").read_text())["methods"]["esm"]
    assert diag["differ_from_greedy"] > 0 and diag["inject_ratio"]["median"] > 1
    by0, run0 = _eval_on_lively(tmp_path, "zero", lively_engine, three_prompts, ["online.k_scale=0"], monkeypatch)
    assert [r["token_ids"] for r in by0["esm"]] == [r["token_ids"] for r in by0["greedy"]]
    diag0 = json.loads((run0.dir / "tables" / "diagnostics_T12.json").read_text())["methods"]["esm"]
    assert diag0["differ_from_greedy"] == 0


def test_a_sweep_over_online_generates_greedy_once(tmp_path, fakes):
    art = make_artifacts(tmp_path / "art")
    engines = []
    for k in ("0.5", "2.0"):
        cfg = compose_cfg([f"eval.artifact_run_dir={art}", f"online.k_scale={k}"])
        engines.append(FakeEngine())
        ev.run(cfg, Run(tmp_path / f"job_k{k}", cfg), engine=engines[-1])
    assert engines[0].calls == N // 4 and engines[1].calls == 0  # FakePolicy never calls the engine
    shared = list((art / "eval").glob("greedy_test_T16_*"))
    assert len(shared) == 1 and len(read_jsonl(shared[0] / "per_example.jsonl")) == N
    a, b = (read_jsonl(tmp_path / f"job_k{k}" / "eval" / "greedy_T16" / "per_example.jsonl") for k in ("0.5", "2.0"))
    assert a == b and [r["id"] for r in a] == [e.id for e in EXAMPLES]
    meta = json.loads((tmp_path / "job_k2.0" / "eval" / "greedy_T16" / "meta.json").read_text())
    assert meta["shared_greedy_dir"] == str(shared[0])


def _suite_job(sweep: Path, num: int, overrides: list[str], rows: list[tuple[str, float, float]], split="val"):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    cfg = f"eval:\n  split: {split}\nonline:\n  variant: esm\nstage:\n  name: eval\n"
    (d / ".hydra" / "config.yaml").write_text(cfg)
    (d / "tables").mkdir()
    pd.DataFrame(
        [
            {
                "dataset": "arith",
                "model": "m",
                "method": m,
                "T_max": 16,
                "n": 100,
                "accuracy": acc,
                "ci_low": acc - 0.1,
                "ci_high": acc + 0.1,
                "delta_vs_greedy": dl,
                "delta_ci_low": dl - 0.05,
                "delta_ci_high": dl + 0.05,
            }
            for m, acc, dl in rows
        ]
    ).to_csv(d / "tables" / "main_results_single.csv")
    return d


def _suite(tmp_path) -> Path:
    sweep = tmp_path / "_suite" / "tune"
    ov = lambda k: [f"online.k_scale={k}", "eval.split=val", "outputs.suite_id=tune"]  # noqa: E731
    _suite_job(sweep, 0, ov(0.5), [("greedy", 0.4, float("nan")), ("esm", 0.42, 0.02)])
    _suite_job(sweep, 1, ov(2.0), [("greedy", 0.4, float("nan")), ("esm", 0.47, 0.07)])
    _suite_job(sweep, 2, ov(4.0), [("greedy", 0.4, float("nan")), ("esm", 0.47, 0.07 - 0.001)])
    (sweep / "3" / ".hydra").mkdir(parents=True)
    (sweep / "3" / "error.txt").write_text("boom\n")  # failed: not ranked
    return sweep


def test_suite_ranking_orders_configurations_by_esm_accuracy(tmp_path):
    from esm_steer.evaluate import suite

    sweep = _suite(tmp_path)
    suite.aggregate_suite(sweep, figure=False)
    rk = pd.read_csv(sweep / "tables" / "suite_ranking.csv")
    assert list(rk["rank"]) == [1, 2, 3]
    assert list(rk["job_num"]) == [1, 2, 0]  # 0.47 (Δ low 0.02) before 0.47 (Δ low 0.019) before 0.42
    assert list(rk["online.k_scale"]) == [2.0, 4.0, 0.5] and set(rk["split"]) == {"val"}
    assert list(rk["greedy_accuracy"]) == [0.4] * 3 and rk.loc[0, "delta_ci_low"] == pytest.approx(0.02)


def test_best_of_overrides_keep_the_job_and_force_test():
    job = [
        "experiment=debug",
        "online.k_scale=2.0",
        "eval.split=val",
        "outputs.suite_id='tune'",
        "hydra/launcher=gpu_pool",
        "launch.gpus='0,1'",
        "+online.extra=1",
    ]
    cur = [
        "eval.best_of=outputs/_suite/tune",
        "eval.methods=[greedy,esm,static]",
        "online.k_scale=3",
        "outputs.run_id=x",
    ]
    assert best_of.best_of_overrides(job, cur) == [
        "experiment=debug",
        "+online.extra=1",
        "eval.methods=[greedy,esm,static]",
        "online.k_scale=3",
        "eval.split=test",
    ]
    assert best_of.best_of_overrides(job, [])[1:] == ["online.k_scale=2.0", "+online.extra=1", "eval.split=test"]


def test_best_of_runs_the_winner_once_on_test(tmp_path, fakes):
    sweep = _suite(tmp_path)
    cfg = compose_cfg([f"eval.best_of={sweep}"])
    run = Run(make_artifacts(tmp_path / "best"), cfg)
    ev.run(cfg, run, engine=FakeEngine())
    info = json.loads((run.dir / "best_of.json").read_text())
    assert info["job_num"] == 1 and info["ranked_on_split"] == "val" and info["accuracy"] == pytest.approx(0.47)
    assert info["overrides"] == ["online.k_scale=2.0", "eval.split=test"]
    assert run.cfg.online.k_scale == 2.0 and run.cfg.eval.split == "test" and run.cfg.eval.best_of is None
    assert json.loads((run.dir / "config_resolved.json").read_text())["online"]["k_scale"] == 2.0
    assert (run.dir / "tables" / "main_results_single.csv").is_file()
    sweep2 = tmp_path / "_suite" / "on_test"  # ranked on test: refused
    _suite_job(sweep2, 0, ["online.k_scale=1"], [("esm", 0.5, 0.0)], split="test")
    with pytest.raises(RunError, match="ranked on the test split"):
        ev.run(compose_cfg([f"eval.best_of={sweep2}"]), Run(tmp_path / "b2", cfg), engine=FakeEngine())
