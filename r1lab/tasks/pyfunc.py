"""Small Python functions from a one-line spec, judged by hidden tests in the sandbox: R1-Zero on code, sized for the
tiny model (programs are a dozen to thirty tokens).

    f(x): add 3, then multiply by 2, then subtract it from 7.                                        (int)
        add 3: x+3. multiply by 2: (x+3)*2. subtract it from 7: 7-(x+3)*2.      def f(x): return 7-(x+3)*2
    f(x): x*a+b, where f(0)=23 and f(1)=61.                                                          (fit)
        a=61-23: 1-3 borrow, 11-3=8, write 8. 6-1-2=3, write 3. so 38. b=23. x*38+23.   def f(x): return x*38+23
    f(xs): keep the even ones, times 3, sum.                                                         (list)
        keep x%2==0. x*3. sum. sum(x*3 for x in xs if x%2==0).          def f(xs): return sum(x*3 for x in xs if x%2==0)
    f(s): reverse it.                                                                                (str)
        s[::-1].                                                        def f(s): return s[::-1]

Whether thinking pays depends on the kind. An integer chain is a translation, which the tiny model learns to write at
once (measured: 90% right without thinking, 78% with, and GRPO taught it to stop thinking); a fitted line needs a
constant computed from the examples, which a bare answer can only guess, as with arithmetic.

The canonical key is the program itself, so two specs of the same program fall in the same split. Hidden tests
call f on random inputs; their expected values come from running the reference program here (trusted code we wrote).
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import ClassVar

from r1lab.sandbox import Limits
from r1lab.tasks import Problem, SyntheticTask
from r1lab.tasks.arithmetic import worked
from r1lab.tasks.code import CodeTask

KINDS = ("int", "fit", "list", "str")

# name -> (words, code over `e` (the expression so far) and `k`, the precedence `e` needs to go unparenthesised,
# the precedence of the result): Python's own (+ - below * // % below **), an unparenthesised name is 9.
INT_OPS = {
    "add": ("add {k}", "{e}+{k}", 1, 1),
    "sub": ("subtract {k}", "{e}-{k}", 1, 1),
    "rsub": ("subtract it from {k}", "{k}-{e}", 2, 1),
    "mul": ("multiply by {k}", "{e}*{k}", 2, 2),
    "div": ("floor-divide by {k}", "{e}//{k}", 2, 2),
    "mod": ("take it mod {k}", "{e}%{k}", 2, 2),
    "sq": ("square it", "{e}**2", 9, 3),
}
FILTERS = {
    "even": ("keep the even ones", "x%2==0"),
    "odd": ("keep the odd ones", "x%2==1"),
    "gt": ("keep those over {k}", "x>{k}"),
    "lt": ("keep those under {k}", "x<{k}"),
}
MAPS = {"mul": ("times {k}", "x*{k}"), "add": ("plus {k}", "x+{k}"), "sq": ("squared", "x*x")}
REDUCES = {
    "sum": ("sum", "sum({g})"),
    "count": ("count", "len([{g}])"),
    "max": ("max, 0 if none", "max([{g}], default=0)"),
    "list": ("as a list", "[{g}]"),
}
STR_OPS = {
    "rev": ("reverse it", "s[::-1]"),
    "upper": ("upper-case it", "s.upper()"),
    "count": ("count the letter {c}", "s.count('{c}')"),
    "head": ("first {k} letters", "s[:{k}]"),
    "twice": ("repeat it {k} times", "s*{k}"),
    "swap": ("replace {c} by {d}", "s.replace('{c}', '{d}')"),
}
LETTERS = "abcde"
JUDGED_CACHE = 8192  # judgements a task keeps, most recently asked for


@dataclass
class PyFunc(CodeTask, SyntheticTask):
    """One function `f` per problem: an integer chain of `min_steps`..`steps` operations drawn from `int_ops` (`int`),
    a line x*a+b from its values at 0 and 1 (`fit`), a filter/map/reduce over a list (`list`), or one string operation
    (`str`); constants in 2..`max_const`; `n_tests` hidden tests each. The worked reasoning builds the program a piece
    at a time and ends with its body."""

    steps: int = 2
    kinds: str = "int,list"
    min_steps: int = 1  # fewest operations in an integer chain
    int_ops: str = ",".join(INT_OPS)  # the integer chain's operations, a comma-separated subset of INT_OPS
    fit_digits: int = 2  # digits of a fitted line's f(0) and f(1)
    max_const: int = 9
    n_tests: int = 5
    name: ClassVar[str] = "pyfunc"
    limits: ClassVar[Limits] = Limits(cpu_seconds=2, wall_seconds=5.0)

    def __post_init__(self) -> None:
        kinds = [k.strip() for k in self.kinds.split(",") if k.strip()]
        if not kinds or set(kinds) - set(KINDS):
            raise ValueError(f"kinds must be a comma-separated list of {', '.join(KINDS)} (got {self.kinds!r})")
        if not 1 <= self.min_steps <= self.steps or self.max_const < 2 or self.n_tests < 1 or self.fit_digits < 2:
            raise ValueError(
                f"pyfunc needs 1 <= min_steps <= steps, max_const >= 2, n_tests >= 1 and fit_digits >= 2 "
                f"(got min_steps={self.min_steps}, steps={self.steps}, max_const={self.max_const}, "
                f"n_tests={self.n_tests}, fit_digits={self.fit_digits})"
            )
        ops = [o.strip() for o in self.int_ops.split(",") if o.strip()]
        if not ops or set(ops) - set(INT_OPS):
            raise ValueError(f"int_ops must be a comma-separated list of {', '.join(INT_OPS)} (got {self.int_ops!r})")
        self._kinds, self._int_ops = kinds, ops
        self._judged: OrderedDict[tuple, Future] = OrderedDict()  # (program, tests) -> its judgement, newest last
        self._lock = threading.Lock()

    def sample(self, rng: random.Random) -> tuple[str, Problem]:
        kind = rng.choice(self._kinds)
        for _ in range(100):  # a program whose tests all expect one value is redrawn: `return 3` would pass them
            arg, spec, body, reasoning = getattr(self, f"_{kind}")(rng)
            code = f"def f({arg}): return {body}"
            tests = self._tests(rng, kind, code)
            if self.n_tests == 1 or len({t.rsplit(" == ", 1)[1] for t in tests}) > 1:
                break
        problem = Problem(
            id=code,
            task=self.name,
            prompt=f"f({arg}): {spec}.",
            answer=code,
            reasoning=reasoning,
            meta={"entry_point": "f", "tests": tests, "kind": kind},
        )
        return code, problem

    def tests(self, problem: Problem) -> list[str]:
        return list(problem.meta["tests"])

    def submit(self, code: str, problem: Problem) -> Future:
        """Judge in the sandbox once per (program, tests): a GRPO group or an eval's k samples often repeat a program,
        and these programs are pure expressions. A judgement the sandbox could not make is retried, never kept."""
        key = (self.program(code, problem), tuple(self.tests(problem)))
        with self._lock:
            future = self._judged.get(key)
            if future is None or (future.done() and not future.result().judged):
                future = self._judged[key] = super().submit(code, problem)
                if len(self._judged) > JUDGED_CACHE:
                    self._judged.popitem(last=False)
            self._judged.move_to_end(key)
        return future

    # ------------------------------------------------------------------------- the kinds

    def _int(self, rng):
        """Each step of the trace restates one instruction of the spec (its constant then sits just before the code
        that uses it) and wraps the expression so far: copied, parenthesised where Python's precedence needs it."""
        expr, prec, words, steps = "x", 9, [], []
        for _ in range(rng.randint(self.min_steps, self.steps)):
            text, template, needs, result = INT_OPS[rng.choice(self._int_ops)]
            k = rng.randint(2, self.max_const)
            operand = expr if prec >= needs else f"({expr})"
            expr, prec = template.format(e=operand, k=k), result
            words.append(text.format(k=k))
            steps.append(f"{words[-1]}: {expr}.")
        return "x", ", then ".join(words), expr, " ".join(steps)

    def _fit(self, rng):
        """x*a+b from its values at 0 and 1, both of `fit_digits` digits: b is f(0), and a = f(1)-f(0) is worked out
        column by column (as the arithmetic task writes subtraction), so that constant must be computed, not copied."""
        top = 10**self.fit_digits - 1
        b = rng.randint(10 ** (self.fit_digits - 1), top - 2)
        a = rng.randint(2, top - b)
        work = worked(a + b, "-", b)[0]
        reasoning = f"a={a + b}-{b}: {work}. b={b}. x*{a}+{b}."  # b restated just before its use
        return "x", f"x*a+b, where f(0)={b} and f(1)={a + b}", f"x*{a}+{b}", reasoning

    def _list(self, rng):
        k = rng.randint(2, self.max_const)
        flt = rng.choice([None, *FILTERS])
        mp = rng.choice([None, *MAPS])
        red = rng.choice(list(REDUCES))
        if flt is None and mp is None and red == "list":
            mp = "mul"
        item = "x" if mp is None else MAPS[mp][1].format(k=k)
        gen = f"{item} for x in xs" + ("" if flt is None else f" if {FILTERS[flt][1].format(k=k)}")
        body = REDUCES[red][1].format(g=gen) if red != "sum" else f"sum({gen})"
        words = [w for w in (flt and FILTERS[flt][0].format(k=k), mp and MAPS[mp][0].format(k=k)) if w]
        words.append(REDUCES[red][0])
        steps = [s for s in (flt and f"keep {FILTERS[flt][1].format(k=k)}.", mp and f"{item}.") if s]
        steps += [f"{red}.", f"{body}."]
        return "xs", ", ".join(words), body, " ".join(steps)

    def _str(self, rng):
        op = rng.choice(list(STR_OPS))
        text, template = STR_OPS[op]
        c, d = rng.sample(LETTERS, 2)
        k = rng.randint(2, min(self.max_const, 4))
        body = template.format(k=k, c=c, d=d)
        return "s", text.format(k=k, c=c, d=d), body, f"{body}."

    def _tests(self, rng, kind, code) -> list[str]:
        namespace: dict = {}
        exec(code, namespace)  # our own reference program, to compute the expected values
        f, tests, seen = namespace["f"], [], set()
        for _ in range(20 * self.n_tests):
            if kind in ("int", "fit"):
                arg = rng.randint(-20, 20)
            elif kind == "list":
                arg = [rng.randint(-9, 9) for _ in range(rng.randint(0, 6))]
            else:
                arg = "".join(rng.choice(LETTERS) for _ in range(rng.randint(0, 8)))
            if repr(arg) in seen:
                continue
            seen.add(repr(arg))
            tests.append(f"assert f({arg!r}) == {f(arg)!r}")
            if len(tests) == self.n_tests:
                break
        return tests
