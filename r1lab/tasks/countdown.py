"""Countdown: reach a target from given numbers with + - * /, each number used at most once.

    Use the numbers 3, 5, 25 to make 60.   25-5=20. 20*3=60. so (25-5)*3   answer: (25-5)*3

Instances are generated from a known solution (a chain through all the numbers, every intermediate value a
positive integer), which is the worked reasoning. `check` accepts any valid expression, judged by `evaluate`:
a safe `ast` walk over non-negative integer literals, + - * / and parentheses, in exact Fractions.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from r1lab.tasks import Problem, SyntheticTask

OPS = "+-*/"
MAX_EXPRESSION_CHARS = 200
_BINOPS = {
    ast.Add: lambda x, y: x + y,
    ast.Sub: lambda x, y: x - y,
    ast.Mult: lambda x, y: x * y,
    ast.Div: lambda x, y: x / y,
}
RULES = " Use + - * / and each number at most once; answer with the expression."


@dataclass
class Countdown(SyntheticTask):
    """`count` numbers in 1..max_number and a target in 2..max_target reachable by a chain through all of them.
    `rules=True` appends the rules to the prompt (for pretrained models; a tiny model learns them from data)."""

    count: int = 3
    max_number: int = 25
    max_target: int = 100
    ops: str = OPS
    rules: bool = False
    name: ClassVar[str] = "countdown"

    def __post_init__(self):
        if self.count < 2:
            raise ValueError(f"count must be >= 2 (got {self.count})")
        if self.max_number < 2 or self.max_target < 2:
            raise ValueError(f"max_number and max_target must be >= 2 (got {self.max_number}, {self.max_target})")
        bad = set(self.ops) - set(OPS)
        if not self.ops or bad:
            raise ValueError(f"ops must be a non-empty string of {OPS!r} (got {self.ops!r})")

    def sample(self, rng: random.Random) -> tuple[str, Problem]:
        for _ in range(10_000):
            chain = [rng.randint(1, self.max_number) for _ in range(self.count)]
            steps = _random_chain(rng, chain, self.ops)
            if steps is None:
                continue
            target = steps[-1][3]
            if not 2 <= target <= self.max_target or target in chain:
                continue  # out of range, or trivially one of the given numbers
            numbers = sorted(chain)
            expression = chain_expression(chain[0], [(op, y) for _, op, y, _ in steps])
            listed = ", ".join(map(str, numbers))
            reasoning = " ".join(f"{x}{op}{y}={z}." for x, op, y, z in steps) + f" so {expression}"
            key = f"{listed}->{target}"
            return key, Problem(
                id=key.replace(" ", ""),
                task=self.name,
                prompt=f"Use the numbers {listed} to make {target}." + (RULES if self.rules else ""),
                answer=expression,
                reasoning=reasoning,
                meta={"numbers": numbers, "target": target},
            )
        raise RuntimeError(f"countdown: no solvable instance found with knobs {self}; widen max_target or ops")

    def check(self, predicted: str | None, problem: Problem) -> bool | None:
        """Any expression using the given numbers at most once whose value is the target. The numbers and target
        come from meta, else from the gold expression (whose chain uses all the numbers); None if neither parses."""
        numbers, target = problem.meta.get("numbers"), problem.meta.get("target")
        if numbers is None or target is None:
            try:
                gold_value, gold_numbers = evaluate(problem.answer)
            except ValueError:
                return None
            numbers = gold_numbers if numbers is None else numbers
            target = gold_value if target is None else target
        if predicted is None:
            return False
        expression, _, claimed = predicted.partition("=")
        try:
            value, used = evaluate(expression)
            if claimed.strip() and evaluate(claimed)[0] != Fraction(target):
                return False
        except ValueError:
            return False
        return value == Fraction(target) and not Counter(used) - Counter(int(n) for n in numbers)


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses. Raises ValueError for anything
    but non-negative integer literals, + - * /, parentheses, and for division by zero."""
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/")
    if not text:
        raise ValueError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters ({len(text)})")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an arithmetic expression: {text!r} ({type(e).__name__})") from None
    used: list[int] = []
    return _eval(tree.body, used), used


def _eval(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, used), _eval(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        used.append(node.value)
        return Fraction(node.value)
    raise ValueError(f"not allowed in a countdown expression: {ast.dump(node)[:80]}")


def chain_expression(first: int, steps: list[tuple[str, int]]) -> str:
    """((first op y1) op y2)... written with only the parentheses it needs."""
    text, prec = str(first), 3
    for op, y in steps:
        op_prec = 1 if op in "+-" else 2
        if op_prec > prec:
            text = f"({text})"
        text, prec = f"{text}{op}{y}", op_prec
    return text


def _random_chain(rng: random.Random, chain: list[int], ops: str) -> list[tuple[int, str, int, int]] | None:
    """Steps (x, op, y, result) through `chain` with random allowed ops; every result a positive integer and no
    step a no-op (* 1, / 1). None when some step has no allowed op."""
    acc, steps = chain[0], []
    for y in chain[1:]:
        allowed = [
            op
            for op in ops
            if (
                op == "+"
                or (op == "-" and acc > y)
                or (op == "*" and acc > 1 and y > 1)
                or (op == "/" and y > 1 and acc % y == 0)
            )
        ]
        if not allowed:
            return None
        op = rng.choice(allowed)
        z = {"+": acc + y, "-": acc - y, "*": acc * y, "/": acc // y}[op]
        steps.append((acc, op, y, z))
        acc = z
    return steps
