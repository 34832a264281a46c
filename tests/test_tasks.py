"""Synthetic task generators (determinism, held-out split, worked reasoning), the countdown verifier, and the
benchmark loaders against the real shared files."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from fractions import Fraction

import pytest

from r1lab.tasks import (
    R1_MATH_INSTRUCTION,
    TEST_PER_MILLE,
    Problem,
    Task,
    benchmarks,
    get_task,
    list_tasks,
    register_task,
    split_of,
)
from r1lab.tasks.arithmetic import worked
from r1lab.tasks.benchmarks import load_benchmark
from r1lab.tasks.countdown import evaluate

SYNTHETIC = {
    "arithmetic": [{}, {"min_digits": 3, "max_digits": 5}, {"ops": "*", "mul_digits": 3}, {"ops": "-"}],
    "countdown": [{}, {"count": 4, "max_number": 50, "max_target": 500}, {"ops": "+-"}],
    "linear": [{}, {"negatives": True, "two_sided": 0.5}, {"two_sided": 1.0, "max_coef": 20}],
}
KNOB_SETS = [(name, knobs) for name, sets in SYNTHETIC.items() for knobs in sets]


# --- registry and determinism -------------------------------------------------------------------------------


def test_registry_lists_the_synthetic_families_and_benchmarks():
    assert set(list_tasks()) >= {"arithmetic", "countdown", "linear", "gsm8k", "math500", "aime24", "amc23"}
    for name in list_tasks():
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name


def test_unknown_task_and_bad_knobs_are_errors_that_name_the_problem():
    with pytest.raises(ValueError, match="unknown task 'arith'.*arithmetic"):
        get_task("arith")
    with pytest.raises(TypeError, match="arithmetic.*digts"):
        get_task("arithmetic", digts=3)
    with pytest.raises(ValueError, match=r"min_digits <= max_digits.*min_digits=4, max_digits=2"):
        get_task("arithmetic", min_digits=4, max_digits=2)
    with pytest.raises(ValueError, match=r"ops.*'\+/'"):
        get_task("arithmetic", ops="+/")
    with pytest.raises(ValueError, match="count must be >= 2"):
        get_task("countdown", count=1)
    with pytest.raises(ValueError, match="two_sided.*1.5"):
        get_task("linear", two_sided=1.5)
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("arithmetic").problems("valid")


def test_register_task_adds_a_user_task():
    @register_task("echo-test")
    class Echo:
        name = "echo-test"

        def problems(self, split="train", n=None, seed=0):
            return [Problem(id="0", task=self.name, prompt="Say 1.", answer="1")]

        def check(self, predicted, problem):
            return predicted == problem.answer

    assert "echo-test" in list_tasks() and get_task("echo-test").check("1", Problem("0", "echo-test", "", "1"))


@pytest.mark.parametrize("name,knobs", KNOB_SETS)
def test_same_seed_gives_the_same_problems_and_other_seeds_differ(name, knobs):
    task = get_task(name, **knobs)
    a, b, c = (task.problems("train", 50, seed=s) for s in (0, 0, 1))
    assert a == b
    assert [p.id for p in a] != [p.id for p in c]
    assert len({p.id for p in task.problems("test", 40)}) == 40  # held-out problems are distinct


def test_problem_ids_are_stable_and_name_the_question():
    p = get_task("arithmetic").problems("train", 200, seed=3)
    assert all(q.id == f"{q.meta['a']}{q.meta['op']}{q.meta['b']}" for q in p)
    assert all(q.prompt == f"What is {q.meta['a']} {q.meta['op']} {q.meta['b']}?" for q in p)


# --- held-out split -----------------------------------------------------------------------------------------


def _reference_split(task: str, key: str) -> str:
    """Independent restatement of the documented rule: sha256 of "task\\0key", first 8 bytes, mod 1000."""
    h = int(hashlib.sha256(task.encode() + b"\0" + key.encode()).hexdigest()[:16], 16)
    return "test" if h % 1000 < TEST_PER_MILLE else "train"


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_train_draws_never_hit_a_held_out_key_over_many_draws(name):
    task = get_task(name)
    train = {p.meta["key"] for s in range(3) for p in task.problems("train", 1500, seed=s)}
    test = {p.meta["key"] for p in task.problems("test", 300)}
    assert not train & test
    assert all(_reference_split(name, k) == "train" for k in train)
    assert all(_reference_split(name, k) == "test" for k in test)
    # a harder setting draws from a different range, but the bucket ignores knobs: still no held-out key
    harder = get_task(name, **SYNTHETIC[name][1])
    assert not {p.meta["key"] for p in harder.problems("train", 1500)} & test


def test_the_split_function_alone_decides_membership_over_a_whole_problem_space():
    # one-digit addition has exactly 55 order-normalised keys; the test split must be exactly those split_of
    # sends to "test", and training over many seeds must reach every other one and no held-out one
    task = get_task("arithmetic", min_digits=1, max_digits=1, ops="+")
    space = {f"{a}+{b}" for a in range(10) for b in range(a, 10)}
    held_out = {k for k in space if split_of("arithmetic", k) == "test"}
    assert held_out == {k for k in space if _reference_split("arithmetic", k) == "test"}
    assert 0 < len(held_out) < len(space)
    assert {p.meta["key"] for p in task.problems("test", len(held_out))} == held_out
    drawn = {p.meta["key"] for s in range(5) for p in task.problems("train", 400, seed=s)}
    assert drawn == space - held_out
    with pytest.raises(ValueError, match=f"only {len(held_out)} distinct test problems"):
        task.problems("test", len(held_out) + 1)


def test_symmetric_problems_share_one_key():
    by_key = {}
    for p in get_task("arithmetic", max_digits=1, ops="+*").problems("train", 2000):
        by_key.setdefault(p.meta["key"], set()).add(p.id)
    assert any(len(ids) == 2 for ids in by_key.values())  # 3+5 and 5+3 are the same key
    assert all(
        split_of("arithmetic", f"{min(a, b)}+{max(a, b)}") == split_of("arithmetic", f"{min(b, a)}+{max(b, a)}")
        for a in range(10)
        for b in range(10)
    )


# --- answers and worked reasoning ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,knobs", KNOB_SETS)
def test_every_problem_answer_passes_its_own_check_and_the_reasoning_ends_with_it(name, knobs):
    task = get_task(name, **knobs)
    for split in ("train", "test"):
        for p in task.problems(split, 150, seed=7):
            assert p.task == name and p.prompt and p.reasoning
            assert task.check(p.answer, p) is True, p
            assert p.reasoning.endswith(f"so {p.answer}"), p
            assert task.check(None, p) is False


@pytest.mark.parametrize(
    "a,op,b,text",
    [
        (47, "+", 38, "7+8=15, write 5 carry 1. 4+3+1=8, write 8. so 85"),
        (95, "+", 17, "5+7=12, write 2 carry 1. 9+1+1=11, write 1 carry 1. write 1. so 112"),
        (347, "+", 8, "7+8=15, write 5 carry 1. 4+0+1=5, write 5. 3+0=3, write 3. so 355"),
        (52, "-", 38, "2-8 borrow, 12-8=4, write 4. 5-1-3=1, write 1. so 14"),
        (105, "-", 98, "5-8 borrow, 15-8=7, write 7. 0-1-9 borrow, 10-1-9=0, write 0. 1-1-0=0, write 0. so 7"),
        (47, "*", 8, "7*8=56, write 6 carry 5. 4*8+5=37, write 7 carry 3. write 3. so 376"),
        (47, "*", 38, "47*8=376. 47*3=141, shift 1410. 376+1410=1786. so 1786"),
    ],
)
def test_arithmetic_working_matches_hand_worked_examples(a, op, b, text):
    assert worked(a, op, b) == (text, {"+": a + b, "-": a - b, "*": a * b}[op])


def test_arithmetic_working_is_correct_step_by_step():
    # every equation in the working is true, and the written digits, read back left to right, are the answer
    task = get_task("arithmetic", min_digits=1, max_digits=4)
    for p in task.problems("train", 400, seed=11):
        for lhs, rhs in re.findall(r"(?:^|[ ,.] ?)(1?[\d+\-*]+)=(\d+)", p.reasoning):
            assert eval(lhs) == int(rhs), (lhs, rhs, p.reasoning)  # digits and + - * only, from our own generator
        digits = re.findall(r"write (\d)", p.reasoning)
        assert int("".join(reversed(digits))) == int(p.answer), p.reasoning
        assert int(p.answer) == eval(f"{p.meta['a']}{p.meta['op']}{p.meta['b']}") >= 0


def test_arithmetic_check_accepts_equivalent_numbers_only():
    task = get_task("arithmetic")
    p = Problem(id="1234+0", task="arithmetic", prompt="What is 1234 + 0?", answer="1234")
    assert all(task.check(s, p) for s in ["1234", " 1,234 ", "1234.", "1234.0", "x = 1234"])
    assert not any(task.check(s, p) for s in ["1243", "12 34", "", "one thousand", "1234x"])


def test_countdown_instances_are_solvable_by_their_known_chain():
    task = get_task("countdown", count=4, max_number=30, max_target=300)
    for p in task.problems("train", 300, seed=5):
        numbers, target = p.meta["numbers"], p.meta["target"]
        value, used = evaluate(p.answer)
        assert value == target and sorted(used) == numbers and target not in numbers
        assert p.prompt == f"Use the numbers {', '.join(map(str, numbers))} to make {target}."
        steps = re.findall(r"(\d+)([+\-*/])(\d+)=(\d+)\.", p.reasoning)
        assert len(steps) == 3 and int(steps[-1][3]) == target
        for x, op, y, z in steps:
            assert Fraction(eval(f"{x}{op}{y}")) == int(z) > 0


def test_countdown_rules_knob_adds_the_rules_to_the_prompt():
    p = get_task("countdown", rules=True).problems("train", 1)[0]
    assert p.prompt.endswith("each number at most once; answer with the expression.")


COUNTDOWN = Problem(
    id="3,5,25->60",
    task="countdown",
    prompt="Use the numbers 3, 5, 25 to make 60.",
    answer="(25-5)*3",
    meta={"numbers": [3, 5, 25], "target": 60},
)


@pytest.mark.parametrize(
    "expr", ["(25-5)*3", "3*(25-5)", " 3 * (25 - 5) ", "(25-5)*3 = 60", "3×(25-5)", "((25-5))*3", "(25-5)*(3)"]
)
def test_countdown_check_accepts_any_valid_expression(expr):
    assert get_task("countdown").check(expr, COUNTDOWN) is True


def test_countdown_check_accepts_fraction_intermediates_and_unused_numbers():
    p = Problem(id="", task="countdown", prompt="", answer="3/4*8", meta={"numbers": [3, 4, 8, 9], "target": 6})
    assert get_task("countdown").check("3/4*8", p)  # 3/4 is not an integer, but exact division keeps it right


@pytest.mark.parametrize(
    "expr,why",
    [
        ("25+25+5+5", "reuses 25 and 5"),
        ("(25-5)*3+0", "0 is not given"),
        ("60", "60 is not given"),
        ("(25-5)*5", "wrong value and reuses 5"),
        ("25-5*3", "wrong value"),
        ("(25-5)*3 = 61", "claims a wrong target"),
        ("x*3", "unknown name"),
        ("abs(-60)", "a call"),
        ("__import__('os').system('echo hacked')", "import"),
        ("(lambda: 60)()", "lambda"),
        ("25/(5-5)*3", "division by zero"),
        ("5**3", "power"),
        ("60.0", "float literal"),
        ("-3*-20", "unary minus"),
        ("[60][0]", "subscript"),
        ("", "empty"),
        ("(" * 500 + "60" + ")" * 500, "too long / too deep"),
        ("25 5 3", "not an expression"),
    ],
)
def test_countdown_check_rejects_invalid_expressions(expr, why):
    assert get_task("countdown").check(expr, COUNTDOWN) is False, why


def test_countdown_evaluate_raises_a_clear_error_and_never_executes_code():
    with pytest.raises(ValueError, match="not allowed"):
        evaluate("__import__('os').getcwd()")
    with pytest.raises(ValueError, match="division by zero"):
        evaluate("1/(2-2)")
    with pytest.raises(ValueError, match="longer than"):
        evaluate("1+" * 200 + "1")
    assert evaluate("(25-5)*3") == (60, [25, 5, 3])


def test_countdown_check_without_meta_takes_numbers_and_target_from_the_gold_expression():
    task = get_task("countdown")
    bare = Problem(id="", task="countdown", prompt="", answer="(25-5)*3")
    assert task.check("3*(25-5)", bare) is True
    assert task.check("25*3-5", bare) is False
    assert task.check("3*20", bare) is False  # 20 is not among 3, 5, 25
    assert task.check("3*(25-5)", Problem(id="", task="countdown", prompt="", answer="oops(")) is None


def test_linear_answers_satisfy_the_equation_in_the_prompt():
    task = get_task("linear", negatives=True, two_sided=0.5)
    for p in task.problems("train", 300, seed=2):
        lhs, rhs = re.fullmatch(r"Solve for x: (.+) = (.+)\.", p.prompt).groups()
        x = int(p.answer)
        side = lambda s, x=x: eval(re.sub(r"(\d*)x", lambda m: f"({m.group(1) or 1}*{x})", s))
        assert side(lhs) == side(rhs), p
        for lhs_, rhs_ in re.findall(r"(-?[\d+\-/]+)=(-?\d+)\.", p.reasoning):
            assert Fraction(eval(lhs_)) == int(rhs_), p.reasoning


def test_linear_check_reads_plain_or_assigned_answers():
    task = get_task("linear")
    p = Problem(id="", task="linear", prompt="Solve for x: 3x + 7 = 22.", answer="5")
    assert task.check("5", p) and task.check("x = 5", p) and task.check("5.0", p)
    assert not task.check("6", p) and not task.check("x", p)


def test_default_reasoning_is_short_enough_for_a_tiny_context():
    # the headline run trains with ~128-256 tokens of context; the tokenizer splits digits one per token,
    # so characters bound tokens from above
    for name in SYNTHETIC:
        lengths = [len(p.prompt) + len(p.reasoning) + len(p.answer) for p in get_task(name).problems("train", 300)]
        assert max(lengths) < 200, (name, max(lengths))


# --- benchmarks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,split,count",
    [
        ("gsm8k", "test", 1319),
        ("gsm8k", "train", 7473),
        ("math500", "test", 500),
        ("aime24", "test", 30),
        ("amc23", "test", 40),
    ],
)
def test_benchmark_loaders_read_the_shared_files_whole(shared_data, name, split, count):
    problems = load_benchmark(name, split, data_dir=shared_data)
    assert len(problems) == count and len({p.id for p in problems}) == count
    assert all(p.task == name and p.prompt.strip() and p.answer.strip() and p.reasoning is None for p in problems)
    assert all(R1_MATH_INSTRUCTION not in p.prompt for p in problems)


def test_gsm8k_gold_is_the_text_after_the_hashes_without_commas(shared_data):
    raw = [json.loads(line) for line in open(shared_data / "gsm8k" / "test.jsonl")]
    problems = load_benchmark("gsm8k", data_dir=shared_data)
    assert problems[0].answer == "18" and problems[0].prompt.startswith("Janet’s ducks lay 16 eggs")
    with_commas = [i for i, r in enumerate(raw) if "," in r["answer"].split("####")[-1]]
    assert with_commas, "the test file has answers like 1,000"
    for i in with_commas:
        assert problems[i].answer == raw[i]["answer"].split("####")[-1].strip().replace(",", "")
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in problems)


def test_math500_keeps_level_subject_and_its_own_ids(shared_data):
    problems = load_benchmark("math500", data_dir=shared_data)
    assert problems[0].id == "test/precalculus/807.json"
    assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert problems[0].meta["level"] == 2 and problems[0].meta["subject"] == "Precalculus"
    assert Counter(p.meta["level"] for p in problems).keys() == {1, 2, 3, 4, 5}


def test_aime_and_amc_golds_are_integers_as_strings(shared_data):
    aime = load_benchmark("aime24", data_dir=shared_data)
    amc = load_benchmark("amc23", data_dir=shared_data)
    raw_aime = [json.loads(line)["answer"] for line in open(shared_data / "aime24" / "test.jsonl")]
    assert "025" in raw_aime and aime[raw_aime.index("025")].answer == "25"
    assert amc[0].answer == "27"  # stored as 27.0
    assert all(re.fullmatch(r"-?\d+", p.answer) for p in aime + amc)
    assert "-1" in [p.answer for p in amc]  # one AMC answer is negative


def test_benchmark_task_samples_a_seeded_subset_in_file_order(shared_data):
    task = get_task("aime24", data_dir=str(shared_data))
    full = task.problems()
    sub = task.problems(n=10, seed=1)
    assert len(full) == 30 and len(sub) == 10 and sub == task.problems(n=10, seed=1) != task.problems(n=10, seed=2)
    assert [full.index(p) for p in sub] == sorted(full.index(p) for p in sub)
    assert task.check("025", full[[p.answer for p in full].index("25")]) is True


def test_benchmark_data_dir_comes_from_r1lab_data(tmp_path, monkeypatch):
    (tmp_path / "amc23").mkdir()
    (tmp_path / "amc23" / "test.jsonl").write_text(json.dumps({"id": 7, "question": "1+1?", "answer": 2.0}) + "\n")
    monkeypatch.setenv("R1LAB_DATA", str(tmp_path))
    [p] = load_benchmark("amc23")
    assert (p.id, p.prompt, p.answer) == ("7", "1+1?", "2")


def test_missing_benchmark_data_names_every_path_tried(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(benchmarks, "_REPO", tmp_path / "repo")  # hide the real ../shared/data
    (tmp_path / "nowhere").mkdir()  # a data folder without this benchmark (one that does not exist is an error)
    monkeypatch.setenv("R1LAB_DATA", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_benchmark("math500")
    msg = str(e.value)
    for d in (tmp_path / "nowhere", tmp_path.parent / "shared" / "data", tmp_path / "shared" / "data"):
        assert str(d / "math500" / "test.jsonl") in msg
    assert "HuggingFaceH4/MATH-500" in msg and "no network" in msg and "R1LAB_DATA" in msg


def test_benchmark_errors_for_unknown_names_and_splits():
    with pytest.raises(ValueError, match="unknown benchmark 'math'.*math500"):
        load_benchmark("math")
    with pytest.raises(ValueError, match="aime24 has no 'train' split; it has test"):
        load_benchmark("aime24", "train")
