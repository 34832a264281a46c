"""Code rewards in TRL's shape: all hidden tests pass (1/0) and the fraction passing, judged in the real sandbox;
None when the sandbox cannot judge, never a silent 0."""

from __future__ import annotations

import pytest

from r1lab import rewards, sandbox
from r1lab.sandbox import backends
from r1lab.tasks import get_task

pytestmark = pytest.mark.skipif(sandbox.unavailable() is not None, reason=f"{sandbox.unavailable()}")


def _rows(problems):
    return {
        "task": [p.task for p in problems],
        "meta": [p.meta for p in problems],
        "answer": [p.answer for p in problems],
    }


def _local_fraction(code: str, tests: list[str]) -> float:
    """Independent reference: run our own (trusted) program and its asserts in this process."""
    passed = 0
    for test in tests:
        namespace: dict = {}
        exec(code, namespace)
        try:
            exec(test, namespace)
            passed += 1
        except AssertionError:
            pass
    return passed / len(tests)


def test_code_rewards_score_right_wrong_partial_and_missing_code():
    problems = [p for p in get_task("pyfunc", kinds="int").problems("test", n=30, seed=0)][:3]
    partial = "def f(x): return {} if x > 0 else -999".format(problems[2].answer.split("return ", 1)[1])
    completions = [
        f"<think> {problems[0].reasoning} </think> <answer> {problems[0].answer} </answer>",
        "<think> hmm </think> <answer> def f(x): return 12345 </answer>",
        f"```python\n{partial}\n```",
        "<think> never closes",
    ]
    cols = _rows(problems + problems[:1])
    passed = rewards.get_reward("code")(completions, **cols)
    fraction = rewards.get_reward("code_fraction")(completions, **cols)
    assert passed[0] == 1.0 and passed[1] == 0.0 and passed[3] == 0.0
    assert fraction[0] == 1.0 and fraction[1] == 0.0 and fraction[3] == 0.0
    assert fraction[2] == pytest.approx(_local_fraction(partial, problems[2].meta["tests"]))
    assert passed[2] == float(fraction[2] == 1.0)


def test_accuracy_reward_takes_the_program_out_of_a_code_reply():
    p = get_task("humaneval").problems()[2]
    reply = (
        "<think>\nmod 1\n</think>\n```python\ndef truncate_number(number: float) -> float:\n"
        "    return number % 1.0\n```"
    )
    assert rewards.accuracy([reply, "<think>x</think> no code here?"], **_rows([p, p])) == [1.0, 0.0]


def test_code_rewards_say_none_when_the_sandbox_cannot_judge(monkeypatch):
    monkeypatch.setattr(backends, "_bwrap_problem", lambda: backends.INSTALL.format(why="is not installed"))
    monkeypatch.setattr(backends, "_default", "bwrap")
    p = get_task("pyfunc").problems("test", n=1)[0]
    with pytest.warns(RuntimeWarning, match="bubblewrap"):
        assert rewards.code_passed([f"<answer>{p.answer}</answer>"], **_rows([p])) == [None]
    with pytest.warns(RuntimeWarning):
        assert rewards.code_fraction([f"<answer>{p.answer}</answer>"], **_rows([p])) == [None]


def test_code_rewards_refuse_rows_of_a_task_that_is_not_code():
    with pytest.raises(ValueError, match="code task"):
        rewards.code_passed(["<answer>4</answer>"], task=["arithmetic"], meta=[{}], answer=["4"])
