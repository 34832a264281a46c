"""Math benchmarks as Problems: GSM8K, MATH-500, AIME 2024, AMC 2023, from local JSONL or the Hugging Face hub.

Local files are `<data_dir>/<name>/<split>.jsonl` in the layout of the sources (openai/grade-school-math,
openai/prm800k, QwenLM/Qwen2.5-Math evaluation data). The prompt is the problem text alone; the evaluation harness
adds `R1_MATH_INSTRUCTION`. Answers are graded with `answers.grade` (math-verify, exact match as fallback).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from r1lab.tasks import Problem
from r1lab.tasks.answers import grade

__all__ = ["BENCHMARKS", "Benchmark", "load_benchmark", "data_dirs"]

# name -> (hub dataset, hub config, {our split: hub split})
BENCHMARKS: dict[str, tuple[str, str | None, dict[str, str]]] = {
    "gsm8k": ("openai/gsm8k", "main", {"train": "train", "test": "test"}),
    "math500": ("HuggingFaceH4/MATH-500", None, {"test": "test"}),
    "aime24": ("HuggingFaceH4/aime_2024", None, {"test": "train"}),  # the hub copy names its only split "train"
    "amc23": ("math-ai/amc23", None, {"test": "test"}),
}
_REPO = Path(__file__).resolve().parents[2]


def data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where local benchmark data is looked for, in order: `data_dir`, else $R1LAB_DATA, ../shared/data from the
    current directory, ../shared/data from the repository."""
    if data_dir is not None:
        return [Path(data_dir)]
    env = os.environ.get("R1LAB_DATA")
    if env and not Path(env).is_dir():  # a typo here would otherwise fall through to other data, silently
        raise FileNotFoundError(
            f"R1LAB_DATA={env} is not a folder; point it at the folder holding gsm8k/, math500/, ... or unset it"
        )
    dirs = [Path(env)] if env else []
    return dirs + [Path.cwd().parent / "shared" / "data", _REPO.parent / "shared" / "data"]


def load_benchmark(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> list[Problem]:
    """All problems of a benchmark split, from `<dir>/<name>/<split>.jsonl` if one of `data_dirs` has it, else
    from the hub with `datasets` (which needs network or its cache)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    hub, config, splits = BENCHMARKS[name]
    if split not in splits:
        raise ValueError(f"{name} has no {split!r} split; it has {', '.join(splits)}")
    tried = [d / name / f"{split}.jsonl" for d in data_dirs(data_dir)]
    for path in tried:
        if path.is_file():
            rows = []
            for i, line in enumerate(path.read_bytes().splitlines(), 1):
                try:
                    if line.strip():
                        rows.append(json.loads(line))
                except ValueError as e:  # bad JSON, or not UTF-8
                    raise ValueError(
                        f"{path}:{i}: not a JSON line ({e}); restore the file or point R1LAB_DATA elsewhere"
                    ) from None
            return [_problem(name, split, i, row) for i, row in enumerate(rows)]
    try:
        import datasets

        rows = datasets.load_dataset(hub, config, split=splits[split])
    except Exception as e:
        where = ", ".join(str(p) for p in tried)
        raise FileNotFoundError(
            f"benchmark {name!r} ({split}) not found: no file at {where}, and datasets.load_dataset({hub!r}) failed "
            f"({type(e).__name__}: {str(e)[:200]}); put the JSONL there, set R1LAB_DATA, or allow hub access"
        ) from e
    return [_problem(name, split, i, dict(row)) for i, row in enumerate(rows)]


def _problem(name: str, split: str, index: int, row: dict) -> Problem:
    """One row of any of the sources as a Problem; ids and gold answers as each benchmark's convention has them."""
    try:
        if name == "gsm8k":
            solution, _, final = row["answer"].rpartition("####")
            return Problem(
                id=f"{split}/{index}",
                task=name,
                prompt=row["question"],
                answer=final.strip().replace(",", ""),
                meta={"solution": solution.strip()},
            )
        text = row.get("problem") or row["question"]
        if name == "math500":
            return Problem(
                id=row.get("unique_id", f"{split}/{index}"),
                task=name,
                prompt=text,
                answer=row["answer"],
                meta={"level": row.get("level"), "subject": row.get("subject"), "solution": row.get("solution")},
            )
        meta = {"url": row.get("url")} if row.get("url") else {}
        if row.get("solution"):
            meta["solution"] = row["solution"]
        return Problem(
            id=str(row.get("id", index)), task=name, prompt=text, answer=_integer_answer(row["answer"]), meta=meta
        )
    except KeyError as e:
        raise ValueError(f"{name} row {index} has no field {e}; fields are {sorted(row)}") from None


def _integer_answer(value) -> str:
    """AIME's "025" and AMC's 27.0 as "25" and "27"; anything not integral is kept as written."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    return str(int(f)) if f.is_integer() else str(value).strip()


@dataclass
class Benchmark:
    """A benchmark as a Task; the data is read on the first `problems` call."""

    name: str
    data_dir: str | None = None

    def __post_init__(self):
        if self.name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.name!r}; choose one of {', '.join(BENCHMARKS)}")

    def problems(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Problem]:
        """All problems (n=None), or a seeded sample of n of them kept in file order."""
        problems = load_benchmark(self.name, split, self.data_dir)
        if n is None or n >= len(problems):
            return problems
        if n < 0:
            raise ValueError(f"n must be >= 0 or None for all (got {n})")
        keep = sorted(random.Random(f"{self.name}/{split}/{seed}").sample(range(len(problems)), n))
        return [problems[i] for i in keep]

    def check(self, predicted: str | None, problem: Problem) -> bool | None:
        return grade(predicted, problem.answer)
