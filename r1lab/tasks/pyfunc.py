"""Small Python functions from a one-line spec, judged by hidden tests in the sandbox: R1-Zero on code, sized for the
tiny model (programs are a dozen to thirty tokens).

    f(x): add 3, then multiply by 2.         x+3. (x+3)*2.                   def f(x): return (x+3)*2
    f(xs): keep the even ones, times 3, sum. keep x%2==0. x*3. sum.          def f(xs): return sum(x*3 for x in xs if x%2==0)
    f(s): reverse it.                        s[::-1].                        def f(s): return s[::-1]

The canonical key is the program itself, so two specs of the same program fall in the same split. Hidden tests
call f on random inputs; their expected values come from running the reference program here (trusted code we wrote).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from r1lab.sandbox import Limits
from r1lab.tasks import Problem, SyntheticTask
from r1lab.tasks.code import CodeTask

KINDS = ("int", "list", "str")

# name -> (words, code template over `e` (the expression so far) and `k`, precedence of the result)
INT_OPS = {
    "add": ("add {k}", "{e}+{k}", 1), "sub": ("subtract {k}", "{e}-{k}", 1), "mul": ("multiply by {k}", "{e}*{k}", 2),
    "div": ("floor-divide by {k}", "{e}//{k}", 2), "mod": ("take it mod {k}", "{e}%{k}", 2),
    "sq": ("square it", "{e}*{e}", 2),
}
FILTERS = {"even": ("keep the even ones", "x%2==0"), "odd": ("keep the odd ones", "x%2==1"),
           "gt": ("keep those over {k}", "x>{k}"), "lt": ("keep those under {k}", "x<{k}")}
MAPS = {"mul": ("times {k}", "x*{k}"), "add": ("plus {k}", "x+{k}"), "sq": ("squared", "x*x")}
REDUCES = {"sum": ("sum", "sum({g})"), "count": ("count", "len([{g}])"), "max": ("max, 0 if none", "max([{g}], default=0)"),
           "list": ("as a list", "[{g}]")}
STR_OPS = {"rev": ("reverse it", "s[::-1]"), "upper": ("upper-case it", "s.upper()"),
           "count": ("count the letter {c}", "s.count('{c}')"), "head": ("first {k} letters", "s[:{k}]"),
           "twice": ("repeat it {k} times", "s*{k}"), "swap": ("replace {c} by {d}", "s.replace('{c}', '{d}')")}
LETTERS = "abcde"


@dataclass
class PyFunc(CodeTask, SyntheticTask):
    """One function `f` per problem: an integer chain of 1..`steps` operations (`int`), a filter/map/reduce over a
    list (`list`), or one string operation (`str`); constants in 2..`max_const`; `n_tests` hidden tests each."""

    steps: int = 2
    kinds: str = "int,list"
    max_const: int = 9
    n_tests: int = 5
    name: ClassVar[str] = "pyfunc"
    limits: ClassVar[Limits] = Limits(cpu_seconds=2, wall_seconds=5.0)

    def __post_init__(self):
        kinds = [k.strip() for k in self.kinds.split(",") if k.strip()]
        if not kinds or set(kinds) - set(KINDS):
            raise ValueError(f"kinds must be a comma-separated list of {', '.join(KINDS)} (got {self.kinds!r})")
        if self.steps < 1 or self.max_const < 2 or self.n_tests < 1:
            raise ValueError(f"pyfunc needs steps >= 1, max_const >= 2 and n_tests >= 1 (got steps={self.steps}, "
                             f"max_const={self.max_const}, n_tests={self.n_tests})")
        self._kinds = kinds

    def sample(self, rng: random.Random) -> tuple[str, Problem]:
        kind = rng.choice(self._kinds)
        arg, spec, body, reasoning = getattr(self, f"_{kind}")(rng)
        code = f"def f({arg}): return {body}"
        tests = self._tests(rng, kind, code)
        problem = Problem(id=code, task=self.name, prompt=f"f({arg}): {spec}.", answer=code,
                          reasoning=f"{reasoning} so {code}", meta={"entry_point": "f", "tests": tests, "kind": kind})
        return code, problem

    def tests(self, problem: Problem) -> list[str]:
        return list(problem.meta["tests"])

    # ------------------------------------------------------------------------- the three kinds

    def _int(self, rng):
        expr, prec, words, steps = "x", 3, [], []
        for _ in range(rng.randint(1, self.steps)):
            op = rng.choice(list(INT_OPS))
            text, template, op_prec = INT_OPS[op]
            k = rng.randint(2, self.max_const)
            if op_prec > prec or (op == "sq" and prec < 3):  # e is the left operand (and the right one of sq)
                expr = f"({expr})"
            expr, prec = template.format(e=expr, k=k), op_prec
            words.append(text.format(k=k))
            steps.append(expr + ".")
        return "x", ", then ".join(words), expr, " ".join(steps)

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
        steps.append(f"{red}.")
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
            if kind == "int":
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
