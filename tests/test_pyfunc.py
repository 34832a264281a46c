"""The pyfunc family's integer chains: programs with Python's precedence, worked traces that build them one step at a
time, and the knobs that size them for the tiny model (R1-Zero on code)."""

from __future__ import annotations

import ast
import re

import pytest

from r1lab.tasks import get_task
from r1lab.tasks.pyfunc import INT_OPS

# The spec's words, applied one at a time to a value: an independent reading of what f must compute.
APPLY = {
    r"add (\d)": lambda v, k: v + k,
    r"subtract (\d)": lambda v, k: v - k,
    r"subtract it from (\d)": lambda v, k: k - v,
    r"multiply by (\d)": lambda v, k: v * k,
    r"floor-divide by (\d)": lambda v, k: v // k,
    r"take it mod (\d)": lambda v, k: v % k,
    r"square it()": lambda v, k: v * v,
}


def spec_value(prompt: str, x: int) -> int:
    """f(x) computed from the prompt's words alone, step by step."""
    v = x
    for words in prompt.removeprefix("f(x): ").removesuffix(".").split(", then "):
        for pattern, op in APPLY.items():
            if m := re.fullmatch(pattern, words):
                v = op(v, int(m.group(1)) if m.group(1) else 0)
                break
        else:
            raise AssertionError(f"unknown step {words!r}")
    return v


def run(code: str, x: int) -> int:
    namespace: dict = {}
    exec(code, namespace)
    return namespace["f"](x)


def test_integer_chain_programs_compute_what_the_spec_says_with_minimal_parentheses():
    task = get_task("pyfunc", kinds="int", steps=4, min_steps=2)
    problems = task.problems("train", n=400, seed=0)
    used = {
        pattern
        for p in problems
        for words in p.prompt[6:-1].split(", then ")
        for pattern in APPLY
        if re.fullmatch(pattern, words)
    }
    assert used == set(APPLY) and len(APPLY) == len(INT_OPS)  # every operation drawn and checked
    for p in problems:
        for x in (-20, -7, -1, 0, 3, 13):
            assert run(p.answer, x) == spec_value(p.prompt, x), (p.prompt, p.answer)
    # parentheses only where Python's precedence needs them: as ast.unparse writes the same expression
    assert sum("(" in p.answer for p in problems) > 100
    for p in problems:
        body = p.answer.split("return ")[1]
        assert ast.unparse(ast.parse(body)).replace(" ", "") == body


def test_worked_trace_applies_one_step_of_the_spec_at_a_time_and_ends_with_the_program():
    task = get_task("pyfunc", kinds="int", steps=4, min_steps=1)
    for p in task.problems("train", n=100, seed=1):
        worked = [step.split(": ") for step in p.reasoning.removesuffix(".").split(". ")]
        words = p.prompt.removeprefix("f(x): ").removesuffix(".").split(", then ")
        assert [w for w, _ in worked] == words  # each step restates its instruction
        steps = [expr for _, expr in worked]
        for i, expr in enumerate(steps):
            prefix = "f(x): " + ", then ".join(words[: i + 1]) + "."
            assert all(run(f"def f(x): return {expr}", x) == spec_value(prefix, x) for x in (-9, 0, 5, 11))
            if i:
                assert steps[i - 1] in expr  # the expression so far, copied into the next step
        assert p.answer == f"def f(x): return {steps[-1]}"


@pytest.mark.parametrize("kind", ["list", "str"])
def test_list_and_string_traces_end_with_the_program_body(kind):
    for p in get_task("pyfunc", kinds=kind).problems("train", n=30, seed=2):
        assert p.reasoning.endswith(p.answer.split("return ", 1)[1] + ".")


def test_chain_length_and_operations_follow_the_knobs():
    task = get_task("pyfunc", kinds="int", steps=4, min_steps=3, int_ops="add,rsub")
    lengths = {p.prompt.count(", then ") + 1 for p in task.problems("train", n=200, seed=0)}
    assert lengths == {3, 4}
    assert all(
        set(re.findall(r"[-+*/%]+", p.answer.split("return ")[1])) <= {"+", "-"}
        for p in task.problems("train", n=50, seed=0)
    )


@pytest.mark.parametrize(
    "knobs, named",
    [
        ({"min_steps": 3, "steps": 2}, "min_steps"),
        ({"min_steps": 0}, "min_steps"),
        ({"int_ops": "add,pow"}, "int_ops"),
        ({"int_ops": ""}, "int_ops"),
        ({"fit_digits": 1}, "fit_digits"),
    ],
)
def test_bad_chain_knobs_are_refused_with_their_values(knobs, named):
    with pytest.raises(ValueError, match=named):
        get_task("pyfunc", **knobs)


@pytest.mark.parametrize("kind", ["int", "list", "str"])
def test_no_program_is_a_constant_on_its_hidden_tests(kind):
    for p in get_task("pyfunc", kinds=kind, steps=4).problems("train", n=300, seed=0):
        args = [ast.literal_eval(re.fullmatch(r"assert f\((.*)\) == .*", t).group(1)) for t in p.meta["tests"]]
        assert len({repr(run(p.answer, a)) for a in args}) > 1, p.answer  # else `return <constant>` would pass


def test_a_repeated_program_is_judged_once_and_an_unjudged_one_again(monkeypatch):
    from concurrent.futures import Future

    from r1lab.sandbox import Result
    from r1lab.tasks import code as code_tasks

    runs, verdicts = [], iter(["passed", "error", "failed", "failed"])

    def fake_submit(source, tests, limits):
        runs.append((source, tuple(tests)))
        future = Future()
        future.set_result(Result(status=next(verdicts)))
        return future

    monkeypatch.setattr(code_tasks.sandbox, "submit", fake_submit)
    task = get_task("pyfunc", kinds="int")
    p, q = task.problems("test", n=2, seed=0)
    assert [task.submit(p.answer, p).result().status for _ in range(3)] == ["passed"] * 3
    assert task.submit("def f(x): return 0", p).result().status == "error"  # the sandbox failed: not kept
    assert task.submit("def f(x): return 0", p).result().status == "failed"
    assert task.submit("def f(x): return 0", p).result().status == "failed"
    assert task.submit(p.answer, q).result().status == "failed"  # other tests, another judgement
    assert runs == [(p.answer, tuple(p.meta["tests"]))] + [("def f(x): return 0", tuple(p.meta["tests"]))] * 2 + [
        (p.answer, tuple(q.meta["tests"]))
    ]


def borrows(big: int, small: int) -> int:
    """Columns where schoolbook subtraction borrows."""
    count, borrow = 0, 0
    while big or small:
        borrow = int(big % 10 - borrow < small % 10)
        count += borrow
        big, small = big // 10, small // 10
    return count


@pytest.mark.parametrize("digits", [2, 3])
def test_fitted_lines_pass_through_the_examples_and_the_trace_works_out_the_slope(digits):
    for p in get_task("pyfunc", kinds="fit", fit_digits=digits).problems("train", n=200, seed=0):
        y0, y1 = map(int, re.fullmatch(r"f\(x\): x\*a\+b, where f\(0\)=(\d+) and f\(1\)=(\d+)\.", p.prompt).groups())
        assert (run(p.answer, 0), run(p.answer, 1)) == (y0, y1) and y1 - y0 >= 2
        assert len(str(y0)) == len(str(y1)) == digits
        trace = r"a=(\d+-\d+): .* so \d+\. b=(\d+)\. (x\*\d+\+\d+)\."
        sub, b, body = re.fullmatch(trace, p.reasoning).groups()
        assert int(b) == y0 and sub == f"{y1}-{y0}" and p.answer == f"def f(x): return {body}"
        assert f"so {y1 - y0}." in p.reasoning
        assert p.reasoning.count("borrow") == borrows(y1, y0)  # worked by columns, as arithmetic writes it
