"""token-2048 pipeline: schemas, selection, continuation prompts, finished prefixes,
resume after a kill, sharding, refusal while shards are missing.

A FakeEngine (deterministic text from the prompt seed) where a test needs control; the tiny
random HF engine for the real-path tests (token ids, greedy sharding equality, EOS)."""

from __future__ import annotations

import json
import random

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from esm_steer.config import ESMConfig
from esm_steer.engine.base import FINISH_LENGTH, FINISH_STOP, Sample
from esm_steer.runs import Run, RunError
from esm_steer.token2048 import pipeline, schema
from esm_steer.token2048.select import best_per_question

torch.set_num_threads(1)

SMALL = dict(n_questions=4, n_prefix=2, prefix_tokens=8, n_cont=3, max_new_tokens=12, questions_per_shard=1)


def make_cfg(stage="all", **t2048):
    cfg = OmegaConf.structured(ESMConfig)
    cfg.task.dataset = "arith"
    cfg.prompt.template = "arith_3shot"
    cfg.model.batch_size = 64
    cfg.stage.name = stage
    for k, v in {**SMALL, **t2048}.items():
        cfg.token2048[k] = v
    return cfg


def run_stage(tmp_path, engine, stage="all", **t2048):
    cfg = make_cfg(stage, **t2048)
    return pipeline.run(cfg, Run(dir=tmp_path, cfg=cfg), engine=engine)


def out_dir(tmp_path):
    return tmp_path / "token2048"


def read(tmp_path, name):
    return pq.read_table(out_dir(tmp_path) / name).to_pandas()


class Killed(KeyboardInterrupt):
    """What a kill looks like to the stage: not an Exception, so not recorded as an error."""


class FakeEngine:
    """Deterministic samples from (prompt seed, j). ``finish(seed, j)`` -> this prefix stops
    early; ``fail(seed)`` -> generate raises for that prompt; ``kill_after`` continue calls
    -> Killed. Records every call."""

    def __init__(self, tokenizer, finish=None, fail=None, kill_after=None):
        self.tokenizer = tokenizer
        self.finish, self.fail, self.kill_after = finish, fail, kill_after
        self.calls: list[dict] = []

    def continue_calls(self):
        return [c for c in self.calls if c["kind"] == "continue"]

    def generate(self, prompts, spec, prompt_seeds=None):
        kind = "sample" if spec.max_new_tokens == SMALL["prefix_tokens"] else "continue"
        if kind == "continue" and self.kill_after is not None and len(self.continue_calls()) >= self.kill_after:
            raise Killed()
        prompts = [list(p) for p in prompts]
        self.calls.append({"kind": kind, "prompts": prompts, "seeds": list(prompt_seeds), "n": spec.n})
        if self.fail and any(self.fail(s) for s in prompt_seeds):
            raise RuntimeError("CUDA error: device-side assert (fake)")
        out = []
        for p, s in zip(prompts, prompt_seeds):
            samples = []
            for j in range(spec.n):
                rng = random.Random(f"{s}-{j}")
                if kind == "sample" and self.finish and self.finish(s, j):
                    text, reason = f"The answer is {rng.randint(0, 20)}.", FINISH_STOP
                elif kind == "sample":
                    text = " ".join(rng.choice(["First", "we", "add", "3", "and", "then"]) for _ in range(40))
                    reason = FINISH_LENGTH
                else:
                    text, reason = f" so the total is. The answer is {rng.randint(0, 20)}.", FINISH_STOP
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: spec.max_new_tokens]
                if len(ids) == spec.max_new_tokens:
                    reason = FINISH_LENGTH
                samples.append(Sample(ids, self.tokenizer.decode(ids), [0.0] * len(ids), reason, len(p)))
            out.append(samples)
        return out

    def close(self):
        pass


@pytest.fixture
def hf_engine(tokenizer, tiny_model):
    from esm_steer.engine.hf import HFEngine

    return HFEngine(tiny_model, tokenizer, batch_size=64)


# ---------------------------------------------------------------- schemas, counts, selection


def test_schemas_row_counts_and_summary(tmp_path, tokenizer):
    summary = run_stage(tmp_path, FakeEngine(tokenizer))
    q, p, c = SMALL["n_questions"], SMALL["n_prefix"], SMALL["n_cont"]
    for name, rows in [(schema.STAGE1, q * p), (schema.STAGE2, q * p), (schema.STAGE3, q * p * c), (schema.FINAL, q)]:
        sch = pq.read_schema(out_dir(tmp_path) / name)
        assert pq.read_metadata(out_dir(tmp_path) / name).num_rows == rows, name
        assert sch.names[: len(schema.SEED_COLUMNS.get(name, []))] == schema.SEED_COLUMNS.get(name, []), name
        for col in schema.SEED_COLUMNS.get(name, []):
            assert sch.field(col).type == schema.SCHEMAS[name].field(col).type
    s3 = read(tmp_path, schema.STAGE3)
    assert not s3.duplicated(["question_id", "sample_id", "continuation_id"]).any()
    assert sorted(s3["continuation_id"].unique()) == list(range(c))
    final = read(tmp_path, schema.FINAL)
    for _, r in final.iterrows():
        accs = list(r["all_accs"])
        assert len(accs) == p and r["best_acc"] == max(accs)
        assert r["best_sample_id"] == accs.index(max(accs))  # lowest sample id among ties
        grp = s3[(s3.question_id == r["question_id"]) & (s3.sample_id == r["best_sample_id"])]
        assert grp["is_correct"].mean() == pytest.approx(r["best_acc"])
        assert r["best_token_2048"] == grp["token_2048"].iloc[0]
    on_disk = json.loads((out_dir(tmp_path) / schema.SUMMARY).read_text())
    assert on_disk == summary
    assert summary["gap_best_minus_mean"] == pytest.approx(summary["mean_best_acc"] - summary["mean_all_acc"])
    assert (out_dir(tmp_path) / schema.PLOT).stat().st_size > 1000


def test_best_ties_go_to_lowest_sample_id():
    stage2 = pd.DataFrame(
        [
            {
                "question_id": q,
                "sample_id": s,
                "question": f"q{q}",
                "ground_truth": "1",
                "token_2048": f"t{q}{s}",
                "prefix_finished": False,
            }
            for q in range(2)
            for s in range(3)
        ]
    )
    correct = {(0, 0): [1, 0], (0, 1): [0, 1], (0, 2): [0, 0], (1, 0): [0, 0], (1, 1): [1, 1], (1, 2): [1, 1]}
    stage3 = pd.DataFrame(
        [
            {"question_id": q, "sample_id": s, "continuation_id": k, "is_correct": bool(v), "error": None}
            for (q, s), vs in correct.items()
            for k, v in enumerate(vs)
        ]
    )
    final = best_per_question(stage2, stage3).set_index("question_id")
    assert final.loc[0, "best_sample_id"] == 0 and final.loc[0, "all_accs"] == [0.5, 0.5, 0.0]
    assert final.loc[1, "best_sample_id"] == 1 and final.loc[1, "best_acc"] == 1.0
    assert final.loc[1, "best_token_2048"] == "t11"


# ---------------------------------------------------------------- continuation prompts (real engine)


def test_continuation_prompts_are_prompt_plus_prefix_ids(tmp_path, tokenizer, hf_engine):
    from esm_steer.data.prompts import build_messages
    from esm_steer.data.tasks import load_task
    from esm_steer.engine.base import chat_prompt_ids

    run_stage(tmp_path, hf_engine, stage="sample", temperature=1.0)
    run_stage(tmp_path, hf_engine, stage="prepare")
    s1 = read(tmp_path, schema.STAGE1).sort_values(["question_id", "sample_id"])
    s2 = read(tmp_path, schema.STAGE2).sort_values(["question_id", "sample_id"])
    examples = load_task("arith", "train", max_examples=SMALL["n_questions"], seed=0)
    eot = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    for (_, a), (_, b) in zip(s1.iterrows(), s2.iterrows()):
        prompt = chat_prompt_ids(tokenizer, build_messages("arith_3shot", examples[a["question_id"]]))
        assert list(a["prompt_ids"]) == prompt
        ids = list(b["continuation_prompt_ids"])
        assert ids[: len(prompt)] == prompt and b["num_prompt_tokens"] == len(prompt)
        if not a["prefix_finished"]:
            assert ids == prompt + list(a["prefix_ids"]) and len(a["prefix_ids"]) == SMALL["prefix_tokens"]
        assert ids[-1] not in eot
        assert not b["continuation_prompt"].rstrip().endswith("<|im_end|>")
        assert b["continuation_prompt"].endswith(tokenizer.decode(list(a["prefix_ids"]), skip_special_tokens=False))


# ---------------------------------------------------------------- finished prefixes, failures


def test_finished_prefix_is_continued_by_default(tmp_path, tokenizer):
    eng = FakeEngine(tokenizer, finish=lambda seed, j: j == 1)  # sample 1 of every question stops early
    run_stage(tmp_path, eng)
    s1 = read(tmp_path, schema.STAGE1)
    assert s1.loc[s1.sample_id == 1, "prefix_finished"].all() and not s1.loc[s1.sample_id == 0, "prefix_finished"].any()
    continued = [p for c in eng.continue_calls() for p in c["prompts"]]
    s2 = read(tmp_path, schema.STAGE2)
    assert len(continued) == SMALL["n_questions"] * SMALL["n_prefix"]  # finished prefixes too
    assert sorted(map(list, s2["continuation_prompt_ids"])) == sorted(continued)
    eot = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    assert not any(p[-1] in eot for p in continued)  # the closed turn is open again
    s3 = read(tmp_path, schema.STAGE3)
    done = s3[s3.sample_id == 1]
    assert len(done) == SMALL["n_questions"] * SMALL["n_cont"]
    assert done["prefix_finished"].all() and not s3.loc[s3.sample_id == 0, "prefix_finished"].any()
    assert (done["continuation"] != "").all() and (done["num_continuation_tokens"] > 0).all()
    assert (done["finish_reason"] != "prefix_finished").all() and done["error"].isna().all()
    assert all(f.startswith(t) and len(f) > len(t) for f, t in zip(done["full_rollout"], done["token_2048"]))


def test_finished_prefix_graded_as_is_when_continue_finished_false(tmp_path, tokenizer):
    eng = FakeEngine(tokenizer, finish=lambda seed, j: j == 1)
    run_stage(tmp_path / "old", eng, continue_finished=False)
    continued = [p for c in eng.continue_calls() for p in c["prompts"]]
    assert len(continued) == SMALL["n_questions"]  # only the unfinished prefix of each question
    s2 = read(tmp_path / "old", schema.STAGE2)
    assert sorted(map(list, s2.loc[~s2.prefix_finished, "continuation_prompt_ids"])) == sorted(continued)
    s3 = read(tmp_path / "old", schema.STAGE3)
    done = s3[s3.sample_id == 1]
    assert len(done) == SMALL["n_questions"] * SMALL["n_cont"]
    assert done["prefix_finished"].all() and (done["continuation"] == "").all()
    assert (done["full_rollout"] == done["token_2048"]).all() and (done["finish_reason"] == "prefix_finished").all()
    # graded as is: same verdict for all n_cont rows of a finished prefix
    assert (done.groupby("question_id")["is_correct"].nunique() == 1).all()
    # both settings write the same stage-3 schema
    run_stage(tmp_path / "new", FakeEngine(tokenizer, finish=lambda seed, j: j == 1))
    old, new = (pq.read_schema(out_dir(tmp_path / d) / schema.STAGE3).remove_metadata() for d in ("old", "new"))
    assert old == new


@pytest.mark.parametrize("continue_finished", [True, False])
@pytest.mark.parametrize("grader,pred", [("auto", None), ("math_dapo", "[INVALID]")])
def test_eos_biased_model_finishes_every_prefix(tmp_path, tokenizer, hf_engine, continue_finished, grader, pred):
    eos = tokenizer.eos_token_id
    hook = hf_engine.model.lm_head.register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor([eos]), 1e4))
    calls = []
    orig = hf_engine.generate

    def counting(prompts, spec, seeds=None):
        calls.append(spec.max_new_tokens)
        return orig(prompts, spec, seeds)

    hf_engine.generate = counting
    try:
        run_stage(tmp_path, hf_engine, continue_finished=continue_finished, grader=grader)
    finally:
        hook.remove()
        hf_engine.generate = orig
    assert read(tmp_path, schema.STAGE1)["prefix_finished"].all()
    sample_calls = [SMALL["prefix_tokens"]] * SMALL["n_questions"]  # one call per chunk
    assert calls == sample_calls + ([SMALL["max_new_tokens"]] * SMALL["n_questions"] if continue_finished else [])
    s3 = read(tmp_path, schema.STAGE3)
    assert len(s3) == SMALL["n_questions"] * SMALL["n_prefix"] * SMALL["n_cont"]
    # empty generations are wrong answers, not errors (verl's math_dapo: -1, pred "[INVALID]")
    assert s3["error"].isna().all() and not s3["is_correct"].any() and s3["prefix_finished"].all()
    assert (s3["full_rollout"] == "").all()
    assert s3["pred"].isna().all() if pred is None else (s3["pred"] == pred).all()
    assert read(tmp_path, schema.FINAL)["num_errors"].sum() == 0


def test_empty_generation_is_wrong_not_an_error():
    from esm_steer.data.grading import compute_score_dapo
    from esm_steer.runtime import grade

    assert compute_score_dapo("", "12") == {"score": -1.0, "acc": False, "pred": "[INVALID]"}
    assert grade("", "12", "math_dapo") == (False, "[INVALID]", None)
    assert grade("  \n", "12", "math_dapo") == (False, "[INVALID]", None)
    for kind in ("arith", "gsm8k", "math500", "arc-c", "strategyqa"):
        assert grade("", "12", kind) == (False, None, None), kind
    assert grade("So 5 + 7 = 12.\nAnswer: 12", "12", "math_dapo") == (True, "12", None)


def test_failed_generation_is_recorded_and_run_goes_on(tmp_path, tokenizer):
    first = {}

    def fail(seed):  # the first continuation prompt ever seen fails, always
        first.setdefault("seed", seed)
        return seed == first["seed"]

    eng = FakeEngine(tokenizer)
    run_stage(tmp_path, eng, stage="sample")
    run_stage(tmp_path, eng, stage="prepare")
    eng.fail = fail
    run_stage(tmp_path, eng, stage="continue")
    run_stage(tmp_path, eng, stage="select")
    s3 = read(tmp_path, schema.STAGE3)
    bad = s3[s3["error"].notna()]
    assert len(bad) == SMALL["n_cont"] and not bad["is_correct"].any()
    assert bad["error"].str.contains("generate failed").all()
    assert len(s3) == SMALL["n_questions"] * SMALL["n_prefix"] * SMALL["n_cont"]
    assert read(tmp_path, schema.FINAL)["num_errors"].sum() == SMALL["n_cont"]


# ---------------------------------------------------------------- resume, shards


def test_killed_continue_resumes_without_recomputing(tmp_path, tokenizer):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_stage(ref_dir, FakeEngine(tokenizer))

    eng = FakeEngine(tokenizer)
    run_stage(run_dir, eng, stage="sample")
    run_stage(run_dir, eng, stage="prepare")
    killer = FakeEngine(tokenizer, kill_after=2)  # one continue call per chunk here
    with pytest.raises(Killed):
        run_stage(run_dir, killer, stage="continue")
    parts = sorted(p.name for p in (out_dir(run_dir) / schema.STAGE3_PARTS).glob("*.parquet"))
    assert parts == ["part-00000-of-00004.parquet", "part-00001-of-00004.parquet"]
    assert not list((out_dir(run_dir) / schema.STAGE3_PARTS).glob(".*"))  # no temp leftovers

    again = FakeEngine(tokenizer)
    run_stage(run_dir, again, stage="all")  # sample / prepare skipped, continue resumes
    assert [c["kind"] for c in again.calls] == ["continue", "continue"]
    assert len([p for c in again.calls for p in c["prompts"]]) == 2 * SMALL["n_prefix"]
    got, ref = read(run_dir, schema.STAGE3), read(ref_dir, schema.STAGE3)
    assert not got.duplicated(["question_id", "sample_id", "continuation_id"]).any()
    pd.testing.assert_frame_equal(got, ref)
    pd.testing.assert_frame_equal(read(run_dir, schema.FINAL), read(ref_dir, schema.FINAL))


def test_sharded_runs_merged_equal_unsharded_greedy(tmp_path, hf_engine):
    one, two = tmp_path / "one", tmp_path / "two"
    greedy = dict(temperature=0.0, questions_per_shard=1)
    run_stage(one, hf_engine, **greedy)
    run_stage(two, hf_engine, stage="sample", **greedy)
    run_stage(two, hf_engine, stage="prepare", **greedy)
    run_stage(two, hf_engine, stage="continue", shard_index=1, num_shards=2, **greedy)
    with pytest.raises(RunError, match=r"2 of 4 parts missing.*part-00000-of-00004.*part-00002-of-00004"):
        run_stage(two, hf_engine, stage="select", num_shards=2, **greedy)
    assert not (out_dir(two) / schema.STAGE3).exists()
    run_stage(two, hf_engine, stage="all", shard_index=0, num_shards=2, **greedy)  # last shard merges + selects
    for name in (schema.STAGE1, schema.STAGE2, schema.STAGE3, schema.FINAL):
        pd.testing.assert_frame_equal(read(one, name), read(two, name), obj=name)


def test_sampled_prefixes_are_seeded_per_question(tmp_path, tokenizer):
    """Same seed -> same prefixes whatever the chunking; another seed -> others."""
    a, b, c = FakeEngine(tokenizer), FakeEngine(tokenizer), FakeEngine(tokenizer)
    run_stage(tmp_path / "a", a, stage="sample", questions_per_shard=1)
    run_stage(tmp_path / "b", b, stage="sample", questions_per_shard=3)
    cfg = make_cfg("sample")
    cfg.seed = 1
    pipeline.run(cfg, Run(dir=tmp_path / "c", cfg=cfg), engine=c)
    pd.testing.assert_frame_equal(read(tmp_path / "a", schema.STAGE1), read(tmp_path / "b", schema.STAGE1))
    a_text, c_text = (read(tmp_path / d, schema.STAGE1)["token_2048"] for d in ("a", "c"))
    assert not a_text.equals(c_text)


def test_other_config_refused_on_resume(tmp_path, tokenizer):
    run_stage(tmp_path, FakeEngine(tokenizer), stage="sample")
    with pytest.raises(RunError, match=r"made with other settings \(token2048.n_prefix: 2 -> 3\)"):
        run_stage(tmp_path, FakeEngine(tokenizer), stage="sample", n_prefix=3)
    run_stage(tmp_path, FakeEngine(tokenizer), stage="prepare")
    run_stage(tmp_path, FakeEngine(tokenizer), stage="continue")
    with pytest.raises(RunError, match="another chunking"):
        run_stage(tmp_path, FakeEngine(tokenizer), stage="continue", questions_per_shard=2)


def test_shard_jobs_share_files_through_run_dir(tmp_path, tokenizer):
    """A multirun shard job has its own job dir; token2048.run_dir points it at the run's files."""
    shared, job0, job1 = tmp_path / "run", tmp_path / "job0", tmp_path / "job1"
    run_stage(shared, FakeEngine(tokenizer), stage="sample")
    run_stage(shared, FakeEngine(tokenizer), stage="prepare")
    for i, job in enumerate((job0, job1)):
        job.mkdir()
        run_stage(job, FakeEngine(tokenizer), stage="continue", shard_index=i, num_shards=2, run_dir=str(shared))
        assert not (job / "token2048").exists()
    summary = run_stage(shared, FakeEngine(tokenizer), stage="select", num_shards=2)
    assert summary is not None
    unsharded = tmp_path / "one"
    run_stage(unsharded, FakeEngine(tokenizer))
    pd.testing.assert_frame_equal(read(shared, schema.FINAL), read(unsharded, schema.FINAL))


# ---------------------------------------------------------------- stage 1 sharded


def test_sharded_stage1_equals_unsharded(tmp_path, hf_engine):
    """Shard 1 then shard 0 of stage 1 into one run dir: the same rows as one process; prepare
    refuses while a shard's parts are missing; each shard generates only its own chunks."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_stage(one, hf_engine, stage="sample")  # temperature 1.0: seeded per question
    calls = []
    orig = hf_engine.generate
    hf_engine.generate = lambda prompts, spec, seeds=None: calls.append(list(seeds)) or orig(prompts, spec, seeds)
    try:
        run_stage(two, hf_engine, stage="sample", shard_index=1, num_shards=2)
        parts = sorted(p.name for p in (out_dir(two) / schema.STAGE1_PARTS).glob("*.parquet"))
        assert parts == ["part-00001-of-00004.parquet", "part-00003-of-00004.parquet"]
        assert len(calls) == 2 and not (out_dir(two) / schema.STAGE1).exists()
        with pytest.raises(
            RunError,
            match=r"prepare: 2 of 4 parts missing.*part-00000-of-00004.*part-00002-of-00004.*"
            r"stage=sample for token2048.shard_index in \[0\] \(num_shards=2\)",
        ):
            run_stage(two, hf_engine, stage="prepare", num_shards=2)
        assert not (out_dir(two) / schema.STAGE2).exists()
        run_stage(two, hf_engine, stage="sample", shard_index=0, num_shards=2)  # the last shard merges
        assert len(calls) == 4 and len({s for c in calls for s in c}) == SMALL["n_questions"]  # no chunk twice
    finally:
        hf_engine.generate = orig
    pd.testing.assert_frame_equal(read(one, schema.STAGE1), read(two, schema.STAGE1))
    run_stage(one, hf_engine, stage="prepare")
    run_stage(two, hf_engine, stage="prepare")
    pd.testing.assert_frame_equal(read(one, schema.STAGE2), read(two, schema.STAGE2))


def test_prepare_merges_stage1_parts_left_unmerged(tmp_path, tokenizer):
    run_stage(tmp_path, FakeEngine(tokenizer), stage="sample")
    ref = read(tmp_path, schema.STAGE1)
    (out_dir(tmp_path) / schema.STAGE1).unlink()  # as if the last shard died before its merge
    run_stage(tmp_path, FakeEngine(tokenizer), stage="prepare")
    pd.testing.assert_frame_equal(read(tmp_path, schema.STAGE1), ref)
    assert len(read(tmp_path, schema.STAGE2)) == len(ref)


def test_stage_all_shards_share_stage1(tmp_path, tokenizer):
    """stage=all per shard: stage 1 sharded, then continue sharded; the last one selects."""
    shared, ref = tmp_path / "run", tmp_path / "one"
    first = FakeEngine(tokenizer)
    assert run_stage(shared, first, stage="all", shard_index=1, num_shards=2) is None
    assert {c["kind"] for c in first.calls} == {"sample"} and not (out_dir(shared) / schema.STAGE2).exists()
    assert run_stage(shared, FakeEngine(tokenizer), stage="all", shard_index=0, num_shards=2) is None
    assert (out_dir(shared) / schema.STAGE2).exists() and not (out_dir(shared) / schema.STAGE3).exists()
    again = FakeEngine(tokenizer)
    summary = run_stage(shared, again, stage="all", shard_index=1, num_shards=2)
    assert summary is not None and {c["kind"] for c in again.calls} == {"continue"}
    run_stage(ref, FakeEngine(tokenizer))
    for name in (schema.STAGE1, schema.STAGE3, schema.FINAL):
        pd.testing.assert_frame_equal(read(shared, name), read(ref, name), obj=name)


# ---------------------------------------------------------------- token2048.data_path (verl parquet)


def _verl_row(i: int, problem: str, gold) -> dict:
    from esm_steer.data.rows import DAPO_PREFIX, DAPO_SUFFIX

    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_PREFIX + problem + DAPO_SUFFIX}],
        "ability": "MATH",
        "reward_model": {"ground_truth": gold, "style": "rule-lark"},
        "extra_info": {"index": f"uuid-{i}"},
    }


def test_data_path_reads_verl_parquet(tmp_path, tokenizer, caplog):
    import pyarrow as pa

    problems = [f"What is {a} + {a + 1}?" for a in range(6)]
    rows = [_verl_row(i, p, str(2 * i + 1)) for i, p in enumerate(problems)]
    rows += [_verl_row(90, problems[2], "5"), _verl_row(91, "What is 7 + 8?", "")]  # a duplicate, no ground truth
    path = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)

    eng = FakeEngine(tokenizer)
    with caplog.at_level("INFO"):
        run_stage(tmp_path / "run", eng, stage="sample", data_path=str(path))
    assert "loaded 6, skipped 2 (duplicate question: 1, missing ground_truth: 1)" in caplog.text
    s1 = read(tmp_path / "run", schema.STAGE1)
    assert len(s1) == SMALL["n_questions"] * SMALL["n_prefix"]
    for _, r in s1.iterrows():
        i = problems.index(r["question"])  # the bare problem, the DAPO instruction stripped
        assert r["ground_truth"] == str(2 * i + 1) and r["example_id"] == f"uuid-{i}"
    assert schema.read_meta(out_dir(tmp_path / "run") / schema.STAGE1)["token2048.data_path"] == str(path)
    with pytest.raises(RunError, match="token2048.data_path"):  # another source: refused on resume
        run_stage(tmp_path / "run", eng, stage="sample")


@pytest.mark.parametrize("content,needle", [(None, "no such file"), (b"PAR1 not really", "cannot read it")])
def test_data_path_bad_file_is_one_line(tmp_path, tokenizer, content, needle):
    from esm_steer.config import ConfigError

    path = tmp_path / "train.parquet"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"token2048.data_path={path}: {needle}") as e:
        run_stage(tmp_path / "run", FakeEngine(tokenizer), stage="sample", data_path=str(path))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the seed's preset


def test_token2048_dapo_preset_has_the_seeds_settings():
    from hydra import compose, initialize_config_module

    import esm_steer.cli  # noqa: F401 - registers the schema
    from esm_steer.config import validate

    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        cfg = compose(config_name="token2048", overrides=["experiment=token2048_dapo"])
    validate(cfg)
    assert cfg.model.name_or_path == "Qwen/Qwen3-4B-Instruct-2507" and cfg.model.backend == "vllm"
    assert cfg.task.dataset == "dapo_math" and cfg.prompt.template == "dapo" and cfg.stage.name == "all"
    t = cfg.token2048
    assert (t.n_questions, t.n_prefix, t.prefix_tokens, t.n_cont, t.max_new_tokens) == (1000, 8, 2048, 100, 4096)
    assert (t.temperature, t.top_p, t.grader) == (1.0, 1.0, "math_dapo")
    assert t.continue_finished is True and t.data_path is None and cfg.outputs.run_name == "token2048_dapo"
    assert cfg.model.max_model_len >= 2048 + 4096  # prompt + prefix + continuation fit
