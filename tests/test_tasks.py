"""Task loaders on small fixture files in each dataset's real format (no network, no shared data)."""

from __future__ import annotations

import json
import logging

import pytest

import esm_steer
from esm_steer.data.arith import split_of
from esm_steer.data.rows import DAPO_PREFIX, DAPO_SUFFIX
from esm_steer.data.tasks import TASKS, DataError, Example, load_split, load_task


def write_jsonl(root, task, split, rows):
    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return root


GSM8K = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "Janet’s ducks lay 16 eggs per day. How much does she make?",
        "answer": "She makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018",
    },
    {"question": "No gold here.", "answer": "It is 5."},
    {"question": "", "answer": "#### 3"},
]
SVAMP = [
    {
        "ID": "chal-1",
        "Body": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack",
        "Question": "How much do you have to pay to buy each pack?",
        "Equation": "( 76.0 - 25.0 )",
        "Answer": 51.0,
        "Type": "Subtraction",
    },
    {
        "ID": "chal-2",
        "Body": "Dan had 5 pens.",
        "Question": "How many halves?",
        "Equation": "( 5.0 / 2.0 )",
        "Answer": 2.5,
        "Type": "Common-Division",
    },
    {"ID": "chal-3", "Body": "No answer.", "Question": "How many?", "Equation": "", "Type": "Addition"},
]
ARC = [
    {
        "id": "Mercury_7175875",
        "question": "An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?",
        "choices": {
            "text": [
                "Planetary density will decrease.",
                "Planetary years will become longer.",
                "Planetary days will become shorter.",
                "Planetary gravity will become stronger.",
            ],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "C",
        "answer": "Planetary days will become shorter.",
        "response": "* LEAKED TEACHER RESPONSE: the answer is B",
    },
    {
        "id": "NYSEDREGENTS_2015_4_8",
        "question": "Which is a gas?",
        "choices": {"text": ["rock", "steam", "ice"], "label": ["1", "2", "3"]},
        "answerKey": "2",
        "answer": "steam",
        "response": "LEAKED",
    },
    {"id": "bad-1", "question": "No choices", "choices": {"text": [], "label": []}, "answerKey": "A"},
]
MATH500 = [
    {
        "problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
        "solution": "We have that $r = 3.$ ... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/807.json",
    },
    {
        "problem": "What is 1+1?",
        "solution": "It is $\\boxed{2}$.",
        "answer": "2",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/1.json",
    },
]
MATH_TEST = [
    {
        "problem": "How many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have?",
        "level": "Level 3",
        "type": "Algebra",
        "solution": "The denominator factors. Therefore, the graph has $\\boxed{2}$ vertical asymptotes.",
        "idx": 0,
    },
    {
        "problem": "Simplify.",
        "level": "Level 1",
        "type": "Algebra",
        "solution": "First $\\boxed{1}$, then finally $\\boxed{\\frac{1}{\\sqrt{2}}}$.",
        "idx": 1,
    },
    {
        "problem": "No box.",
        "level": "Level 1",
        "type": "Algebra",
        "solution": "We are done, without any boxed answer in this long worked solution text here.",
        "idx": 2,
    },
]
SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
MATH_TRAIN = [
    {
        "problem": "Let $f(x) = 2x$. Find $f(0)$." + SUFFIX,
        "level": "Level 5",
        "solution": "0",
        "type": "Algebra",
        "data_source": "DigitalLearningGmbH/MATH-lighteval",
        "ability": "math",
        "reward_model": {"ground_truth": "0", "style": "rule"},
        "extra_info": {"index": 0, "split": "train"},
    },
    {
        "problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$." + SUFFIX,
        "level": "Level 1",
        "solution": "\\frac{3}{4}",
        "type": "Algebra",
        "data_source": "DigitalLearningGmbH/MATH-lighteval",
        "ability": "math",
        "reward_model": {"ground_truth": "\\frac{3}{4}", "style": "rule"},
        "extra_info": {"index": 1, "split": "train"},
    },
    {
        "problem": "Empty gold." + SUFFIX,
        "level": "Level 5",
        "solution": "",
        "type": "Algebra",
        "data_source": "x",
        "ability": "math",
        "reward_model": {"ground_truth": "", "style": "rule"},
        "extra_info": {"index": 2, "split": "train"},
    },
]
AIME = [
    {
        "id": 60,
        "problem": "Every morning Aya goes for a $9$-kilometer-long walk.",
        "solution": "So $\\framebox{204}$ minutes",
        "answer": "204",
        "url": "https://artofproblemsolving.com/x",
        "question": "Every morning Aya goes for a $9$-kilometer-long walk.",
    },
    {
        "id": 61,
        "problem": "Find the remainder.",
        "solution": "...",
        "answer": "023",
        "url": "u",
        "question": "Find the remainder.",
    },
]
STRATEGYQA = [
    {
        "qid": "b8677742616fef051f00",
        "term": "Genghis Khan",
        "description": "founder",
        "facts": ["Julius Caesar had three children.", "Genghis Khan had sixteen children."],
        "answer": True,
        "question": "Are more people today related to Genghis Khan than Julius Caesar?",
        "decomposition": ["How many kids did Julius Caesar have?"],
    },
    {
        "qid": "q2",
        "term": "T",
        "description": "d",
        "facts": ["Fact."],
        "answer": False,
        "question": "Is it so?",
        "decomposition": [],
    },
    {"qid": "q3", "term": "T", "description": "d", "facts": [], "question": "No answer?", "decomposition": []},
]


def dapo_msg(problem):
    return [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}]


DAPO = [
    {
        "data_source": "math_dapo",
        "prompt": dapo_msg("In triangle $ABC$, find $k+m$."),
        "ability": "MATH",
        "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"},
    },
    {
        "data_source": "math_dapo",
        "prompt": dapo_msg("In triangle $ABC$, find $k+m$."),
        "ability": "MATH",
        "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "dup"},
    },
    {"problem": "What is 2+2?", "answer": "4"},
    {"prompt": "Plain prompt string?", "solution": "7"},
    {
        "data_source": "math_dapo",
        "prompt": dapo_msg("No truth."),
        "reward_model": {"ground_truth": "", "style": "rule"},
    },
]


def test_registry_has_all_tasks():
    assert set(TASKS) == {"gsm8k", "svamp", "arc-c", "math500", "math", "aime_2024", "strategyqa", "dapo_math", "arith"}
    assert TASKS["aime_2024"].hub_splits == {"test": "train"}
    assert TASKS["gsm8k"].hub_id == "openai/gsm8k" and TASKS["gsm8k"].hub_config == "main"
    assert TASKS["arc-c"].hub_config == "ARC-Challenge"
    assert {s.grader for s in TASKS.values()} == {"numeric", "math", "choice", "yesno", "math_dapo"}


def test_gsm8k(tmp_path, caplog):
    write_jsonl(tmp_path, "gsm8k", "test", GSM8K)
    with caplog.at_level(logging.INFO, logger="esm_steer.data.tasks"):
        ex = esm_steer.load_task("gsm8k", "test", data_root=str(tmp_path))
    assert [e.gold for e in ex] == ["72", "1018"]
    assert (
        ex[0].solution
        == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
    )
    assert ex[0].id == "gsm8k-test-0" and ex[1].id == "gsm8k-test-1"
    assert "task=gsm8k split=test: loaded 2, skipped 2" in caplog.text
    assert "no #### in answer: 1" in caplog.text and "missing question: 1" in caplog.text


def test_data_root_pointing_inside_task_folder(tmp_path):
    write_jsonl(tmp_path, "gsm8k", "test", GSM8K)
    assert len(load_task("gsm8k", "test", data_root=tmp_path / "gsm8k")) == 2


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "arc-c").mkdir()
    pq.write_table(pa.Table.from_pylist(ARC[:2]), tmp_path / "arc-c" / "test.parquet")
    ex = load_task("arc-c", "test", data_root=tmp_path)
    assert [e.gold for e in ex] == ["C", "B"]


def test_svamp(tmp_path):
    ex = load_task("svamp", "test", data_root=write_jsonl(tmp_path, "svamp", "test", SVAMP))
    assert len(ex) == 2
    assert ex[0].question == SVAMP[0]["Body"] + " " + SVAMP[0]["Question"]
    assert (ex[0].gold, ex[0].id, ex[1].gold) == ("51", "chal-1", "2.5")


def test_arc_choices_and_no_response_leak(tmp_path):
    ex = load_task("arc-c", "test", data_root=write_jsonl(tmp_path, "arc-c", "test", ARC))
    assert len(ex) == 2
    a, b = ex
    assert a.id == "Mercury_7175875" and a.gold == "C"
    assert a.choices == [
        "A. Planetary density will decrease.",
        "B. Planetary years will become longer.",
        "C. Planetary days will become shorter.",
        "D. Planetary gravity will become stronger.",
    ]
    assert b.gold == "B" and b.choices == ["A. rock", "B. steam", "C. ice"]  # numeric labels -> letters
    assert "LEAKED" not in json.dumps([e.to_dict() for e in ex])


def test_math500(tmp_path):
    ex = load_task("math500", "test", data_root=write_jsonl(tmp_path, "math500", "test", MATH500))
    assert ex[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)" and ex[0].id == "test/precalculus/807.json"
    assert ex[0].solution.startswith("We have") and ex[1].gold == "2"


def test_math_test_answer_is_last_boxed(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="esm_steer.data.tasks"):
        ex = load_task("math", "test", data_root=write_jsonl(tmp_path, "math", "test", MATH_TEST))
    assert [e.gold for e in ex] == ["2", "\\frac{1}{\\sqrt{2}}"]
    assert "skipped 1 (no answer: 1)" in caplog.text


def test_math_train_verl_format(tmp_path):
    ex = load_task("math", "train", data_root=write_jsonl(tmp_path, "math", "train", MATH_TRAIN))
    assert [e.gold for e in ex] == ["0", "\\frac{3}{4}"]
    assert ex[0].question == "Let $f(x) = 2x$. Find $f(0)$."
    assert all("think step by step" not in e.question for e in ex)
    assert all(e.solution is None for e in ex)  # verl's "solution" is only the answer


def test_aime(tmp_path):
    ex = load_task("aime_2024", "test", data_root=write_jsonl(tmp_path, "aime_2024", "test", AIME))
    assert [(e.id, e.gold) for e in ex] == [("60", "204"), ("61", "23")]


def test_strategyqa(tmp_path):
    ex = load_task("strategyqa", "train", data_root=write_jsonl(tmp_path, "strategyqa", "train", STRATEGYQA))
    assert [(e.id, e.gold) for e in ex] == [("b8677742616fef051f00", "yes"), ("q2", "no")]
    assert ex[0].solution.startswith("Julius Caesar had three children. Genghis Khan had sixteen children.")
    assert ex[0].solution.endswith("the answer is yes.")


def test_strategyqa_hub_shape_with_string_facts(tmp_path):
    rows = [{"qid": "h1", "question": "Q?", "answer": True, "facts": "One fact. Two facts."}]
    ex = load_task("strategyqa", "test", data_root=write_jsonl(tmp_path, "strategyqa", "test", rows))
    assert ex[0].solution.startswith("One fact. Two facts.")


def test_dapo_math(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="esm_steer.data.tasks"):
        ex = load_task("dapo_math", "train", data_root=write_jsonl(tmp_path, "dapo_math", "train", DAPO))
    assert [e.question for e in ex] == ["In triangle $ABC$, find $k+m$.", "What is 2+2?", "Plain prompt string?"]
    assert [e.gold for e in ex] == ["34", "4", "7"]
    assert ex[0].id == "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"
    assert "duplicate question: 1" in caplog.text and "missing ground_truth: 1" in caplog.text


def test_max_examples_seeded_subsample(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(50)]
    root = write_jsonl(tmp_path, "gsm8k", "train", rows)
    a = load_task("gsm8k", "train", data_root=root, max_examples=10, seed=3)
    b = load_task("gsm8k", "train", data_root=root, max_examples=10, seed=3)
    c = load_task("gsm8k", "train", data_root=root, max_examples=10, seed=4)
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.id for e in a] != [e.id for e in c]
    idx = [int(e.gold) for e in a]
    assert idx == sorted(idx) and len(set(idx)) == 10  # kept in file order
    assert len(load_task("gsm8k", "train", data_root=root, max_examples=500)) == 50


def test_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown task 'nope'; known: gsm8k"):
        load_task("nope", "test")
    with pytest.raises(DataError, match="unknown argument"):
        load_task("gsm8k", "test", data_root=tmp_path, colour="red")

    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_task("gsm8k", "test", data_root=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "task=gsm8k split=test" in msg and str(tmp_path) in msg and "openai/gsm8k" in msg


def test_hub_path_maps_aime_test_to_train(monkeypatch):
    import datasets

    calls = []

    def fake(hub_id, config, split):
        calls.append((hub_id, config, split))
        return [{"id": 1, "problem": "P", "answer": "007"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    ex = load_task("aime_2024", "test")
    assert calls == [("HuggingFaceH4/aime_2024", None, "train")] and ex[0].gold == "7"


def test_registry_is_the_task_yaml(monkeypatch):
    """TASKS is read from conf/task/<name>.yaml: the composed cfg.task of task=<name> says the same."""
    from hydra import compose, initialize_config_module

    import esm_steer.cli  # noqa: F401 - registers the schema

    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        for name, spec in TASKS.items():
            t = compose(config_name="eval", overrides=[f"task={name}"]).task
            got = (t.hub_id, t.hub_config, t.grader, t.prompt, dict(t.hub_splits), t.dedupe)
            assert got == (spec.hub_id, spec.hub_config, spec.grader, spec.prompt, spec.hub_splits, spec.dedupe)
            assert (spec.row_to_example is None) == (name == "arith")


def test_a_bad_task_yaml_is_one_line(tmp_path, monkeypatch):
    from esm_steer.data import tasks

    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "gsm8k.yaml").write_text("dataset: gsm8k\ngrader: roman\n")
    monkeypatch.setattr(tasks, "files", lambda package: tmp_path)
    with pytest.raises(DataError, match=r"conf/task/gsm8k\.yaml: grader='roman'"):
        tasks.read_task_yaml("gsm8k")
    (tmp_path / "task" / "gsm8k.yaml").write_text("dataset: svamp\n")
    with pytest.raises(DataError, match=r"dataset='svamp', expected 'gsm8k'"):
        tasks.read_task_yaml("gsm8k")


def test_config_values_override_the_task_yaml(monkeypatch):
    """cfg.task's hub keys (LOAD_KEYS) reach the hub load: a command-line override is not ignored."""
    import datasets

    from esm_steer.data.tasks import LOAD_KEYS

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split: calls.append((*a, split)) or DAPO[:1] * 2)
    ex = load_task("dapo_math", "test", hub_id="me/dapo", hub_config="c", hub_splits={"test": "eval"}, dedupe=False)
    assert calls == [("me/dapo", "c", "eval")] and len(ex) == 2  # no dedupe: both copies kept
    assert len(load_task("dapo_math", "test")) == 1 and calls[-1] == ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train")
    assert set(LOAD_KEYS) <= set(esm_steer.config.TaskConfig.__dataclass_fields__)


def test_parse_rows_and_read_rows(tmp_path):
    from esm_steer.data import SkipRow, parse_rows, read_rows, subsample
    from esm_steer.data.rows import gsm8k_row

    rows = [GSM8K[0], GSM8K[0], "text", {"question": "q", "answer": "no hash"}]
    ex, skipped = parse_rows(rows, gsm8k_row, "p", dedupe=True)
    assert [e.id for e in ex] == ["p-0"]
    assert skipped == {"duplicate question": 1, "not an object": 1, "no #### in answer": 1}
    assert issubclass(SkipRow, Exception) and subsample(list(range(10)), 3, 0) == subsample(list(range(10)), 3, 0)
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\nnot json\n')
    with pytest.raises(DataError, match=r"a\.jsonl:3: not valid JSON"):
        read_rows(tmp_path / "a.jsonl")


def test_example_to_dict():
    d = Example("i", "q", "1", meta={"k": 1}).to_dict()
    assert d == {"id": "i", "question": "q", "gold": "1", "solution": None, "choices": None, "meta": {"k": 1}}


# ---------------------------------------------------------------- synthetic arith


def test_arith_deterministic_and_sized():
    a = load_task("arith", "train", seed=1, num_synthetic=30)
    b = load_task("arith", "train", seed=1, num_synthetic=30)
    c = load_task("arith", "train", seed=2, num_synthetic=30)
    assert len(a) == 30 and [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert [e.question for e in a] != [e.question for e in c]
    assert len({e.question for e in a}) == 30


def test_arith_train_test_disjoint():
    for d in (1, 2, 3):
        train = {e.question for e in load_task("arith", "train", difficulty=d, num_synthetic=200)}
        test = {e.question for e in load_task("arith", "test", difficulty=d, num_synthetic=200)}
        other_seed = {e.question for e in load_task("arith", "test", seed=7, difficulty=d, num_synthetic=200)}
        assert not train & test and not train & other_seed
    assert split_of("x") in ("train", "test")


def test_arith_difficulty_and_solution():
    import re

    easy = load_task("arith", "test", difficulty=1, num_synthetic=100)
    hard = load_task("arith", "test", difficulty=3, num_synthetic=100)
    for e in easy:
        assert all(int(n) <= 15 for n in re.findall(r"\d+", e.question))
        assert e.meta == {"difficulty": 1, "steps": 1}
    assert all(e.meta["steps"] == 3 for e in hard)
    assert max(int(e.gold) for e in hard) > max(int(e.gold) for e in easy)
    for e in easy + hard:
        assert e.solution.endswith(f"The answer is {e.gold}.")
        assert esm_steer.grade(e.solution, e.gold, "arith")
        assert int(e.gold) >= 0
    templates = {e.question.split()[1] for e in easy}
    assert len(templates) > 3  # varied sentences, not one template


def test_arith_bad_args():
    with pytest.raises(DataError, match="difficulty"):
        load_task("arith", "test", difficulty=5)
    with pytest.raises(DataError, match="splits train, val, test"):
        load_task("arith", "validation")


def test_carved_split_is_logged_and_recorded(tmp_path, caplog):
    rows = [{"qid": f"q{i}", "question": f"Is {i} even?", "answer": i % 2 == 0} for i in range(40)]
    root = write_jsonl(tmp_path, "strategyqa", "train", rows)
    carve = {"train": {"train": 0.5, "val": 0.2, "test": 0.3}}
    with caplog.at_level(logging.INFO, logger="esm_steer.data.tasks"):
        ex, rec = load_split("strategyqa", "val", data_root=root, carve=carve, split_seed=3)
    assert rec["source"] == str(root / "strategyqa" / "train.jsonl") and rec["source_split"] == "train"
    assert rec["carve"] == carve["train"] and rec["split_seed"] == 3 and sum(rec["counts"].values()) == 40
    assert rec["n"] == rec["counts"]["val"] == len(ex)
    counts = rec["counts"]
    assert f"split_seed 3; counts train {counts['train']}, val {counts['val']}, test {counts['test']})" in caplog.text
    assert "carved from split train (train 0.5, val 0.2, test 0.3;" in caplog.text
    # ids stay those of the source file's rows
    assert {e.id for e in ex} <= {r["qid"] for r in rows}
    assert [e.id for e in load_task("strategyqa", "val", root, carve=carve, split_seed=3)] == [e.id for e in ex]
