"""Rollout throughput with the Python tool on and off: the same model, prompts and seeds through r1lab's sampler.

MODEL is a base model that calls the tool in part of its replies (`runs/tools/pretrain/model` after
`r1lab pipeline --config examples/pipeline-tools.yaml`). With tools off it still writes `<tool> ... </tool>`, but
nothing runs and it goes on writing its own `<output>`: what a sampler without a tool loop gives, the baseline.
Two workloads: a GRPO step (16 prompts x 8 samples, temperature 1) and an evaluation (64 prompts x 4 samples at
T=0.6, top-p 0.95). For each, tools off, generate()'s deterministic re-entry at several REENTRY_STEPS, the
server's re-entry as soon as a program ends ("ready"), and re-entry by a prefill of the whole context instead of
feeding the output to the row's kept cache ("prefill"); median of --repeats runs (run r uses seed r in every arm).

Reported per arm: wall seconds, the model's tokens per second, tool calls and programs run (identical programs of one
call run once), and where the time goes: decode steps, prefills of the prompts, re-entries after a tool call (feeding
the output to kept caches, or prefills), waiting for programs with nothing else to decode, and the rest (sampling
and bookkeeping in Python).

    python bench/tools.py MODEL [--repeats 3] [--threads 1] [--out bench/results/tools.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from record import versions, write_json

from r1lab import sampler as S
from r1lab.hardware import measure_matmul_peak
from r1lab.model.load import load_model_and_tokenizer
from r1lab.runtime import settle_allocator
from r1lab.tasks import get_task
from r1lab.tokenizer import render_prompt
from r1lab.tools import PythonTool

TASK = {"min_digits": 2, "max_digits": 3, "ops": "*", "mul_digits": 2, "min_mul_digits": 2}
WORKLOADS = {
    "grpo": dict(prompts=16, n=8, temperature=1.0, top_p=1.0),
    "eval": dict(prompts=64, n=4, temperature=0.6, top_p=0.95),
}


class Timed:
    """Wraps a sampler's backend: seconds in decode and in prefill (first prefills and re-entries apart)."""

    def __init__(self, sampler):
        self.s, b = sampler, sampler.backend
        self.seconds = {"decode": 0.0, "prefill": 0.0, "reentry_prefill": 0.0}
        self.calls = {"decode": 0, "prefill": 0, "reentry_prefill": 0}
        self.in_resume = False
        real_prefill, real_decode, real_resume = b.prefill, b.decode, S.Batch.resume
        real_extend = getattr(b, "extend", None)

        def prefill(*a, **k):
            key = "reentry_prefill" if self.in_resume else "prefill"
            t0 = time.perf_counter()
            out = real_prefill(*a, **k)
            self.seconds[key] += time.perf_counter() - t0
            self.calls[key] += 1
            return out

        def decode(*a, **k):
            t0 = time.perf_counter()
            out = real_decode(*a, **k)
            self.seconds["decode"] += time.perf_counter() - t0
            self.calls["decode"] += 1
            return out

        def resume(batch, entries):
            self.in_resume = True
            try:
                return real_resume(batch, entries)
            finally:
                self.in_resume = False

        def extend(*a, **k):
            t0 = time.perf_counter()
            out = real_extend(*a, **k)
            self.seconds["reentry_prefill"] += time.perf_counter() - t0
            self.calls["reentry_prefill"] += 1
            return out

        b.prefill, b.decode = prefill, decode
        if real_extend is not None:
            b.extend = extend
        self._real_resume = real_resume
        S.Batch.resume = resume

    def close(self) -> None:
        """Put the class's own resume back (each arm's timer would otherwise wrap the previous one's)."""
        S.Batch.resume = self._real_resume


def run_arm(
    model, tok, prompts, work: dict, tools: bool, reentry: str, steps: int, seed: int, keep: bool = True
) -> dict:
    default_steps, S.REENTRY_STEPS = S.REENTRY_STEPS, steps
    sampler = S.Sampler(model, tok, tools=PythonTool(tok) if tools else None, reentry=reentry)
    if not keep:  # a row back from a call is prefilled again instead of continuing its kept cache
        sampler.backend.take = None
    timed = Timed(sampler)
    params = S.SamplingParams(
        max_new_tokens=80, temperature=work["temperature"], top_p=work["top_p"], n=work["n"], seed=seed
    )
    t0 = time.perf_counter()
    try:
        outs = sampler.generate(prompts, params)
    finally:
        timed.close()
        S.REENTRY_STEPS = default_steps
    wall = time.perf_counter() - t0
    model_tokens = sum(o.model_tokens for o in outs)
    calls = [k for o in outs for k in o.tool_calls]
    split = dict(timed.seconds, tool_wait=sampler.tool_wait)
    split["other"] = wall - sum(split.values())
    return {
        "wall_seconds": wall,
        "model_tokens": model_tokens,
        "model_tokens_per_s": model_tokens / wall,
        "replies_calling": sum(bool(o.tool_calls) for o in outs) / len(outs),
        "tool_calls": len(calls),
        "programs_run": sum(not k.shared for k in calls),
        "program_seconds": sum(k.seconds for k in calls),
        "seconds": split,
        "calls": timed.calls,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--task-args", default=json.dumps(TASK))
    ap.add_argument("--out", default="bench/results/tools.json")
    args = ap.parse_args()
    settle_allocator()
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model)
    model.eval()
    task = get_task("arithmetic", **json.loads(args.task_args))
    peak = measure_matmul_peak()
    result = {
        "model": args.model,
        "threads": args.threads,
        "repeats": args.repeats,
        "matmul_peak_flops": peak,
        "versions": versions("torch"),
        "workloads": {},
    }
    arms = (
        [("off", False, "steps", S.REENTRY_STEPS, True)]
        + [(f"steps{k}", True, "steps", k, True) for k in (1, 4, 8)]
        + [("ready", True, "ready", S.REENTRY_STEPS, True), ("prefill", True, "steps", S.REENTRY_STEPS, False)]
    )
    for name, work in WORKLOADS.items():
        prompts = [render_prompt(tok, p.prompt, "r1zero") for p in task.problems("test", n=work["prompts"], seed=1)]
        run_arm(model, tok, prompts[:4], work, True, "steps", 4, 0)  # warm-up: the sandbox's workers start
        runs = {arm[0]: [] for arm in arms}
        for r in range(args.repeats):
            for arm, tools, reentry, steps, keep in arms:
                runs[arm].append(run_arm(model, tok, prompts, work, tools, reentry, steps, seed=r, keep=keep))
        out = {}
        for arm, rs in runs.items():
            med = sorted(rs, key=lambda x: x["wall_seconds"])[len(rs) // 2]
            out[arm] = dict(
                med,
                wall_seconds_all=[round(x["wall_seconds"], 3) for x in rs],
                model_tokens_per_s_median=statistics.median(x["model_tokens_per_s"] for x in rs),
            )
            s = med["seconds"]
            print(
                f"{name:<5} {arm:<7} {med['wall_seconds']:6.2f} s  {med['model_tokens_per_s']:7.0f} tok/s  "
                f"calls {med['replies_calling']:4.0%} of replies, {med['programs_run']:3d} programs run "
                f"({med['program_seconds']:.2f} s)  decode {s['decode']:.2f}  prefill {s['prefill']:.2f}  "
                f"re-entry {s['reentry_prefill']:.2f}  waiting {s['tool_wait']:.2f}  other {s['other']:.2f}"
            )
        result["workloads"][name] = {"settings": work, "arms": out}
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s (float32, {args.threads} thread(s))")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
