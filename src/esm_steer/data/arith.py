"""Synthetic arithmetic word problems: a task that runs anywhere, with a difficulty knob.

difficulty 1: one step, + or -, operands <= 12 (the embedded 135M model solves ~1/3-1/2);
difficulty 2: two steps of + / -, operands <= 30;
difficulty 3: three steps, + / - / "n bags of m" / doubling, operands up to ~99;
difficulty 4: a chain of two + / - operations ("Compute 6 + 5 - 4 step by step.", start <= 9,
operands <= 5), answered in three written lines (one per operation, then the answer), so an answer
has control points m = 1, 2 (segment delimiter "\n"). Calibrated on the embedded model
(scripts/calibrate_arith.py, docs/results.md §11): 30% right at temperature 0.8 on 100 test
problems (one phrasing: 39%, greedy 50%, on 80); three operations fell to 14%, word problems of
2-5 steps to 2-18%.

Problems come from one seeded stream; each question text goes to train, val or test by a hash
of the text (:func:`split_of`), so the splits never share a problem, whatever the seed. val was
carved out of the train side later (by a second hash byte): test is what it always was, and a
train problem keeps its id (ids count the train side, so val leaves gaps in train's).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from esm_steer.data.example import DataError, Example

NAMES = [
    ("Tom", "he", "his"),
    ("Mia", "she", "her"),
    ("Ben", "he", "his"),
    ("Lily", "she", "her"),
    ("Sam", "he", "his"),
    ("Emma", "she", "her"),
    ("Leo", "he", "his"),
    ("Zoe", "she", "her"),
    ("Max", "he", "his"),
    ("Ava", "she", "her"),
    ("Noah", "he", "his"),
    ("Ella", "she", "her"),
    ("Jack", "he", "his"),
    ("Ruby", "she", "her"),
    ("Omar", "he", "his"),
    ("Nina", "she", "her"),
    ("Ravi", "he", "his"),
    ("Kate", "she", "her"),
    ("Luis", "he", "his"),
    ("Yuki", "she", "her"),
]
FRIENDS = ["a friend", "his sister", "her brother", "a neighbor", "the teacher", "a classmate", "Grandma"]
OBJECTS = [
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "books",
    "balloons",
    "shells",
    "cards",
    "crayons",
    "stamps",
    "beads",
    "flowers",
    "eggs",
    "toy cars",
    "coins",
]

STARTS = [
    "{name} has {a} {obj}.",
    "{name} had {a} {obj} in a box.",
    "{name} collected {a} {obj}.",
    "There are {a} {obj} on {name}'s desk.",
    "{name} started the day with {a} {obj}.",
]
ADDS = [
    "{P} buys {b} more {obj}.",
    "{P} finds {b} more.",
    "{Friend} gives {him} {b} more {obj}.",
    "Then {name} gets {b} more.",
    "{P} picks up {b} more {obj}.",
    "Later, {name} wins {b} more {obj}.",
]
SUBS = [
    "{P} gives {b} {obj} to {friend}.",
    "{P} loses {b} of them.",
    "{P} sells {b} {obj}.",
    "Then {name} gives away {b}.",
    "{Friend} takes {b} of the {obj}.",
    "{P} uses {b} {obj} for a project.",
]
BAGS = ["{P} buys {b} bags with {c} {obj} in each.", "{Friend} brings {b} boxes of {c} {obj} each."]
DOUBLES = ["Then the number of {obj} doubles.", "{P} doubles {his} {obj}."]
QUESTIONS = [
    "How many {obj} does {name} have now?",
    "How many {obj} are there now?",
    "How many {obj} does {name} have in the end?",
]

# per difficulty: steps, start range, operand range
LEVELS = {1: (1, (2, 12), (1, 12)), 2: (2, (5, 30), (2, 30)), 3: (3, (10, 99), (3, 60)), 4: (2, (2, 9), (1, 5))}


@dataclass
class ArithProblem:
    question: str
    answer: int
    steps: list[str]  # "5 + 3 = 8"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


# 24 phrasings of one chain: with single-digit numbers a phrasing is what makes the splits
# hold a thousand problems each (the numbers alone give ~800)
CHAINS = [
    f"{verb} {{}} {how}."
    for verb in ("Compute", "Calculate", "Work out", "Find", "Evaluate", "Solve", "Simplify", "Add up")
    for how in ("step by step", "one step at a time", "line by line")
]


def make_chain(rng: random.Random, n_steps: int, a: tuple[int, int], b: tuple[int, int]) -> ArithProblem:
    """difficulty 4: "Compute a + b - c ... step by step." (results stay >= 0)."""
    value = rng.randint(*a)
    expr, steps = [str(value)], []
    for _ in range(n_steps):
        x = rng.randint(*b)
        if rng.random() < 0.5 and value > x:
            steps.append(f"{value} - {x} = {value - x}")
            expr.append(f"- {x}")
            value -= x
        else:
            steps.append(f"{value} + {x} = {value + x}")
            expr.append(f"+ {x}")
            value += x
    return ArithProblem(rng.choice(CHAINS).format(" ".join(expr)), value, steps)


def make_problem(rng: random.Random, difficulty: int) -> ArithProblem:
    n_steps, (a_lo, a_hi), (b_lo, b_hi) = LEVELS[difficulty]
    if difficulty == 4:
        return make_chain(rng, n_steps, (a_lo, a_hi), (b_lo, b_hi))
    name, he, his = rng.choice(NAMES)
    him = "him" if he == "he" else "her"
    obj = rng.choice(OBJECTS)
    friend = rng.choice([f for f in FRIENDS if not f.startswith(("his", "her")) or f.startswith(his)])
    fill = dict(name=name, P=_cap(he), him=him, his=his, obj=obj, friend=friend, Friend=_cap(friend))
    value = rng.randint(a_lo, a_hi)
    sentences, steps = [rng.choice(STARTS).format(a=value, **fill)], []
    for _ in range(n_steps):
        kinds = ["add", "sub"] + (["bags", "double"] if difficulty == 3 else [])
        kind = rng.choice(kinds)
        if kind == "sub" and value <= b_lo:
            kind = "add"
        if kind == "add":
            b = rng.randint(b_lo, b_hi)
            sentences.append(rng.choice(ADDS).format(b=b, **fill))
            steps.append(f"{value} + {b} = {value + b}")
            value += b
        elif kind == "sub":
            b = rng.randint(b_lo, min(b_hi, value - 1))
            sentences.append(rng.choice(SUBS).format(b=b, **fill))
            steps.append(f"{value} - {b} = {value - b}")
            value -= b
        elif kind == "bags":
            b, c = rng.randint(2, 6), rng.randint(2, 12)
            sentences.append(rng.choice(BAGS).format(b=b, c=c, **fill))
            steps.append(f"{b} x {c} = {b * c}, and {value} + {b * c} = {value + b * c}")
            value += b * c
        else:
            sentences.append(rng.choice(DOUBLES).format(**fill))
            steps.append(f"{value} x 2 = {value * 2}")
            value *= 2
    sentences.append(rng.choice(QUESTIONS).format(**fill))
    return ArithProblem(" ".join(sentences), value, steps)


def solution_text(p: ArithProblem) -> str:
    """The worked solution: one line per step, then "The answer is N."."""
    return "\n".join(f"{s}." for s in p.steps) + f"\nThe answer is {p.answer}."


SPLITS = ("train", "val", "test")
SPLIT_RULE = "sha1(question): byte 0 odd -> test; even -> val if byte 1 % 5 == 0 else train"


def split_of(question: str) -> str:
    """train, val or test, fixed by the question text alone (stable across seeds and runs)."""
    digest = hashlib.sha1(question.encode()).digest()
    if digest[0] % 2:
        return "test"
    return "val" if digest[1] % 5 == 0 else "train"  # a fifth of the train side


def generate(split: str, seed: int = 0, difficulty: int = 1, num: int = 1000):
    """``num`` distinct problems of one split, deterministic in (seed, difficulty)."""
    if split not in SPLITS:
        raise DataError(f"task=arith has splits {', '.join(SPLITS)}, not {split!r}")
    if difficulty not in LEVELS:
        raise DataError(f"arith difficulty must be one of {', '.join(map(str, LEVELS))}, got {difficulty!r}")
    if num < 1:
        raise DataError(f"num_synthetic must be >= 1, got {num}")
    rng = random.Random(f"esm-steer-arith-{seed}-{difficulty}")
    out, seen, side = [], set(), 0  # side: index among the split's side (train + val for train)
    for _ in range(200 * num):
        p = make_problem(rng, difficulty)
        if p.question in seen:
            continue
        seen.add(p.question)
        got = split_of(p.question)
        index = side if split == "train" else len(out)
        side += got in (("train", "val") if split == "train" else (split,))
        if got != split:
            continue
        out.append(
            Example(
                id=f"arith-d{difficulty}-{split}-{index}",
                question=p.question,
                gold=str(p.answer),
                solution=solution_text(p),
                meta={"difficulty": difficulty, "steps": len(p.steps)},
            )
        )
        if len(out) == num:
            return out
    raise DataError(f"arith: only {len(out)} distinct {split} problems at difficulty {difficulty}; lower num_synthetic")
