"""Answer extraction and grading: hand-worked extractions, math-verify equivalences, None for golds that cannot be
judged, pathological inputs, threads, and the real benchmark golds."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from r1lab.tasks.answers import extract_answer, extract_boxed, grade, normalize_answer, parse_number
from r1lab.tasks.benchmarks import load_benchmark


# --- extraction ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("first \\boxed{1}, then corrected: \\boxed{2}", "2"),
    ("$\\fbox{204}$ minutes", "204"),
    ("\\boxed 5 is it", "5"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{x^{2^{3}}}", "x^{2^{3}}"),
    ("She makes 9 * 2 = $18.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("#### $1,234.50.", "1234.50"),
    ("<think> 7+8=15 </think> <answer> 85 </answer>", "85"),
    ("<answer>1</answer> wait <answer> 2 </answer>", "2"),
    ("<answer>The result is \\boxed{42}.</answer>", "42"),
    ("<think>maybe \\boxed{3}</think><answer>4</answer>", "4"),
    ("<answer>(25-5)*3</answer>", "(25-5)*3"),
])
def test_extract_answer_hand_worked_examples(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", [None, "", "no answer here", "<answer>  </answer>", "\\boxed{}",
                                  "\\boxed{never closed", "<answer>unclosed", "####   "])
def test_extract_answer_gives_none_when_there_is_no_answer(text):
    assert extract_answer(text) is None


def test_an_unclosed_box_falls_back_to_the_last_closed_one():
    assert extract_boxed("\\boxed{1} and \\boxed{2") == "1"
    assert extract_answer("<answer>\\boxed{7</answer>") == "\\boxed{7"  # the tag wins; its box never closes


def test_answer_tag_wins_over_boxes_and_hashes_elsewhere():
    assert extract_answer("#### 3 \\boxed{4} <answer>5</answer>") == "5"
    assert extract_answer("#### 3 \\boxed{4}") == "4"


# --- normalisation helpers ----------------------------------------------------------------------------------

def test_normalize_and_parse_number_on_plain_forms():
    assert normalize_answer(" $\\dfrac{1}{2}$. ") == normalize_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    assert normalize_answer("\\text{Evelyn}") == "evelyn"
    assert normalize_answer("x = 5") == "5"
    assert [parse_number(s) for s in ["85", "-3", "1,234", "2.50", "3/4", "x = 5", ".5"]] == \
        [85, -3, 1234, Fraction(5, 2), Fraction(3, 4), 5, Fraction(1, 2)]
    assert [parse_number(s) for s in [None, "", "12 34", "1/0", "\\frac{1}{2}", "5x", "1,23"]] == [None] * 7


# --- grading ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("predicted,gold", [
    ("\\frac12", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\dfrac{1}{2}"),
    ("1234", "1,234"),
    ("25", "025"),
    ("27", "27.0"),
    ("x = 5", "5"),
    ("Evelyn", "\\text{Evelyn}"),
    ("90", "90^\\circ"),
    ("0.1", "10\\%"),
    ("-q+p", "p - q"),
    ("\\{2, 1\\}", "\\{1,2\\}"),
    ("3\\sqrt{13}", "\\sqrt{117}"),
])
def test_grade_accepts_equivalent_answers(predicted, gold):
    assert grade(predicted, gold) is True


@pytest.mark.parametrize("predicted,gold", [
    ("3", "3\\sqrt{13}"),  # an unanchored parse would read only the gold's first number
    ("3\\sqrt{13}", "3"),
    ("0.51", "\\frac12"),
    ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("1,2", "1"),
    ("p + q", "p - q"),
    ("19", "18"),
])
def test_grade_rejects_different_answers(predicted, gold):
    assert grade(predicted, gold) is False


def test_grade_matches_math500_gold_written_differently(benchmark_data):
    gold = load_benchmark("math500", data_dir=benchmark_data)[0].answer  # \left( 3, \frac{\pi}{2} \right)
    assert grade("(3, \\frac{\\pi}{2})", gold) is True
    assert grade("\\left(3,\\dfrac{\\pi}{2}\\right)", gold) is True
    assert grade("(3, \\frac{\\pi}{3})", gold) is False


def test_missing_prediction_is_wrong_but_an_unjudgeable_gold_is_none():
    assert grade(None, "5") is False and grade("", "5") is False
    for gold in [None, "", "   ", "$ $"]:
        assert grade("5", gold) is None
    for gold in ["???", "}{", "&"]:  # math-verify parses nothing here
        assert grade("5", gold) is None  # cannot tell 5 from it: not a free 0
        assert grade(None, gold) is None
        assert grade(gold, gold) is True  # an exact match is still a match


@pytest.mark.parametrize("predicted", ["9^{9^{9^{9}}}", "2^{100000}", "1000000!", "x" * 5000,
                                       "\\frac{" * 200 + "1" + "}" * 200, "(" * 299,
                                       "a^" * 100 + "2", "x^{9^{9^{9}}}", "{" * 150 + "1" + "}" * 150,
                                       "(1+" * 60 + "1" + ")" * 60])
def test_grade_returns_quickly_on_pathological_predictions(predicted):
    start = time.perf_counter()
    assert grade(predicted, "5") is False
    assert time.perf_counter() - start < 3


def test_grade_works_outside_the_main_thread():
    # math-verify's default timeouts use SIGALRM, which raises outside the main thread
    pairs = [("\\frac12", "0.5"), ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("7", "8")]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda pg: grade(*pg), pairs)) == [True, True, False]


# --- real golds ---------------------------------------------------------------------------------------------

def test_every_math500_gold_parses(shared_data):
    # grade(None, gold) is False exactly when the gold can be judged; None would mean "unparseable"
    unparseable = [p.answer for p in load_benchmark("math500", data_dir=shared_data) if grade(None, p.answer) is None]
    assert unparseable == []


def test_gsm8k_aime_amc_golds_all_parse_and_match_their_own_solutions(shared_data):
    for name in ("gsm8k", "aime24", "amc23"):
        for p in load_benchmark(name, data_dir=shared_data):
            assert grade(None, p.answer) is False, (name, p.answer)
    gsm = load_benchmark("gsm8k", data_dir=shared_data)
    raw = [json.loads(line)["answer"] for line in open(shared_data / "gsm8k" / "test.jsonl")]
    assert all(extract_answer(r) == p.answer for r, p in zip(raw, gsm))


def test_math500_boxed_answers_in_the_reference_solutions_grade_correct(shared_data):
    # an independent reference: the boxed answer of each written solution is the gold, in other words.
    # A sample of every 5th problem keeps this fast; mismatches are pinned (solutions that box two parts).
    problems = load_benchmark("math500", data_dir=shared_data)[::5]
    wrong = [p.id for p in problems if grade(extract_answer(p.meta["solution"]), p.answer) is not True]
    assert wrong == [], wrong
