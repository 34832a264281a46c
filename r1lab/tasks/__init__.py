"""Problems with verifiable answers: synthetic generators (arithmetic, countdown, linear equations, small Python
functions) and benchmarks (GSM8K, MATH-500, AIME 2024, AMC 2023, HumanEval), behind one `Task` interface and a
registry by name. Code tasks also have `extract(content)`, which takes the program out of a reply (see tasks/code.py).

Synthetic tasks hold out a test split that training can never draw: each problem's canonical key (its operands,
order-normalised where the problem is symmetric) lands in "train" or "test" by a hash bucket (`split_of`), and
each split's sampler rejects keys of the other. The bucket does not depend on seeds or difficulty knobs.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

__all__ = [
    "Problem",
    "Task",
    "SyntheticTask",
    "R1_MATH_INSTRUCTION",
    "TEST_PER_MILLE",
    "split_of",
    "get_task",
    "list_tasks",
    "register_task",
]

# What the R1 evaluation protocol appends to a math question (DeepSeek-R1 paper, evaluation setup).
R1_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Share of each synthetic task's problem space held out as "test", in thousandths. A constant rather than a
# knob: two runs with different fractions could otherwise draw each other's held-out problems.
TEST_PER_MILLE = 100

SPLITS = ("train", "test")


@dataclass
class Problem:
    """One question with its gold answer; `reasoning` is the worked thinking (synthetic tasks only)."""

    id: str  # stable, unique within its task
    task: str  # task name, e.g. "arithmetic", "countdown", "gsm8k"
    prompt: str  # the question text, without any chat template
    answer: str  # gold final answer as a string
    reasoning: str | None = None  # worked step-by-step thinking (the content of <think>)
    meta: dict = field(default_factory=dict)  # e.g. level/subject for MATH-500, numbers/target for countdown


@runtime_checkable
class Task(Protocol):
    """A source of problems and the judge of their answers."""

    name: str

    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        """`n` problems of a split ("train" or "test"); same seed, same problems."""

    def check(self, predicted: str | None, problem: Problem) -> bool | None:
        """Is the extracted answer right? None when it cannot be judged (the gold does not parse)."""


@runtime_checkable
class ToolTask(Task, Protocol):
    """A task whose problems one Python program solves (pretraining's tool-calling examples)."""

    def tool_solution(self, problem: Problem) -> tuple[str, str]:
        """(program, what it prints) for `problem`."""


def split_of(task: str, key: str) -> str:
    """The split ("train" or "test") a synthetic problem belongs to, from its task name and canonical key alone."""
    digest = hashlib.sha256(f"{task}\x00{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 1000 < TEST_PER_MILLE else "train"


class SyntheticTask:
    """Base of the generators: subclasses draw one problem from an RNG with `sample`; this class handles seeds,
    the held-out split and de-duplication."""

    name: ClassVar[str] = ""
    default_n = {"train": 1000, "test": 200}

    def sample(self, rng: random.Random) -> tuple[str, Problem]:
        """One random problem and its canonical key (equal for problems that are the same question)."""
        raise NotImplementedError

    def check(self, predicted: str | None, problem: Problem) -> bool | None:
        raise NotImplementedError

    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        """`n` problems whose keys fall in `split` (default: 1000 train, 200 test), each with its key in
        `meta["key"]`. Test problems are distinct; train problems may repeat when the problem space is small.
        Seeded by (task, split, seed), so the two splits' streams are independent."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
        n = self.default_n[split] if n is None else n
        if n < 0:
            raise ValueError(f"n must be >= 0 (got {n})")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Problem] = []
        seen: set[str] = set()
        budget = 200 * n + 1000
        while len(out) < n and budget:
            budget -= 1
            key, problem = self.sample(rng)
            if split_of(self.name, key) != split or (split == "test" and key in seen):
                continue
            seen.add(key)
            problem.meta["key"] = key
            out.append(problem)
        if len(out) < n:
            raise ValueError(
                f"{self.name}: found only {len(out)} distinct {split} problems of the {n} asked for "
                f"with these knobs; ask for fewer or widen the knobs (more digits, larger ranges)"
            )
        return out


# name -> "module:Class"; imported on first use so that listing tasks loads nothing heavy.
_REGISTRY: dict[str, str | Callable[..., Task]] = {
    "arithmetic": "r1lab.tasks.arithmetic:Arithmetic",
    "countdown": "r1lab.tasks.countdown:Countdown",
    "linear": "r1lab.tasks.linear:LinearEquation",
    "pyfunc": "r1lab.tasks.pyfunc:PyFunc",
    "humaneval": "r1lab.tasks.humaneval:HumanEval",
    "gsm8k": "r1lab.tasks.benchmarks:Benchmark",
    "math500": "r1lab.tasks.benchmarks:Benchmark",
    "aime24": "r1lab.tasks.benchmarks:Benchmark",
    "amc23": "r1lab.tasks.benchmarks:Benchmark",
}
_BENCHMARKS = ("gsm8k", "math500", "aime24", "amc23")


def register_task(name: str):
    """Decorator adding a Task class or factory to the registry under `name`."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **knobs) -> Task:
    """A task by name with its difficulty knobs, e.g. `get_task("arithmetic", max_digits=4, ops="+-")`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(list_tasks())} (or register_task your own)")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    try:
        if name in _BENCHMARKS and isinstance(_REGISTRY[name], str):
            return factory(name, **knobs)
        return factory(**knobs)
    except TypeError as e:
        if not knobs:  # no knobs given: a bug in the task, not the user's input
            raise
        raise TaskKnobError(f"task {name!r}: {e} (knobs given: {knobs}); {_knobs_taken(factory)}") from e


class TaskKnobError(ValueError, TypeError):
    """Knobs a task does not take, or of the wrong type: a TypeError to callers, a ValueError (one line) to users."""


def _knobs_taken(factory) -> str:
    try:
        names = [
            p.name
            for p in inspect.signature(factory).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "name"
        ]
    except (TypeError, ValueError):  # a factory whose signature cannot be read
        return "see the task's docstring for its knobs"
    return f"its knobs are {', '.join(names)}" if names else "it takes no knobs"
