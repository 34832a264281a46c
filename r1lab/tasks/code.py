"""What code tasks share: taking the program out of a reply, and judging it by running its tests in the sandbox.

A code task's answer is a program, so it replaces answer extraction with `extract` (eval and the rewards call it on
the reply's content, after the thinking) and judges with tests rather than by comparing strings: `check` is True when
every test passes and None when the sandbox could not judge (unavailable, or an infrastructure error), never a silent
False.
"""

from __future__ import annotations

import re
import textwrap
from concurrent.futures import Future
from typing import ClassVar

from r1lab import sandbox
from r1lab.sandbox import Limits, Result
from r1lab.tasks import Problem

__all__ = ["CodeTask", "extract_code"]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PYTHON_TAGS = ("", "python", "py", "python3")


def extract_code(content: str | None) -> str | None:
    """The program in a reply: its last fenced Python block (``` or ```python), else what its last `<answer>` tag
    holds (the R1-Zero format), else the whole reply (a bare completion); None when that is blank."""
    if not content:
        return None
    blocks = [body for lang, body in _FENCE.findall(content) if lang.lower() in _PYTHON_TAGS]
    if blocks:
        code = blocks[-1].strip("\n")
    elif tagged := _ANSWER_TAG.findall(content):
        code = textwrap.dedent(tagged[-1].strip("\n")).strip()  # `<answer> def f(x): ... </answer>`
    else:
        code = content.strip("\n")  # a bare completion keeps its indentation (a function body)
    return code if code.strip() else None


class CodeTask:
    """Base of tasks whose answers are programs. A subclass says how a reply's code becomes the program to run
    (`program`) and which tests judge it (`tests`); each test is Python source run after the program, in its
    namespace, and passes when it raises nothing."""

    runs_code = True  # eval refuses to start without a sandbox for such a task
    limits: ClassVar[Limits] = Limits(cpu_seconds=5, wall_seconds=10.0)

    def extract(self, content: str | None) -> str | None:
        return extract_code(content)

    def program(self, code: str, problem: Problem) -> str:
        return code

    def tests(self, problem: Problem) -> list[str]:
        raise NotImplementedError

    def submit(self, code: str, problem: Problem) -> Future:
        """Run the program and its tests in the shared sandbox pool; a Future of the sandbox Result."""
        return sandbox.submit(self.program(code, problem), tests=self.tests(problem), limits=self.limits)

    def judge(self, code: str, problem: Problem) -> Result:
        return self.submit(code, problem).result()

    def check(self, predicted: str | None, problem: Problem) -> bool | None:
        """True when every test passes; None when the sandbox could not judge; False otherwise (no code included)."""
        if predicted is None:
            return False
        result = self.judge(predicted, problem)
        return result.passed if result.judged else None
