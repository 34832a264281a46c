"""Multi-digit arithmetic (+, -, *) with the column work written out, right to left, as a tiny model can learn it.

    What is 47 + 38?   7+8=15, write 5 carry 1. 4+3+1=8, write 8. so 85
    What is 52 - 38?   2-8 borrow, 12-8=4, write 4. 5-1-3=1, write 1. so 14
    What is 47 * 8?    7*8=56, write 6 carry 5. 4*8+5=37, write 7 carry 3. write 3. so 376
    What is 47 * 38?   47*8=376. 47*3=141, shift 1410. 376+1410=1786. so 1786   (multi-digit multiplier)

With the Python tool (r1lab.tools) the same problem is one call: `tool_solution` gives its program and what it prints,
    What is 47 * 38?   <tool> print(47 * 38) </tool> <output> 1786 </output>
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from r1lab.tasks import Problem, SyntheticTask
from r1lab.tasks.answers import parse_number

OPS = "+-*"


@dataclass
class Arithmetic(SyntheticTask):
    """`a op b` with a of min_digits..max_digits digits; b likewise for + and -, and min_mul_digits..mul_digits
    digits for *. Subtractions are ordered so the result is never negative."""

    min_digits: int = 1
    max_digits: int = 3
    ops: str = OPS
    mul_digits: int = 1
    min_mul_digits: int = 1
    name: ClassVar[str] = "arithmetic"

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits (got min_digits={self.min_digits}, max_digits={self.max_digits})"
            )
        if not 1 <= self.min_mul_digits <= self.mul_digits:
            raise ValueError(
                f"need 1 <= min_mul_digits <= mul_digits (got min_mul_digits={self.min_mul_digits}, "
                f"mul_digits={self.mul_digits})"
            )
        bad = set(self.ops) - set(OPS)
        if not self.ops or bad:
            raise ValueError(f"ops must be a non-empty string of {OPS!r} (got {self.ops!r})")

    def sample(self, rng: random.Random) -> tuple[str, Problem]:
        op = rng.choice(sorted(set(self.ops)))
        a = _number(rng, rng.randint(self.min_digits, self.max_digits))
        if op == "*":
            b = _number(rng, rng.randint(self.min_mul_digits, self.mul_digits))
        else:
            b = _number(rng, rng.randint(self.min_digits, self.max_digits))
        if op == "-" and a < b:
            a, b = b, a
        key = f"{a}{op}{b}" if op == "-" else f"{min(a, b)}{op}{max(a, b)}"
        reasoning, answer = worked(a, op, b)
        return key, Problem(
            id=f"{a}{op}{b}",
            task=self.name,
            prompt=f"What is {a} {op} {b}?",
            answer=str(answer),
            reasoning=reasoning,
            meta={"a": a, "op": op, "b": b},
        )

    def check(self, predicted: str | None, problem: Problem) -> bool | None:
        value = parse_number(predicted)
        return value is not None and value == int(problem.answer)

    def tool_solution(self, problem: Problem) -> tuple[str, str]:
        """The program a reply that uses the Python tool runs, and what it prints: ("print(47 * 38)", "1786"). The
        operands are written as the question writes them, which makes them easier for a tiny model to copy."""
        m = problem.meta
        return f"print({m['a']} {m['op']} {m['b']})", problem.answer


def worked(a: int, op: str, b: int) -> tuple[str, int]:
    """The column-by-column working of `a op b` and its result."""
    if op == "+":
        return _add(a, b), a + b
    if op == "-":
        if a < b:
            raise ValueError(f"subtraction is worked only for a >= b (got {a} - {b})")
        return _sub(a, b), a - b
    if op == "*":
        return _mul(a, b), a * b
    raise ValueError(f"unknown operator {op!r}; use one of {OPS!r}")


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _digit(n: int, i: int) -> int:
    return n // 10**i % 10


def _add(a: int, b: int) -> str:
    steps, carry = [], 0
    for i in range(max(len(str(a)), len(str(b)))):
        x, y = _digit(a, i), _digit(b, i)
        s = x + y + carry
        step = f"{x}+{y}{'+1' if carry else ''}={s}, write {s % 10}"
        carry = s // 10
        steps.append(step + (" carry 1." if carry else "."))
    if carry:
        steps.append("write 1.")
    return " ".join(steps + [f"so {a + b}"])


def _sub(a: int, b: int) -> str:
    steps, borrow = [], 0
    for i in range(len(str(a))):
        x, y = _digit(a, i), _digit(b, i)
        lhs = f"{x}-1-{y}" if borrow else f"{x}-{y}"
        v = x - borrow - y
        if v >= 0:
            steps.append(f"{lhs}={v}, write {v}.")
            borrow = 0
        else:
            steps.append(f"{lhs} borrow, 1{lhs}={v + 10}, write {v + 10}.")
            borrow = 1
    return " ".join(steps + [f"so {a - b}"])


def _mul(a: int, b: int) -> str:
    if b < 10:
        steps, carry = [], 0
        for i in range(len(str(a))):
            x = _digit(a, i)
            p = x * b + carry
            step = f"{x}*{b}{f'+{carry}' if carry else ''}={p}, write {p % 10}"
            carry = p // 10
            steps.append(step + (f" carry {carry}." if carry else "."))
        if carry:
            steps.append(f"write {carry}.")
        return " ".join(steps + [f"so {a * b}"])
    steps, partials = [], []
    for j in range(len(str(b))):
        d = _digit(b, j)
        p = a * d
        partials.append(p * 10**j)
        steps.append(f"{a}*{d}={p}" + (f", shift {p * 10**j}." if j else "."))
    steps.append("+".join(map(str, partials)) + f"={a * b}.")
    return " ".join(steps + [f"so {a * b}"])
