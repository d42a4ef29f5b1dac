"""Answer extraction and equivalence, per grader kind (hand-written tables)."""

from __future__ import annotations

import threading
import time

import pytest

from esm_steer.data import grading
from esm_steer.data.grading import (
    compute_score_dapo,
    dapo_normalize,
    extract_answer,
    is_equiv,
    last_boxed,
    parse_number,
    run_bounded,
)
from esm_steer.data.tasks import grade

# ---------------------------------------------------------------- numeric (GSM8K style)

NUMERIC = [
    ("The answer is 18.", "18", True),
    ("The answer is 18 dollars.", "18", True),
    ("She makes $18 every day.", "18", True),
    ("#### 72", "72", True),
    ("So the total is 1,000.", "1000", True),
    ("The answer is 1,234,567.", "1234567", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{1{,}000}", "1000", True),
    ("The answer is $5.", "5", True),
    ("\\boxed{\\$5.00}", "5", True),
    ("The answer is 3.0", "3", True),
    ("The answer is 3.", "3", True),
    ("The answer is -7.", "-7", True),
    ("It drops by 10-5 = 5 degrees, so the answer is −5.", "-5", True),
    ("The answer is 0.5.", "1/2", True),
    ("The answer is 1/2.", "0.5", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\dfrac12}", "0.5", True),
    ("The answer is 2.5 hours.", "2.5", True),
    ("Answer: 50%", "50", True),
    ("Answer: 50%", "0.5", True),
    ("Answer: 0.5", "50%", True),
    ("Answer: 42\n\nCheck: 6 * 7 = 42, and 43 is too many.", "42", True),
    ("First 3 + 4 = 7. Then 7 * 2 = 14.", "14", True),
    ("Answer: 5 + 3 = 8", "8", True),
    ("The answer is 12 apples and 3 pears.", "12", False),
    ("The answer is 17.", "18", False),
    ("The answer is 180.", "18", False),
    ("The answer is 1.8.", "18", False),
    ("The answer is 7.", "-7", False),
    ("\\boxed{18}\nWait, maybe \\boxed{20}.", "18", False),
    ("\\boxed{20}\nWait, no: \\boxed{18}.", "18", True),
    ("No numbers here at all.", "18", False),
    ("", "18", False),
    ("   \n ", "0", False),
    ("The answer is 0.", "0", True),
    ("The answer is 100000.", "100,000", True),
    ("The answer is 0.333333.", "1/3", True),
    ("The answer is 0.33.", "1/3", False),
    ("Total: 7 + 8 = 15 cookies", "15", True),
    ("The answer is 2,50.", "250", False),
    ("The answer is 12:30.", "12", False),
]


@pytest.mark.parametrize("response,gold,expected", NUMERIC)
def test_numeric(response, gold, expected):
    assert grade(response, gold, "numeric") is expected


def test_numeric_via_task_name():
    assert grade("#### 18", "18", "gsm8k") is True
    assert grade("The answer is 51.", "51", "svamp") is True
    assert grade("The answer is 9.", "9", "arith") is True


# ---------------------------------------------------------------- math (LaTeX)

MATH = [
    ("\\boxed{\\frac{1}{2}}", "\\frac12", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
    ("\\boxed{\\tfrac{3}{4}}", "0.75", True),
    ("\\boxed{-\\frac{2}{3}}", "-\\frac{2}{3}", True),
    ("\\boxed{2\\frac{1}{2}}", "\\frac{5}{2}", True),
    ("So $x = \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{(3,\\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("\\boxed{\\pi}", "\\pi", True),
    ("\\boxed{2\\pi}", "\\pi", False),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}", True),
    ("\\boxed{x=5}", "5", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{90^{\\circ}}", "90", True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("\\boxed{10\\%}", "10", True),
    ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}", True),
    ("nested \\boxed{\\frac{\\sqrt{2}}{\\sqrt{\\frac{1}{2}}}}", "2", True),
    ("\\boxed{1} then \\boxed{2} then \\boxed{3}", "3", True),
    ("\\boxed{1} then \\boxed{2} then \\boxed{3}", "1", False),
    ("\\fbox{7}", "7", True),
    ("\\boxed 7", "7", True),
    ("empty box \\boxed{} but the answer is 4", "4", True),
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5", True),
    ("The answer is $\\frac{1}{3}$.", "\\frac{1}{3}", True),
    ("The answer is $\\frac{1}{3}$.", "\\frac{1}{4}", False),
    ("\\boxed{x^2-1}", "(x-1)(x+1)", True),
    ("\\boxed{x^2-1}", "(x-1)^2", False),
    ("\\boxed{3}", "4", False),
    ("\\boxed{-3}", "3", False),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False),
    ("", "5", False),
    ("\\boxed{5}", "\\text{five}", False),
    ("\\boxed{\\infty}", "\\infty", True),
    ("\\boxed{1,\\!000}", "1000", True),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("the last number is 12", "12", True),
    ("\\boxed{\\binom{5}{2}}", "10", True),
    ("\\boxed{x^2+y^2}", "y^2+x^2", True),
    ("\\boxed{2^{10}}", "1024", True),
    ("\\boxed{\\sum_{k=1}^{n} k}", "10", False),
]


@pytest.mark.parametrize("response,gold,expected", MATH)
def test_math(response, gold, expected):
    assert grade(response, gold, "math") is expected


def test_math_via_task_name_and_unknown_task():
    assert grade("\\boxed{\\frac{1}{2}}", "0.5", "math500") is True
    assert grade("\\boxed{023}", "23", "aime_2024") is True
    assert grade("\\boxed{\\frac{1}{2}}", "0.5", "no-such-task") is True


def test_grading_grade_takes_a_kind_not_a_task():
    # grading knows no tasks (tasks.grade maps a task to its kind): a task name is refused, not guessed
    assert grading.grade("\\boxed{\\frac{1}{2}}", "0.5", "math") is True
    with pytest.raises(ValueError, match="unknown answer kind 'math500'"):
        grading.grade("\\boxed{\\frac{1}{2}}", "0.5", "math500")


# pathological inputs: power towers / huge exponents / factorials must not hang the grader
PATHOLOGICAL = [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{2^3^4^5^6}",
    "\\boxed{2^{99999999}}",
    "\\boxed{999999!}",
    "\\boxed{" + "x+" * 400 + "1}",
]


@pytest.mark.parametrize("response", PATHOLOGICAL)
def test_math_pathological_returns_quickly(response):
    t0 = time.time()
    assert grade(response, "5", "math") is False
    assert time.time() - t0 < grading.SYMBOLIC_TIMEOUT_S + 1


def test_run_bounded_times_out_and_returns():
    t0 = time.time()
    assert run_bounded(time.sleep, 5, timeout=0.2) is None
    assert time.time() - t0 < 1.0
    assert run_bounded(lambda: 3, timeout=1) == 3
    assert run_bounded(lambda: 1 / 0, timeout=1) is None  # errors mean "not provably equal"


def test_grading_works_off_the_main_thread():
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", grade("\\boxed{x^2-1}", "(x-1)(x+1)", "math")))
    t.start()
    t.join(30)
    assert out.get("v") is True


# ---------------------------------------------------------------- choice

CHOICE = [
    ("The answer is C.", "C", True),
    ("The answer is (C).", "C", True),
    ("The answer is (c).", "C", True),
    ("the answer is: B", "B", True),
    ("Answer: D", "D", True),
    ("Answer: (A)", "A", True),
    ("Answer: A. Planetary density will decrease.", "A", True),
    ("\\boxed{B}", "B", True),
    ("\\boxed{\\text{B}}", "B", True),
    ("\\boxed{(E)}", "E", True),
    ("I pick option C.", "C", True),
    ("The correct choice is B", "B", True),
    ("Between (A) and (D), (D) fits best.", "D", True),
    ("A planet that spins faster has shorter days, so C", "C", True),
    ("So the answer is C, not A.", "C", True),
    ("Answer: B\nAlthough A is tempting.", "B", True),
    ("\\boxed{A} ... on reflection \\boxed{C}", "C", True),
    ("The answer is C.", "(C)", True),
    ("The answer is C.", "c", True),
    ("The answer is C.", "B", False),
    ("The answer is (A).", "D", False),
    ("Answer: D", "A", False),
    ("\\boxed{B}", "C", False),
    ("A planet spins faster.", "A", False),
    ("There is no letter here.", "A", False),
    ("", "A", False),
    ("The answer is F.", "F", False),
    ("Answer: E", "E", True),
    ("answer is d", "D", True),
    ("The answer is B) wet palms.", "B", True),
    ("Choice (B) is right. The answer is B.", "B", True),
    ("I think it's B. Final answer: C", "C", True),
    ("Final answer: C", "B", False),
    ("Let's check A, B, and C. D is correct.", "D", True),
    ("Option A is wrong. Option B is right.", "B", True),
    ("\\boxed{D}", "D", True),
    ("The answer is: (B)", "B", True),
    ("The answer is (B)", "A", False),
    ("(A) is wrong; (C) is correct", "C", True),
    ("Answer:   C  ", "C", True),
    ("The answer is C", "D", False),
]


@pytest.mark.parametrize("response,gold,expected", CHOICE)
def test_choice(response, gold, expected):
    assert grade(response, gold, "choice") is expected


def test_choice_via_task_name():
    assert grade("The answer is C.", "C", "arc-c") is True


# ---------------------------------------------------------------- yes / no

YESNO = [
    ("The answer is yes.", "yes", True),
    ("The answer is Yes.", "yes", True),
    ("The answer is YES", "yes", True),
    ("The answer is no.", "no", True),
    ("So the answer is no.", "no", True),
    ("Answer: yes", "yes", True),
    ("Answer: No", "no", True),
    ("\\boxed{yes}", "yes", True),
    ("\\boxed{\\text{no}}", "no", True),
    ("The answer is true.", "yes", True),
    ("The answer is false.", "no", True),
    ("The answer is yes.", "true", True),
    ("The answer is no.", "False", True),
    ("The answer is yes.", "no", False),
    ("The answer is no.", "yes", False),
    ("Answer: yes", "no", False),
    ("\\boxed{no}", "yes", False),
    ("No. Caesar had 3 children... so yes, the answer is yes.", "yes", True),
    ("Yes, he did. Answer: no", "no", True),
    ("Yes, he did.", "yes", True),
    ("No, it cannot.", "no", True),
    ("I am not sure.", "yes", False),
    ("", "yes", False),
    ("The answer is maybe.", "yes", False),
    ("Genghis Khan had more children, so yes.", "yes", True),
    ("Genghis Khan had more children, so yes.", "no", False),
    ("It is not true.", "yes", True),  # last yes/no word wins: known limitation
    ("Answer: Yes, it is.", "yes", True),
    ("The answer is: no", "no", True),
    ("The answer is: no", "yes", False),
    ("\\boxed{True}", "yes", True),
    ("\\boxed{False}", "yes", False),
    ("Yes\n\nAnswer: yes", "yes", True),
    ("Answer: no\nYes, I am confident.", "no", True),
    ("Nobody knows; the answer is no.", "no", True),
    ("Yesterday it rained. The answer is no.", "no", True),
    ("yes", "yes", True),
    ("no", "no", True),
    ("no", "yes", False),
    ("The answer is yes", "no", False),
    ("The answer is no", "no", True),
]


@pytest.mark.parametrize("response,gold,expected", YESNO)
def test_yesno(response, gold, expected):
    assert grade(response, gold, "yesno") is expected


def test_yesno_via_task_name():
    assert grade("The answer is yes.", "yes", "strategyqa") is True


# ---------------------------------------------------------------- math_dapo (verl's DAPO reward)

DAPO = [
    ("Answer: 5", "5", True),
    ("answer: 5", "5", True),
    ("ANSWER : 5", "5", True),
    ("Answer:5", "5", True),
    ("Some work.\nAnswer: 42", "42", True),
    ("Answer: 41\nWait.\nAnswer: 42", "42", True),
    ("Answer: 42\nWait.\nAnswer: 41", "42", False),
    ("Answer: $42$", "42", True),
    ("Answer: \\boxed{42}", "42", True),
    ("Answer: 1,000", "1000", True),
    ("Answer: 1000", "1,000", True),
    ("Answer: x = 7", "7", True),
    ("Answer: 7 dollars", "7", True),
    ("Answer: 90^\\circ", "90", True),
    ("Answer: 90 degrees", "90", True),
    ("Answer: \\frac{1}{2}", "\\frac{1}{2}", True),
    ("Answer: \\frac12", "\\frac{1}{2}", True),
    ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", False),  # exact match: dfrac is not normalised
    ("Answer: 0.5", "\\frac{1}{2}", False),  # exact string match only
    ("Answer: \\sqrt2", "\\sqrt{2}", True),
    ("Answer: \\text{(C)}", "(C)", True),
    ("Answer: \\textbf{12}", "12", True),
    ("Answer: 5.", "5", False),  # a trailing period stays (only ".$" is substituted)
    ("Answer: $5.$", "5", True),
    ("Answer: 3 + 4 = 7", "7", True),
    ("Answer: 5 \\text{ cm}", "5", True),
    ("The final answer is 5", "5", False),  # no "Answer:" line
    ("\\boxed{5}", "5", False),
    ("", "5", False),
    ("Answer: 6", "5", False),
    ("Answer: -5", "5", False),
    ("Answer: 5\n" + "x" * 400, "5", False),  # the answer is outside the last 300 characters
    ("y" * 400 + "\nAnswer: 5", "5", True),
    ("Answer: 10\\%", "10\\%", True),
    ("Answer: 2\\pi", "2\\pi", True),
    ("Answer: 2 \\pi", "2\\pi", True),
    ("Answer: an apple", "apple", True),
    ("Answer: a b", "b", True),
    ("Answer: 204", "204", True),
    ("Answer: 023", "23", False),
    ("Answer: \\overline{AB}", "AB", True),
]


@pytest.mark.parametrize("response,gold,expected", DAPO)
def test_math_dapo(response, gold, expected):
    out = compute_score_dapo(response, gold)
    assert out["acc"] is expected
    assert out["score"] == (1.0 if expected else -1.0)
    assert grade(response, gold, "math_dapo") is expected
    assert grade(response, gold, "dapo_math") is expected


def test_math_dapo_pred_and_invalid():
    assert compute_score_dapo("Answer: $1,000$", "1000")["pred"] == "1000"
    assert compute_score_dapo("no answer line", "5")["pred"] == "[INVALID]"
    assert dapo_normalize("\\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"
    assert is_equiv("\\text{12 units}", "12", "math_dapo")


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{a} and \\boxed{b}", "b"),
        ("\\boxed{\\{1,\\{2\\}\\}}", "\\{1,\\{2\\}\\}"),
        ("\\boxed{unclosed", None),
        ("no box", None),
        ("\\fbox{3}", "3"),
        ("\\boxed{x} \\fbox{y}", "y"),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "s,value",
    [
        ("1,000", 1000),
        ("$5", 5),
        ("3.0", 3),
        ("-\\frac{1}{2}", -0.5),
        ("\\dfrac12", 0.5),
        ("50%", 50),
        ("12 apples.", 12),
    ],
)
def test_parse_number(s, value):
    assert float(parse_number(s)[0]) == value


@pytest.mark.parametrize("s", ["x+1", "1,2", "12:30", "", "\\sqrt{2}"])
def test_parse_number_rejects(s):
    assert parse_number(s) is None


def test_extract_answer_order_and_kinds():
    r = "Work: 3 + 4 = 7.\nThe answer is 7.\nAnswer: 8\n\\boxed{9}\nThen 10."
    assert extract_answer(r, "numeric") == "9"
    assert extract_answer(r.replace("\\boxed{9}", ""), "numeric") == "8"
    assert extract_answer("The answer is 7. Then 10.", "numeric") == "7"
    assert extract_answer("Then 10 and 11.", "math") == "11"
    assert extract_answer("", "math") is None
    assert extract_answer("Answer: 5\nmore", "math_dapo") == "5"
    with pytest.raises(ValueError, match="unknown answer kind"):
        extract_answer("x", "bogus")
