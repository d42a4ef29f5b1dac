"""The shared stage runtime: task.grader and task.prompt reach grading and prompts, and
chunked generation isolates a failing prompt."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

import esm_steer.cli  # noqa: F401 - registers the schema and resolvers
from esm_steer import runtime
from esm_steer.data.prompts import build_messages
from esm_steer.data.tasks import Example
from esm_steer.engine.base import chat_prompt_ids


def compose_cfg(overrides=()):
    with initialize_config_module(config_module="esm_steer.conf", version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


def test_grade_follows_the_grader_kind_and_never_raises(monkeypatch):
    assert runtime.grade("The answer is 12.", "12", "numeric") == (True, "12", None)
    assert runtime.grade("The answer is 12.", "12", "arith")[0]  # a task name maps to its kind
    ok, pred, err = runtime.grade("Answer: (B)", "B", "choice")
    assert ok and err is None
    assert runtime.grade("", "12", "numeric") == (False, None, None)  # empty: wrong, not an error
    is_correct, pred = runtime.grader("numeric")
    assert is_correct("so 3 + 4 = 7. The answer is 7.", "7") and pred("The answer is 7.") == "7"
    monkeypatch.setattr(runtime.grading, "grade", lambda *a: 1 / 0)
    bad = runtime.grade("The answer is 12.", "12", "numeric")
    assert bad[0] is False and "grading failed: ZeroDivisionError" in bad[2]  # an error on the response, not a stop


def test_template_name_uses_task_prompt_for_auto():
    assert runtime.template_name(compose_cfg()) == "arith_3shot"
    assert runtime.template_name(compose_cfg(["task.prompt=arith_0shot"])) == "arith_0shot"
    assert runtime.template_name(compose_cfg(["prompt=gsm8k_0shot", "task.prompt=arith_0shot"])) == "gsm8k_0shot"


def test_prompt_ids_render_the_chosen_template(tokenizer):
    tok = tokenizer
    ex = Example("q1", "What is 2 + 3?", "5")
    cfg = compose_cfg(["task.prompt=arith_0shot"])
    want = chat_prompt_ids(tok, build_messages("arith_0shot", ex, system=cfg.prompt.system))
    assert runtime.prompt_ids(tok, cfg, [ex]) == [want]
    assert runtime.prompt_ids(tok, compose_cfg(), [ex]) != [want]  # arith_3shot has few-shot turns


def test_load_split_passes_task_keys_to_the_loader():
    small = runtime.load_examples(compose_cfg(["task.num_synthetic=40"]), "train", None)
    big = runtime.load_examples(compose_cfg(["task.num_synthetic=200"]), "train", None)
    assert 0 < len(small) < len(big)
    assert len(runtime.load_examples(compose_cfg(["task.max_train_examples=7"]), "train")) == 7


def test_generate_with_retry_isolates_a_failing_prompt():
    calls = []

    def call(idx):
        calls.append(list(idx))
        if 3 in idx:
            raise RuntimeError("boom")
        return [i * 10 for i in idx]

    got = dict(p for idx, res in runtime.generate_with_retry(call, 6, 4, "t") for p in zip(idx, res))
    assert [got[i] for i in (0, 1, 2, 4, 5)] == [0, 10, 20, 40, 50]
    assert isinstance(got[3], runtime.Failed) and "RuntimeError: boom" in got[3].error
    assert calls == [[0, 1, 2, 3], [0], [1], [2], [3], [4, 5]]  # the bad group retried one by one


def test_generate_with_retry_lets_a_kill_through():
    def call(idx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(runtime.generate_with_retry(call, 2, 2, "t"))
