"""Prompt templates: message shapes, instruction texts, choices, and prompt token ids."""

from __future__ import annotations

import pytest

from esm_steer.data.prompts import PROMPTS, build_messages
from esm_steer.data.tasks import TASKS, DataError, Example
from esm_steer.engine.base import chat_prompt_ids

MATHY = Example("m1", "What is $1+1$?", "2")
ARC = Example(
    "a1",
    "Which is a gas?",
    "B",
    choices=["A. rock", "B. steam", "C. ice"],
    meta={"labels": ["A", "B", "C"]},
)

DAPO_TEXT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "What is $1+1$?\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)


def test_registry_names_and_task_defaults():
    expected = {
        "gsm8k_0shot",
        "gsm8k_0shot_compact",
        "arc_0shot",
        "math_0shot",
        "strategyqa_0shot",
        "dapo",
        "arith_0shot",
        "arith_3shot",
    }
    assert expected <= set(PROMPTS)
    assert all(spec.prompt in PROMPTS for spec in TASKS.values())


@pytest.mark.parametrize("template", [t for t in PROMPTS if t != "arc_0shot"])
def test_every_template_ends_with_the_question(template):
    msgs = build_messages(template, MATHY)
    assert all(set(m) == {"role", "content"} for m in msgs)
    assert msgs[-1]["role"] == "user" and "What is $1+1$?" in msgs[-1]["content"]
    roles = [m["role"] for m in msgs]
    assert roles[::2] == ["user"] * len(roles[::2]) and roles[1::2] == ["assistant"] * len(roles[1::2])
    assert "{" not in msgs[-1]["content"].replace("\\boxed{}", "").replace("$1+1$", "")  # no unfilled fields


def test_dapo_instruction_is_verbatim():
    msgs = build_messages("dapo", MATHY)
    assert msgs == [{"role": "user", "content": DAPO_TEXT}]


def test_math_prompts_ask_for_boxed():
    for t in ("math_0shot", "gsm8k_0shot", "gsm8k_0shot_compact"):
        assert "\\boxed{}" in build_messages(t, MATHY)[-1]["content"]


def test_arc_choices_and_no_leak():
    ex = Example(
        "a2",
        "Which is a gas?",
        "B",
        choices=["A. rock", "B. steam", "C. ice"],
        meta={"labels": ["A", "B", "C"], "response": "LEAKED teacher answer"},
    )
    content = build_messages("arc_0shot", ex)[-1]["content"]
    assert "Which is a gas?\nA. rock\nB. steam\nC. ice" in content
    assert "LEAKED" not in content and "letter" in content
    with pytest.raises(DataError, match="needs multiple-choice options"):
        build_messages("arc_0shot", MATHY)


def test_strategyqa_prompt_asks_yes_no():
    content = build_messages("strategyqa_0shot", Example("s", "Is water wet?", "yes"))[-1]["content"]
    assert "yes" in content and "no" in content and "Is water wet?" in content


def test_arith_shots_are_worked_turns():
    msgs = build_messages(
        "arith_3shot", Example("x", "Tom has 2 cats. He finds 1 more. How many cats does Tom have now?", "3")
    )
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 + ["user"]
    for m in msgs[1:6:2]:
        assert m["content"].splitlines()[-1].startswith("The answer is ")
    assert len(build_messages("arith_0shot", MATHY)) == 1


def test_system_message_and_unknown_template():
    msgs = build_messages("math_0shot", MATHY, system="Be terse.")
    assert msgs[0] == {"role": "system", "content": "Be terse."}
    with pytest.raises(DataError, match="unknown prompt template 'nope'; known: gsm8k_0shot"):
        build_messages("nope", MATHY)


def test_gold_and_solution_never_in_prompt():
    ex = Example("g", "What is 40+2?", "4242", solution="SECRET SOLUTION")
    for t in PROMPTS:
        if t != "arc_0shot":
            text = str(build_messages(t, ex))
            assert "SECRET" not in text and "4242" not in text


class FakeTokenizer:
    """Mimics the two calls chat_prompt_ids makes (transformers 5 semantics)."""

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</s>" for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


def test_chat_prompt_ids_with_fake_tokenizer():
    ids = chat_prompt_ids(FakeTokenizer(), [{"role": "user", "content": "hi"}])
    assert "".join(map(chr, ids)) == "<user>hi</s><assistant>"


def test_chat_prompt_ids_real_tokenizer(tokenizer):
    msgs = build_messages("arith_3shot", MATHY)
    ids = chat_prompt_ids(tokenizer, msgs)
    assert all(isinstance(i, int) for i in ids)
    text = tokenizer.decode(ids)
    assert text.rstrip().endswith("assistant") and "What is $1+1$?" in text
    assert text.count(tokenizer.bos_token or "<|im_start|>") >= 1
    assert text.count("<|im_start|>") == len(msgs) + 1 + (0 if msgs[0]["role"] == "system" else 1)
