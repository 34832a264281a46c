"""Answers graded per second on MATH-500: `answers.grade` on each gold against its reference solution's boxed answer
("right": mostly the same string, some written differently), the gold in braces ("braced": equal, but only
math-verify can tell) and the next problem's gold ("wrong": math-verify decides unless both are plain numbers).

Each set is measured in a fresh interpreter, so no cache is warm: `cold` is the first pass over its 500 pairs
(including, where grading uses worker processes, their start-up), `warm` a second pass over the same pairs. `1`
and `2` are that many threads calling `grade` at once from a thread pool (the server and reward workers grade from
threads); `main` grades in the main thread. Each figure is the best of --repeats fresh runs (the machine is shared);
CPU milliseconds per pair count this process and its grading workers, so they measure the work whatever the load.

    python bench/grading.py [--data ../shared/data] [--out bench/results/grading.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from record import versions, write_json

SETTINGS = ("main", 1, 2)
SETS = ("right", "braced", "wrong")


def pairs(data: str) -> dict[str, list[tuple[str, str]]]:
    from r1lab.tasks.answers import extract_answer
    from r1lab.tasks.benchmarks import load_benchmark

    problems = load_benchmark("math500", data_dir=data)
    right = [(extract_answer(p.meta["solution"]), p.answer) for p in problems]
    braced = [("{" + p.answer + "}", p.answer) for p in problems]
    wrong = [(problems[(i + 1) % len(problems)].answer, p.answer) for i, p in enumerate(problems)]
    return {"right": right, "braced": braced, "wrong": wrong}


def measure(data: str, setting: str, name: str) -> dict:
    """One fresh-process measurement of one set: pairs/s cold then warm, and the verdict counts."""
    from r1lab.tasks.answers import grade

    ps, out = pairs(data)[name], {}
    for phase in ("cold", "warm"):
        start, cpu = time.perf_counter(), cpu_seconds()
        if setting == "main":
            verdicts = [grade(p, g) for p, g in ps]
        else:
            with ThreadPoolExecutor(int(setting)) as pool:
                verdicts = list(pool.map(lambda pg: grade(*pg), ps))
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        out[phase] = {
            "pairs_per_s": round(len(ps) / seconds, 1),
            "cpu_ms_per_pair": round(cpu / len(ps) * 1e3, 3),
            "true": verdicts.count(True),
            "false": verdicts.count(False),
            "none": verdicts.count(None),
        }
    return out


def cpu_seconds() -> float:
    """CPU time of this process and of its live grading workers (from /proc): the work, whatever the machine's load."""
    total = time.process_time()
    pool = getattr(sys.modules.get("r1lab.tasks.grading"), "_POOL", None)  # no such module or pool: no workers
    for worker in [w for w in pool.idle + list(pool.busy) if hasattr(w, "proc")] if pool else []:
        try:
            fields = Path(f"/proc/{worker.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/grading.json")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: SETTING SET in this process, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.data, *args.one)))
        return
    result = {"versions": versions("math-verify", "sympy"), "settings": {}}
    for setting in map(str, SETTINGS):
        result["settings"][setting] = row = {}
        for name in SETS:
            runs = [
                json.loads(
                    subprocess.run(
                        [sys.executable, __file__, "--data", args.data, "--one", setting, name],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout.splitlines()[-1]
                )
                for _ in range(args.repeats)
            ]
            for phase in ("cold", "warm"):
                row[f"{name}_{phase}"] = max((r[phase] for r in runs), key=lambda r: r["pairs_per_s"])
                row[f"{name}_{phase}"]["cpu_ms_per_pair"] = min(r[phase]["cpu_ms_per_pair"] for r in runs)
        print(
            f"{setting:>5}: "
            + "  ".join(f"{k} {v['pairs_per_s']:.0f}/s {v['cpu_ms_per_pair']:.2f} ms" for k, v in row.items())
        )
    write_json(args.out, result)


if __name__ == "__main__":
    main()
