"""Honest splits: every task's mining / val / test questions are disjoint, the carve is seeded
and recorded, eval.split picks val, and eval refuses artifacts mined on its questions.

Fixture files are written by the tests in each dataset's real format (no shared data)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import esm_steer.cli  # noqa: F401 - registers the schema and resolvers
from esm_steer import runtime
from esm_steer.config import ConfigError, validate
from esm_steer.data.arith import generate
from esm_steer.data.rows import DAPO_PREFIX, DAPO_SUFFIX
from esm_steer.data.tasks import TASKS, load_split
from esm_steer.esm import mine as mine_stage
from esm_steer.evaluate import eval as ev
from esm_steer.evaluate import records as R
from esm_steer.runs import Run, RunError
from esm_steer.splits import carve_source, check_no_overlap, normalise_question, question_hash

TASK_DIR = Path(__file__).resolve().parents[1] / "src" / "esm_steer" / "conf" / "task"


def compose_cfg(overrides=(), entry: str = "eval"):
    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        return compose(config_name=entry, overrides=list(overrides))


# ---------------------------------------------------------------- fixture rows per format


def row(task: str, i: int, q: str) -> dict:
    """A row of ``task``'s real file format whose question text is ``q``."""
    if task == "gsm8k":
        return {"question": q, "answer": f"So {i}.\n#### {i}"}
    if task == "svamp":
        body, _, tail = q.rpartition(" ")
        return {"ID": f"chal-{i}", "Body": body, "Question": tail, "Equation": "( 1.0 )", "Answer": float(i)}
    if task == "arc-c":
        return {
            "id": f"ARC_{i}",
            "question": q,
            "choices": {"text": ["a", "b", "c", "d"], "label": list("ABCD")},
            "answerKey": "ABCD"[i % 4],
        }
    if task in ("math500", "math"):
        return {"problem": q, "solution": f"So $\\boxed{{{i}}}$.", "answer": str(i), "unique_id": f"test/x/{i}.json"}
    if task == "aime_2024":
        return {"id": i, "problem": q, "answer": f"{i:03d}"}
    if task == "strategyqa":
        return {"qid": f"qid{i}", "question": q, "answer": i % 2 == 0, "facts": ["A fact."]}
    if task == "dapo_math":
        return {
            "prompt": [{"role": "user", "content": DAPO_PREFIX + q + DAPO_SUFFIX}],
            "reward_model": {"ground_truth": str(i)},
            "extra_info": {"index": f"d{i}"},
        }
    raise AssertionError(task)


def write_rows(root: Path, task: str, split: str, questions: list[str], start: int = 0) -> list[str]:
    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    rows = [row(task, start + i, q) for i, q in enumerate(questions)]
    (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return questions


def question_texts(task: str, split: str, n: int) -> list[str]:
    return [f"Problem {split} number {i} of {task}: how many apples are left?" for i in range(n)]


ROLES = ("train_split", "val_split", "eval_split")
ROWS = 300  # per fixture file: dapo_math's 10% val share still holds ~30


def test_every_registered_task_has_a_task_yaml():
    assert {p.stem for p in TASK_DIR.glob("*.yaml")} >= set(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_three_splits_disjoint_and_covering(task, tmp_path):
    """Mining, val and test of every task never share a (normalised) question; a carved source
    is shared out whole; an official test file stays exactly as it is."""
    cfg = compose_cfg([f"task={task}", f"task.data_root={tmp_path}", "task.num_synthetic=150"])
    splits = {role: cfg.task[role] for role in ROLES}
    assert len(set(splits.values())) == 3
    carve = OmegaConf.to_container(cfg.task.carve) if cfg.task.carve else None
    sources = {role: carve_source(carve, s)[0] for role, s in splits.items()}
    if task == "arith":
        assert carve is None and set(splits.values()) == {"train", "val", "test"}
    files: dict[str, list[str]] = {}
    for src in sorted(set(sources.values())) if task != "arith" else []:
        files[src] = write_rows(tmp_path, task, src, question_texts(task, src, ROWS))
    own_test = task != "arith" and sources["eval_split"] not in (sources["train_split"], sources["val_split"])
    if own_test:  # two questions of the test file also sit in the train file, spelt differently
        shared = files[sources["eval_split"]][:2]
        files[sources["train_split"]] = write_rows(
            tmp_path, task, sources["train_split"], files[sources["train_split"]] + [s.upper() + "  " for s in shared]
        )

    got = {role: runtime.load_split(cfg, s) for role, s in splits.items()}
    hashes = {role: {question_hash(e.question) for e in ex} for role, (ex, _) in got.items()}
    for a, b in (("train_split", "val_split"), ("train_split", "eval_split"), ("val_split", "eval_split")):
        assert not hashes[a] & hashes[b], (task, a, b)
    sizes = {role: len(ex) for role, (ex, _) in got.items()}
    assert min(sizes.values()) >= 10, sizes

    if task == "arith":
        assert sizes == {role: 150 for role in ROLES}
        return
    for src, qs in files.items():  # every usable source question lands in exactly one split
        mine = [r for r in ROLES if sources[r] == src]
        union = set().union(*(hashes[r] for r in mine))
        in_test = hashes["eval_split"] if "eval_split" not in mine else set()  # the shared two
        assert union == {question_hash(q) for q in qs} - in_test, (task, src)
    if own_test:
        test_ex, rec = got["eval_split"]
        assert [normalise_question(e.question) for e in test_ex] == [normalise_question(q) for q in files["test"]]
        assert "carve" not in rec
        train_rec, val_rec = got["train_split"][1], got["val_split"][1]
        assert train_rec["dropped_in"]["n"] + val_rec["dropped_in"]["n"] == 2  # they went to test
        assert train_rec["carve"] == val_rec["carve"] and train_rec["split_seed"] == 0
    else:  # a dataset with one split: a seeded carve, recorded with its shares and counts
        rec = got["eval_split"][1]
        assert rec["source_split"] == sources["eval_split"] and rec["source"].endswith(f"{sources['eval_split']}.jsonl")
        assert set(rec["counts"]) >= {splits[r] for r in ROLES}
        assert sum(rec["counts"].values()) == ROWS
        for role, s in splits.items():
            assert abs(sizes[role] / ROWS - rec["carve"][s]) < 0.1, (task, role, sizes)


def test_test_sets_of_official_test_files_are_whole():
    """gsm8k / arc-c / math keep the whole official test file as their test split."""
    for task in ("gsm8k", "arc-c", "math"):
        cfg = compose_cfg([f"task={task}"])
        carve = OmegaConf.to_container(cfg.task.carve)
        assert compose_cfg([f"task={task}", "task.carve=null"]).task.carve is None
        assert cfg.task.eval_split == "test" and carve_source(carve, "test") == ("test", None)
        assert carve_source(carve, cfg.task.val_split)[0] == "train"


def test_carve_is_stable_when_rows_are_added_and_independent_of_subsampling(tmp_path):
    carve = {"train": {"train": 0.5, "val": 0.2, "test": 0.3}}
    qs = question_texts("strategyqa", "train", 100)
    write_rows(tmp_path, "strategyqa", "train", qs)
    questions = lambda s, **kw: {e.question for e in load_split("strategyqa", s, tmp_path, carve=carve, **kw)[0]}  # noqa: E731
    before = {s: questions(s) for s in ("train", "val", "test")}
    write_rows(tmp_path, "strategyqa", "train", qs + question_texts("strategyqa", "extra", 60))
    after = {s: questions(s) for s in ("train", "val", "test")}
    for s in before:
        assert before[s] <= after[s] and not (after[s] - before[s]) & set(qs)
    sub = load_split("strategyqa", "train", tmp_path, max_examples=10, seed=3, carve=carve)[0]
    assert len(sub) == 10 and {e.question for e in sub} <= after["train"]
    assert questions("train", split_seed=1) != after["train"]


def test_split_record_goes_to_the_mine_summary_and_questions_json(tmp_path, tiny_engine, monkeypatch):
    write_rows(tmp_path / "data", "strategyqa", "train", question_texts("strategyqa", "train", 60))
    cfg = compose_cfg(
        [
            "task=strategyqa",
            f"task.data_root={tmp_path / 'data'}",
            "task.max_train_examples=4",
            "offline_mine.K=2",
            "offline_mine.K_pos=1",
            "offline_mine.K_neg=1",
            "offline_mine.max_new_tokens=3",
            "model.batch_size=8",
        ],
        entry="mine",
    )
    monkeypatch.setattr(runtime, "build_engine", lambda cfg: tiny_engine)
    mine_stage.run(cfg, Run(tmp_path / "run", cfg))
    train = runtime.load_examples(cfg, cfg.task.train_split)
    saved = json.loads((tmp_path / "run" / "mine" / "questions.json").read_text())
    assert saved["hashes"] == sorted(question_hash(e.question) for e in train) and saved["n"] == 4
    assert saved["split"]["split"] == "train" and saved["split"]["carve"] == {"train": 0.45, "val": 0.15, "test": 0.4}
    summary = json.loads((tmp_path / "run" / "mine" / "summary.json").read_text())
    assert summary["split"] == saved["split"] and summary["split"]["loaded"] == 4

    # eval on the same carve: disjoint, no refusal; a carve with another seed overlaps: one-line refusal
    for d in ("library", "memory"):  # stand-ins: the refusal comes before they are read
        (tmp_path / "run" / d).mkdir()
        (tmp_path / "run" / d / "x.jsonl").write_text("{}\n")
    eval_over = [
        "task=strategyqa",
        f"task.data_root={tmp_path / 'data'}",
        "eval.methods=[esm]",
        f"eval.artifact_run_dir={tmp_path / 'run'}",
    ]
    check_no_overlap(tmp_path / "run", runtime.load_examples(compose_cfg(eval_over), "test"))
    cfg2 = compose_cfg(eval_over + ["task.split_seed=7"])
    test2 = runtime.load_examples(cfg2, cfg2.task.eval_split)
    n = sum(question_hash(e.question) in set(saved["hashes"]) for e in test2)
    assert n >= 1
    with pytest.raises(RunError) as err:
        ev.run(cfg2, Run(tmp_path / "eval", cfg2), engine=tiny_engine)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "run") in msg and f"mined on {n} of the {len(test2)} eval" in msg
    assert "e.g. id qid" in msg


def test_overlap_check_warns_for_old_artifacts_without_questions(tmp_path, caplog):
    (tmp_path / "mine").mkdir()
    ex = generate("test", num=3)
    with caplog.at_level(logging.WARNING, logger="esm_steer.splits"):
        check_no_overlap(tmp_path, ex)
    assert "no mine/questions.json" in caplog.text
    check_no_overlap(None, ex)  # greedy only: no artifacts, nothing to check


def test_overlap_uses_normalised_questions(tmp_path):
    from esm_steer.data.tasks import Example
    from esm_steer.splits import write_mined_questions

    write_mined_questions(tmp_path / "mine", [Example("a", "What  is 2+2?", "4")])
    with pytest.raises(RunError, match="mined on 1 of the 2 case questions .e.g. id b"):
        check_no_overlap(tmp_path, [Example("c", "What is 3+3?", "6"), Example("b", "what is\n2+2? ", "4")], "case")


def test_eval_split_val_loads_val_and_keeps_its_records_apart(tmp_path, tiny_engine):
    over = ["eval.methods=[greedy]", "task.max_eval_examples=2", "decode.max_new_tokens=3", "task.num_synthetic=50"]
    cfg_val = compose_cfg(over + ["eval.split=val"])
    cfg_test = compose_cfg(over)
    assert runtime.eval_split(cfg_val) == "val" and runtime.eval_split(cfg_test) == "test"
    val = runtime.load_examples(cfg_val, runtime.eval_split(cfg_val))
    assert len(val) == 2 and all(e.id.startswith("arith-d1-val-") for e in val)
    out = ev.run(cfg_val, Run(tmp_path, cfg_val), engine=tiny_engine)
    assert [r["id"] for r in out["greedy"]] == [e.id for e in val]
    fp_val, fp_test = R.fingerprint(cfg_val, ["greedy"], None), R.fingerprint(cfg_test, ["greedy"], None)
    assert fp_val != fp_test and "split" not in fp_test  # test records of earlier runs still resume
    with pytest.raises(ConfigError, match="eval.split"):
        validate(compose_cfg(["eval.split=train"]))


def test_bad_split_config_is_one_line(tmp_path):
    write_rows(tmp_path, "strategyqa", "train", question_texts("strategyqa", "train", 20))
    for bad, match in (
        ({"train": {"train": 0.8, "val": 0.3}}, "shares sum to 1.1 > 1"),
        ({"train": {"train": 0.5}, "test": {"train": 0.5}}, "carved from both"),
        ({"train": {"val": 0}}, r"task.carve.train.val=0 is out of range"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_split("strategyqa", "train", tmp_path, carve=bad)
    cfg = compose_cfg(["task=strategyqa", f"task.data_root={tmp_path}", "task.eval_split=train"])
    with pytest.raises(ConfigError, match="must name three different splits"):
        runtime.load_examples(cfg, "train")
    with pytest.raises(ConfigError, match="task.carve must be null for task=arith"):
        runtime.load_examples(compose_cfg(["task=arith", "+task.carve.train={val: 0.5}"]), "val")


# ---------------------------------------------------------------- arith


def test_arith_test_split_is_what_it_was_before_val_existed():
    # captured from generate("test") before the val split was added (commit 4b4e1d4): previous
    # results are on these questions and ids
    ex = generate("test", seed=0, difficulty=1, num=1000)
    assert (ex[0].id, ex[0].question, ex[0].gold) == (
        "arith-d1-test-0",
        "Omar has 4 books. He buys 5 more books. How many books does Omar have now?",
        "9",
    )
    assert (ex[1].id, ex[1].question, ex[1].gold) == (
        "arith-d1-test-1",
        "Zoe had 6 stamps in a box. A friend takes 1 of the stamps. How many stamps does Zoe have now?",
        "5",
    )
    assert (ex[999].id, ex[999].question) == (
        "arith-d1-test-999",
        "Ava has 7 shells. She buys 7 more shells. How many shells does Ava have now?",
    )
    digest = lambda exs: hashlib.sha256(json.dumps([e.to_dict() for e in exs]).encode()).hexdigest()  # noqa: E731
    assert digest(ex) == "8528ab3852160279f400c6d3fc84b2052c2f4b66f1a1e6b54ec36aed5588721d"
    d3 = generate("test", seed=4242, difficulty=3)
    assert digest(d3) == "67afdb4e77b3b46a30615a7a29ca3523be5953aa0ea0a2edb79532ca3dd572f7"
    # train keeps its ids (val leaves gaps): a mine dir's rollouts still match their questions
    train = generate("train", seed=0, difficulty=1, num=5)
    assert train[0].id == "arith-d1-train-0" and train[0].question.startswith("There are 4 balloons on Noah's desk.")


def test_arith_val_is_a_fifth_of_the_train_side():
    val = generate("val", seed=0, difficulty=1, num=200)
    train = generate("train", seed=0, difficulty=1, num=800)
    test = generate("test", seed=0, difficulty=1, num=1000)
    qs = [{e.question for e in s} for s in (train, val, test)]
    assert not qs[0] & qs[1] and not qs[0] & qs[2] and not qs[1] & qs[2]
    train_ids = [int(e.id.rsplit("-", 1)[1]) for e in train]
    assert train_ids == sorted(train_ids) and train_ids[-1] + 1 - len(train) > 100  # gaps where val problems sit
