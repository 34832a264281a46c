"""Answer extraction and grading: hand-worked extractions, math-verify equivalences, None for golds that cannot be
judged, pathological inputs, threads, and the real benchmark golds."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest

from r1lab.tasks import grading
from r1lab.tasks.answers import SCAN_CHARS, extract_answer, extract_boxed, grade, normalize_answer, parse_number
from r1lab.tasks.benchmarks import load_benchmark

# --- extraction ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
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
    ],
)
def test_extract_answer_hand_worked_examples(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "no answer here",
        "<answer>  </answer>",
        "\\boxed{}",
        "\\boxed{never closed",
        "<answer>unclosed",
        "####   ",
    ],
)
def test_extract_answer_gives_none_when_there_is_no_answer(text):
    assert extract_answer(text) is None


def test_an_unclosed_box_falls_back_to_the_last_closed_one():
    assert extract_boxed("\\boxed{1} and \\boxed{2") == "1"
    assert extract_answer("<answer>\\boxed{7</answer>") == "\\boxed{7"  # the tag wins; its box never closes


def test_answer_tag_wins_over_boxes_and_hashes_elsewhere():
    assert extract_answer("#### 3 \\boxed{4} <answer>5</answer>") == "5"
    assert extract_answer("#### 3 \\boxed{4}") == "4"


# --- extraction in linear time, over the reply's tail -------------------------------------------------------


def degenerate(unit: str, chars: int) -> str:
    return (unit * (chars // len(unit) + 1))[:chars]


# Replies RL produces at long lengths; the quadratic scans this replaced took 30 s on 56 KB of unclosed boxes.
DEGENERATE = {
    "unclosed boxes": lambda n: degenerate("\\boxed{", n),
    "unclosed answer tags": lambda n: degenerate("<answer>", n),
    "think openings": lambda n: degenerate("<think>", n),
    "nested braces": lambda n: "\\boxed{" + degenerate("{", n),
    "unclosed fboxes in braces": lambda n: degenerate("{\\fbox{x", n),
    "repeated template": lambda n: degenerate("<think>a</think><answer>", n),
    "hash lines": lambda n: degenerate("#### \n", n),
    "bare boxes": lambda n: degenerate("\\boxed ", n),
    "escaped braces": lambda n: "\\boxed{" + degenerate("\\{", n),
}


def best_seconds(fn, arg, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("shape", DEGENERATE)
def test_extraction_is_linear_time_on_degenerate_replies(shape):
    # 16x the text costs under 64x the time (linear: 16x, quadratic: 256x, which here is tens of seconds; the 20 ms
    # term absorbs timer and cache noise on a busy machine), and a 1 MB reply, read only in its last SCAN_CHARS,
    # well under a second
    make = DEGENERATE[shape]
    small, large = make(SCAN_CHARS // 16), make(SCAN_CHARS)
    assert best_seconds(extract_answer, large) < 64 * best_seconds(extract_answer, small) + 0.02
    start = time.perf_counter()
    extract_answer(make(1 << 20))
    assert time.perf_counter() - start < 1.0


def test_extraction_reads_only_the_last_scan_chars():
    filler = "x" * SCAN_CHARS
    assert extract_answer(filler + "\\boxed{5}") == "5"
    assert extract_answer("\\boxed{5}" + filler) is None  # further from the end than SCAN_CHARS
    assert extract_answer("<answer>5</answer>" + filler + "\\boxed{6}") == "6"
    assert extract_answer("\\boxed{" * 200_000 + "\\boxed{5}") == "5"


def reference_extract(text: str | None) -> str | None:
    """The extraction this module had before it was made linear (a brace scan from every box, a lazy regex for
    tags): quadratic, but exact on short texts, so the linear one must agree with it."""

    def boxed(t):
        found = None
        for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", t):
            depth, i = 1, m.end()
            while i < len(t) and depth:
                if t[i] == "\\" and i + 1 < len(t) and t[i + 1] in "{}":
                    i += 2
                    continue
                depth += (t[i] == "{") - (t[i] == "}")
                i += 1
            if depth == 0:
                found = (m.start(), t[m.end() : i - 1])
        bare = [(m.start(), m.group(1)) for m in re.finditer(r"\\boxed +([^\s$]+)", t)]
        candidates = [c for c in (found, bare[-1] if bare else None) if c is not None]
        return max(candidates)[1].strip() if candidates else None

    if not text:
        return None
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if tagged:
        inner = boxed(tagged[-1])
        return (inner if inner is not None else tagged[-1]).strip() or None
    inner = boxed(text)
    if inner is not None:
        return inner.strip() or None
    hashes = re.findall(r"####\s*(.+)", text)
    if hashes:
        return extract_answer("#### " + hashes[-1])  # the number clean-up is not what changed
    return None


def test_linear_extraction_agrees_with_the_quadratic_one_on_random_replies():
    pieces = [
        "\\boxed{",
        "\\fbox {",
        "{",
        "}",
        "\\{",
        "\\}",
        "\\\\",
        "<answer>",
        "</answer>",
        "5",
        " ",
        "x",
        "\\boxed 7",
        "#### 3\n",
        "\n",
        "<think>",
        "</think>",
    ]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 24)))
        assert extract_answer(text) == reference_extract(text), text


# --- normalisation helpers ----------------------------------------------------------------------------------


def test_normalize_and_parse_number_on_plain_forms():
    assert normalize_answer(" $\\dfrac{1}{2}$. ") == normalize_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    assert normalize_answer("\\text{Evelyn}") == "evelyn"
    assert normalize_answer("x = 5") == "5"
    assert [parse_number(s) for s in ["85", "-3", "1,234", "2.50", "3/4", "x = 5", ".5"]] == [
        85,
        -3,
        1234,
        Fraction(5, 2),
        Fraction(3, 4),
        5,
        Fraction(1, 2),
    ]
    assert [parse_number(s) for s in [None, "", "12 34", "1/0", "\\frac{1}{2}", "5x", "1,23"]] == [None] * 7


# --- grading ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "predicted,gold",
    [
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
    ],
)
def test_grade_accepts_equivalent_answers(predicted, gold):
    assert grade(predicted, gold) is True


@pytest.mark.parametrize(
    "predicted,gold",
    [
        ("3", "3\\sqrt{13}"),  # an unanchored parse would read only the gold's first number
        ("3\\sqrt{13}", "3"),
        ("0.51", "\\frac12"),
        ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("1,2", "1"),
        ("p + q", "p - q"),
        ("19", "18"),
    ],
)
def test_grade_rejects_different_answers(predicted, gold):
    assert grade(predicted, gold) is False


def test_grade_matches_math500_gold_written_differently(shared_data):
    gold = load_benchmark("math500", data_dir=shared_data)[0].answer  # \left( 3, \frac{\pi}{2} \right)
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


@pytest.mark.parametrize(
    "predicted",
    [
        "9^{9^{9^{9}}}",
        "2^{100000}",
        "1000000!",
        "x" * 5000,
        "\\frac{" * 200 + "1" + "}" * 200,
        "(" * 299,
        "a^" * 100 + "2",
        "x^{9^{9^{9}}}",
        "{" * 150 + "1" + "}" * 150,
        "(1+" * 60 + "1" + ")" * 60,
    ],
)
def test_grade_returns_quickly_on_pathological_predictions(predicted):
    start = time.perf_counter()
    assert grade(predicted, "5") is False
    assert time.perf_counter() - start < 3


def test_grade_works_outside_the_main_thread():
    # math-verify's default timeouts use SIGALRM, which raises outside the main thread
    pairs = [("\\frac12", "0.5"), ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("7", "8")]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda pg: grade(*pg), pairs)) == [True, True, False]


# --- grading bounded in time and memory, from any thread -----------------------------------------------------

# Each escapes the cheap pre-filters. Graded in-process from a worker thread (no SIGALRM there), the first two ran
# past 30 s (where they were stopped), the third for 8 s, reaching 793 MB.
HOSTILE = ["((9^{999})^{999})^{999}", "\\int_0^1 e^{x^{7}} \\sin(x^{13}) dx", "((2^{1000})^{1000})^{1000}"]


def live_workers() -> list[int]:
    pool = grading._POOL
    return [] if pool is None else [w.proc.pid for w in pool.idle]


def test_grading_is_bounded_in_time_from_worker_threads():
    start = time.perf_counter()
    with ThreadPoolExecutor(len(HOSTILE)) as pool:
        assert list(pool.map(lambda p: grade(p, "5"), HOSTILE)) == [False] * len(HOSTILE)
    # at most two rounds of the deadline (fewer workers than threads), plus starting the workers
    assert time.perf_counter() - start < 2 * grading.DEADLINE_S + 5
    assert grade("\\sqrt{36}", "6") is True  # the workers still (or again) answer


def test_a_worker_past_its_deadline_is_killed_and_replaced(monkeypatch):
    assert grade("\\sqrt{16}", "4") is True  # a worker is running
    before = set(live_workers())
    monkeypatch.setattr(grading, "DEADLINE_S", 0.5)
    start = time.perf_counter()
    assert grade("\\int_0^1 e^{x^{5}} \\sin(x^{11}) dx", "5") is False  # seconds of sympy work in the worker
    assert time.perf_counter() - start < 0.5 + 1.5
    killed = before - set(live_workers())
    assert killed and all(not Path(f"/proc/{pid}").exists() for pid in killed)
    monkeypatch.setattr(grading, "DEADLINE_S", 5.0)
    assert grade("\\sqrt{25}", "5") is True and grade("\\sqrt{26}", "5") is False


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads the worker's limits in /proc (Linux)")
def test_grading_memory_is_capped():
    assert grade("((2^{1000})^{1000})^{1000}", "7") is False
    assert grade("\\sqrt{9}", "3") is True
    for pid in live_workers():
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert re.search(rf"Max address space\s+{grading.MEMORY_MB << 20}\s", limits), limits
        peak_kb = int(re.search(r"VmPeak:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1))
        assert peak_kb <= grading.MEMORY_MB << 10
        assert "torch" not in Path(f"/proc/{pid}/maps").read_text()  # a clean interpreter, not a copy of this one


def test_grading_from_many_threads_at_once():
    pairs = [(f"\\sqrt{{{k * k + extra}}}", str(k), extra == 0) for k in range(2, 26) for extra in (0, 1)]
    with ThreadPoolExecutor(16) as pool:
        verdicts = list(pool.map(lambda pge: grade(pge[0], pge[1]), pairs))
    assert verdicts == [expected for _, _, expected in pairs]
    assert len(live_workers()) <= grading.MAX_WORKERS


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_grades_with_its_own_worker():
    assert grade("\\sqrt{49}", "7") is True  # the parent has a worker before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its inherited pool is dropped, so it starts a worker of its own
        ok = False
        try:
            ok = grade("\\sqrt{64}", "8") is True and grade("\\sqrt{65}", "8") is False
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    assert grade("\\sqrt{81}", "9") is True and grade("\\sqrt{82}", "9") is False


@pytest.mark.skipif(not Path("/proc").exists(), reason="reads process ids in /proc")
@pytest.mark.parametrize("ending", ["exit", "SIGKILL"])
def test_workers_end_with_their_process(ending):
    script = (
        "import sys, time; from r1lab.tasks import grading; from r1lab.tasks.answers import grade\n"
        "assert grade('\\\\sqrt{4}', '2') is True\n"
        "print(*[w.proc.pid for w in grading._POOL.idle], flush=True)\n"
        "time.sleep(60) if sys.argv[1] == 'SIGKILL' else None\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, ending],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    assert workers
    if ending == "SIGKILL":
        proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # no orphan left behind


# --- strict parses: an answer math-verify read only part of is not a match --------------------------------


@pytest.mark.parametrize(
    "predicted,gold",
    [
        ("2 \\uparrow\\uparrow 5", "5"),  # the four: math-verify fell back to the last number it found
        ("2 \\to 5", "5"),
        ("9 \\mapsto 5", "5"),
        ("\\foo 5", "5"),
        ("x \\to 5", "5"),  # their neighbours
        ("\\uparrow 5", "5"),
        ("f: x \\mapsto 5", "5"),
        ("\\not 5", "5"),
        ("5 \\foo", "5"),
        ("\\foo{5}", "5"),
        ("[2 \\to 5]", "[2, 5]"),
        ("(2 \\to 5)", "(2, 5)"),
        ("a = \\foo = 5", "5"),  # an equation chain that fails whole fell back to its last part
    ],
)
def test_an_answer_whose_parse_dropped_part_of_it_is_not_a_match(predicted, gold):
    assert grade(predicted, gold) is False
    assert grade(gold, predicted) is None  # as a gold it cannot be judged (unless the strings are equal)


@pytest.mark.parametrize(
    "predicted,gold",
    [
        ("x \\in [2, 5]", "[2, 5]"),
        ("\\lim_{x \\to 0} \\frac{\\sin x}{x}", "1"),  # \\to where the grammar has it
        ("5 \\text{ cm}", "5"),  # units are dropped on purpose
        ("2 \\cdot 5", "10"),
        ("\\sqrt{25}", "5"),
        ("(-\\infty, 5]", "x \\le 5"),
    ],
)
def test_answers_math_verify_reads_whole_still_match(predicted, gold):
    assert grade(predicted, gold) is True


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
