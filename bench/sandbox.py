"""Programs judged per second: r1lab's sandbox pool against a plain `subprocess.run([python, file])` per program.

The workload is the usual reward one: HumanEval's 164 canonical solutions, each followed by its `check` function
(the program and its tests in one file for the baseline; the program as source and `check(...)` as its test for the
sandbox), `--rounds` times over. Both sides keep `--workers` programs in flight (default: every core): the baseline
from a thread pool, the sandbox from its own pool, started and warmed before the clock starts (its start-up is
reported on its own). Every program must pass on both sides, or the figures are not written.

    python bench/sandbox.py [--workers N] [--rounds 2] [--out bench/results/sandbox.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from record import versions, write_json

from r1lab.sandbox import SandboxPool
from r1lab.tasks.humaneval import HumanEval


def workload(rounds: int) -> list[tuple[str, str]]:
    """(program, test) pairs: each canonical solution and its whole `check` call, `rounds` times."""
    task = HumanEval()
    pairs = [(p.answer, f"{p.meta['test']}\ncheck({p.meta['entry_point']})\n") for p in task.problems()]
    return pairs * rounds


def baseline(pairs, workers: int) -> dict:
    """subprocess.run([python, file]) per program, `workers` at a time."""
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, (program, test) in enumerate(pairs):
            path = Path(tmp) / f"p{i}.py"
            path.write_text(program + "\n" + test)
            files.append(str(path))

        def one(path):
            return subprocess.run([sys.executable, path], capture_output=True, timeout=60).returncode

        with ThreadPoolExecutor(workers) as ex:
            start = time.perf_counter()
            codes = list(ex.map(one, files))
            wall = time.perf_counter() - start
    return {"seconds": wall, "passed": sum(c == 0 for c in codes), "programs": len(files)}


def sandboxed(pairs, workers: int, backend: str) -> dict:
    start = time.perf_counter()
    with SandboxPool(workers=workers, backend=backend) as pool:
        for f in [pool.submit("pass") for _ in range(workers * 2)]:
            f.result()
        startup = time.perf_counter() - start
        start = time.perf_counter()
        results = [f.result() for f in [pool.submit(program, tests=[test]) for program, test in pairs]]
        wall = time.perf_counter() - start
    return {
        "seconds": wall,
        "startup_seconds": startup,
        "passed": sum(r.passed for r in results),
        "programs": len(results),
        "statuses": sorted({r.status for r in results}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="programs in flight")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the 164 HumanEval programs")
    ap.add_argument("--backends", default="bwrap,process", help="sandbox backends to measure")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sandbox.json"))
    args = ap.parse_args()

    pairs = workload(args.rounds)
    rows = {"subprocess.run": baseline(pairs, args.workers)}
    for backend in args.backends.split(","):
        rows[f"sandbox ({backend})"] = sandboxed(pairs, args.workers, backend)
    base = rows["subprocess.run"]["seconds"]
    print(
        f"{len(pairs)} HumanEval programs with their tests, {args.workers} at a time, "
        f"{len(os.sched_getaffinity(0))} cores"
    )
    print(f"{'':22} {'programs/s':>11} {'ms/program':>11} {'x baseline time':>16} {'passed':>8}")
    for name, r in rows.items():
        r["programs_per_second"] = r["programs"] / r["seconds"]
        r["ms_per_program"] = 1000 * r["seconds"] / r["programs"]
        r["time_vs_baseline"] = r["seconds"] / base
        print(
            f"{name:22} {r['programs_per_second']:11.1f} {r['ms_per_program']:11.2f} "
            f"{r['time_vs_baseline']:16.2f} {r['passed']:>4}/{r['programs']}"
        )
        if "startup_seconds" in r:
            print(f"{'':22} (pool start-up and warm-up, not timed above: {r['startup_seconds']:.2f} s)")
    if any(r["passed"] != r["programs"] for r in rows.values()):
        raise SystemExit("some canonical solutions did not pass: figures not written")
    write_json(
        args.out,
        {
            "workload": "HumanEval canonical solutions + check",
            "programs": len(pairs),
            "workers": args.workers,
            "cores": len(os.sched_getaffinity(0)),
            "results": rows,
            "target": "sandbox time per program <= 2x the baseline's",
            "versions": versions(),
        },
    )


if __name__ == "__main__":
    main()
