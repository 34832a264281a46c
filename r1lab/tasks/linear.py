"""Linear equations in one unknown with integer solutions, solved by moving terms then dividing.

Solve for x: 3x + 7 = 22.        3x=22-7=15. x=15/3=5. so 5
Solve for x: 5x + 3 = 2x + 15.   5x-2x=3x. 3x=15-3=12. x=12/3=4. so 4
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from r1lab.tasks import Problem, SyntheticTask
from r1lab.tasks.answers import parse_number


@dataclass
class LinearEquation(SyntheticTask):
    """`a x + b = c` (and `a x + b = d x + e` for a `two_sided` share): a in 2..max_coef, constants in
    1..max_const in size, x in 0..max_x, or -max_x..max_x with `negatives` (which also allows negative sides)."""

    max_coef: int = 9
    max_const: int = 20
    max_x: int = 10
    negatives: bool = False
    two_sided: float = 0.0
    name: ClassVar[str] = "linear"

    def __post_init__(self):
        if self.max_coef < 2 and not self.two_sided:
            raise ValueError(f"max_coef must be >= 2 (got {self.max_coef})")
        if self.two_sided and self.max_coef < 3:
            raise ValueError(f"two-sided equations need max_coef >= 3 (got {self.max_coef})")
        if self.max_const < 1 or self.max_x < 1:
            raise ValueError(f"max_const and max_x must be >= 1 (got {self.max_const}, {self.max_x})")
        if not 0.0 <= self.two_sided <= 1.0:
            raise ValueError(f"two_sided is a share of problems, in [0, 1] (got {self.two_sided})")

    def sample(self, rng: random.Random) -> tuple[str, Problem]:
        while True:
            x = rng.randint(-self.max_x if self.negatives else 0, self.max_x)
            b = rng.randint(1, self.max_const) * rng.choice((1, -1))
            if rng.random() < self.two_sided:
                d = rng.randint(1, self.max_coef - 2)
                a = rng.randint(d + 2, self.max_coef)
                e = (a - d) * x + b
                if e == 0 or (e < 0 and not self.negatives):
                    continue
                lhs, rhs = _linear(a, b), _linear(d, e)
                reasoning = f"{a}x-{d}x={a - d}x. {a - d}x={e}{_signed(-b)}={e - b}. x={e - b}/{a - d}={x}. so {x}"
                key = f"{a},{b},{d},{e}"
            else:
                a = rng.randint(2, self.max_coef)
                c = a * x + b
                if c < 0 and not self.negatives:
                    continue
                lhs, rhs = _linear(a, b), str(c)
                reasoning = f"{a}x={c}{_signed(-b)}={c - b}. x={c - b}/{a}={x}. so {x}"
                key = f"{a},{b},{c}"
            return key, Problem(
                id=key,
                task=self.name,
                prompt=f"Solve for x: {lhs} = {rhs}.",
                answer=str(x),
                reasoning=reasoning,
                meta={"x": x},
            )

    def check(self, predicted: str | None, problem: Problem) -> bool | None:
        value = parse_number(predicted)
        return value is not None and value == int(problem.answer)


def _linear(coef: int, const: int) -> str:
    """`3x + 7`, `3x - 7`, or `x + 7` for a unit coefficient."""
    return f"{'' if coef == 1 else coef}x {'+' if const >= 0 else '-'} {abs(const)}"


def _signed(v: int) -> str:
    return f"+{v}" if v >= 0 else f"-{-v}"
