"""Prompt templates: an Example -> chat messages (token ids: :func:`esm_steer.engine.base.chat_prompt_ids`).

Few-shot examples are earlier user/assistant turns: a small instruct model copies the
assistant's format from its own previous turns more reliably than from an inline block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from esm_steer.data.example import DataError, Example
from esm_steer.data.rows import DAPO_PREFIX, DAPO_SUFFIX


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    user: str  # format string: {question}, {choices} (multiple choice)
    shots: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (question, answer) turns
    system: str | None = None  # default system message (None: the model's own default)


BOXED = "Please reason step by step, and put your final answer within \\boxed{}."
ARITH_RULE = 'Solve the problem. Finish with "The answer is N." where N is a number.'

ARITH_SHOTS = (
    ("Anna has 7 pears. She buys 5 more pears. How many pears does Anna have now?", "7 + 5 = 12.\nThe answer is 12."),
    (
        "Carl had 14 pens in a box. He gives 6 pens to a friend. How many pens does Carl have now?",
        "14 - 6 = 8.\nThe answer is 8.",
    ),
    (
        "There are 9 cups on Dana's desk. She finds 4 more. How many cups are there now?",
        "9 + 4 = 13.\nThe answer is 13.",
    ),
)

# arith difficulty 4: one line per step, so that each step ends at a control point ("\n"); the
# small model copies the shots' number of lines, so they have the task's two operations
ARITH_STEPS_SHOTS = (
    ("Compute 4 + 3 - 2 step by step.", "4 + 3 = 7.\n7 - 2 = 5.\nThe answer is 5."),
    ("Compute 8 - 3 + 2 step by step.", "8 - 3 = 5.\n5 + 2 = 7.\nThe answer is 7."),
    ("Compute 6 + 5 - 4 step by step.", "6 + 5 = 11.\n11 - 4 = 7.\nThe answer is 7."),
)

PROMPTS: dict[str, PromptTemplate] = {
    t.name: t
    for t in [
        PromptTemplate(
            "gsm8k_0shot",
            "Solve the following math problem step by step. Put your final answer within \\boxed{{}}.\n\n"
            "Question: {question}",
        ),
        PromptTemplate(
            "gsm8k_0shot_compact",
            "Solve the following math problem. Be brief: show only the key calculations, then put the "
            "final answer within \\boxed{{}}.\n\nQuestion: {question}",
        ),
        PromptTemplate(
            "arc_0shot",
            "Answer the following multiple-choice question. Think step by step, then finish with "
            '"The answer is X." where X is the letter of the correct choice.\n\n'
            "Question: {question}\n{choices}",
        ),
        PromptTemplate("math_0shot", "{question}\n\n" + BOXED.replace("{}", "{{}}")),
        PromptTemplate(
            "strategyqa_0shot",
            "Answer the following yes/no question. Think step by step, then finish with "
            '"The answer is yes." or "The answer is no."\n\nQuestion: {question}',
        ),
        # verl's DAPO-Math-17k prompt, verbatim
        PromptTemplate("dapo", DAPO_PREFIX + "{question}" + DAPO_SUFFIX),
        PromptTemplate("arith_0shot", ARITH_RULE + "\n\n{question}"),
        PromptTemplate("arith_3shot", ARITH_RULE + "\n\n{question}", shots=ARITH_SHOTS),
        PromptTemplate("arith_steps_3shot", ARITH_RULE + "\n\n{question}", shots=ARITH_STEPS_SHOTS),
    ]
}


def _fill(t: PromptTemplate, question: str, choices: list[str] | None) -> str:
    if "{choices}" in t.user and not choices:
        raise DataError(f"prompt template {t.name!r} needs multiple-choice options; the example has none")
    return t.user.format(question=question, choices="\n".join(choices or []))


AUTO = "auto"  # prompt.template=auto: the task's default template (task.prompt)


def build_messages(template: str, example: Example, system: str | None = None) -> list[dict]:
    """Chat messages for one example: [system], few-shot turns, then the question."""
    t = PROMPTS.get(template)
    if t is None:
        raise DataError(f"unknown prompt template {template!r}; known: {', '.join(PROMPTS)}")
    messages = []
    sys_msg = system if system is not None else t.system
    if sys_msg:
        messages.append({"role": "system", "content": sys_msg})
    for q, a in t.shots:
        messages.append({"role": "user", "content": _fill(t, q, None)})
        messages.append({"role": "assistant", "content": a})
    messages.append({"role": "user", "content": _fill(t, example.question, example.choices)})
    return messages
