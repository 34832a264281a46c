"""Answers graded per second on MATH-500: `answers.grade` on each gold against its reference solution's boxed answer
("right": mostly the same string, some written differently), the gold in braces ("braced": equal, but only
math-verify can tell) and the next problem's gold ("wrong": math-verify decides unless both are plain numbers).

Each measurement runs in a fresh interpreter, so no cache is warm: `cold` is the first pass over the 500 pairs
(including, where grading uses a worker process, its start-up), `warm` a second pass over the same pairs. `threads`
graders call `grade` at once from a thread pool (1 = one worker thread, not the main thread: the server and the
reward workers grade from threads); `main` grades in the main thread.

    python bench/grading.py [--data ../shared/data] [--out bench/results/grading.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from record import versions, write_json

SETTINGS = ("main", 1, 2)


def pairs(data: str) -> dict[str, list[tuple[str, str]]]:
    from r1lab.tasks.answers import extract_answer
    from r1lab.tasks.benchmarks import load_benchmark

    problems = load_benchmark("math500", data_dir=data)
    right = [(extract_answer(p.meta["solution"]), p.answer) for p in problems]
    braced = [("{" + p.answer + "}", p.answer) for p in problems]
    wrong = [(problems[(i + 1) % len(problems)].answer, p.answer) for i, p in enumerate(problems)]
    return {"right": right, "braced": braced, "wrong": wrong}


def measure(data: str, setting: str) -> dict:
    """One fresh-process measurement: pairs/s for each set, cold then warm, and the verdict counts."""
    from r1lab.tasks.answers import grade

    out = {}
    for name, ps in pairs(data).items():
        for phase in ("cold", "warm"):
            start = time.perf_counter()
            if setting == "main":
                verdicts = [grade(p, g) for p, g in ps]
            else:
                with ThreadPoolExecutor(int(setting)) as pool:
                    verdicts = list(pool.map(lambda pg: grade(*pg), ps))
            seconds = time.perf_counter() - start
            out[f"{name}_{phase}"] = {"pairs_per_s": round(len(ps) / seconds, 1), "seconds": round(seconds, 3),
                                      "true": verdicts.count(True), "false": verdicts.count(False),
                                      "none": verdicts.count(None)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default="bench/results/grading.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting in this process, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.data, args.one)))
        return
    result = {"versions": versions("math-verify", "sympy"), "settings": {}}
    for setting in SETTINGS:
        run = subprocess.run([sys.executable, __file__, "--data", args.data, "--one", str(setting)],
                             capture_output=True, text=True, check=True)
        result["settings"][str(setting)] = r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{str(setting):>5}: " + "  ".join(f"{k} {v['pairs_per_s']:7.1f}/s" for k, v in r.items()))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
