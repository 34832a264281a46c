"""The RL objectives side by side: the R1-Zero GRPO stage of the main job run once per objective, from the same
pretrained base model and seed, each evaluated on the same held-out problems with the R1 protocol.

Arms: clip (PPO/GRPO's surrogate), gspo (sequence-level ratio), cispo (clipped importance weight on a REINFORCE
term), each with and without token-level truncated importance sampling against the sampler's log-probs. With one
update per rollout batch the three objectives take the same gradient (their ratios are exactly 1 on the first pass;
tests/test_losses.py shows it), so the arms run `--mu` updates per batch (default 2), where they differ. Everything
else is the main job's GRPO stage (`r1lab pipeline`'s defaults).

    python bench/objectives.py [--base runs/r1zero/pretrain/model] [--mu 2] [--steps 40]
                               [--out bench/results/objectives.json]

Without --base the base model is pretrained first, as the main job does (about 4.5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from record import versions, write_json

from r1lab import config
from r1lab.recipes import PipelineConfig
from r1lab.recipes.settings import TASK_DEFAULTS
from r1lab.recipes.stages import evaluate, grpo_config, run_grpo, run_pretrain
from r1lab.runtime import set_threads, settle_allocator

OBJECTIVES = {  # name -> GRPO settings (GSPO's clip range is per sequence, much tighter; CISPO's weight cap as TRL's)
    "clip": dict(policy_loss="clip"),
    "gspo": dict(policy_loss="gspo", epsilon_low=3e-4, epsilon_high=4e-4),
    "cispo": dict(policy_loss="cispo", epsilon_low=1.0, epsilon_high=4.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="a pretrained base model directory (default: pretrain one)")
    ap.add_argument("--work", default="runs/bench-objectives", help="where the runs are written")
    ap.add_argument("--mu", type=int, default=2, help="updates per rollout batch")
    ap.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the main job's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/objectives.json")
    args = ap.parse_args()
    set_threads(args.threads)
    settle_allocator()
    from r1lab.hardware import measure_matmul_peak

    peak = measure_matmul_peak(torch.float32)
    work = Path(args.work)
    cfg = PipelineConfig(out=str(work), task_args=TASK_DEFAULTS["arithmetic"])
    base = Path(args.base) if args.base else work / "pretrain" / "model"
    if not args.base:
        t0 = time.perf_counter()
        run_pretrain(
            config.merge(
                cfg.pretrain,
                {
                    "out": str(work / "pretrain"),
                    "seed": cfg.seed,
                    "tasks": [cfg.task],
                    "task_args": {cfg.task: cfg.task_args},
                },
            ),
            True,
        )
        print(f"pretrained the base model in {time.perf_counter() - t0:.0f} s")
    rows = [dict(arm="base model", **_figures(evaluate(base, cfg, work / "eval_base.json")))]
    for name, settings in OBJECTIVES.items():
        for correction in ("none", "token-truncate"):
            arm = name + (" + truncated IS" if correction != "none" else "")
            gcfg = grpo_config(
                cfg,
                work / f"{name}-{correction}",
                base,
                args.steps or cfg.grpo.steps,
                mu=args.mu,
                rollout_correction=correction,
                correction_high=2.0,
                **settings,
            )
            t0 = time.perf_counter()
            model = run_grpo(gcfg, progress=True)
            wall = time.perf_counter() - t0
            ev = _figures(evaluate(model, cfg, work / f"eval_{name}-{correction}.json"))
            rows.append(dict(arm=arm, grpo_seconds=round(wall, 1), **ev))
            print(_row(rows[-1]))
    print("\n".join(["", _header()] + [_row(r) for r in rows]))
    print(f"  matmul peak {peak / 1e9:.0f} GFLOP/s float32 on {args.threads} threads")
    write_json(
        args.out,
        {
            "rows": rows,
            "mu": args.mu,
            "steps": args.steps or cfg.grpo.steps,
            "threads": args.threads,
            "matmul_peak_flops": peak,
            "machine": platform.processor() or platform.machine(),
            "eval": {"problems": cfg.eval.limit, "k": cfg.eval.k},
            **versions("torch"),
        },
    )


def _figures(result: dict) -> dict:
    s = result["summary"]
    return {
        "pass@1": s["pass@1"],
        "greedy": s["greedy"],
        "think_share": s["think_share"],
        "mean_length": s["mean_length"],
    }


def _header() -> str:
    return f"  {'':<26}{'pass@1':>8}{'greedy':>8}{'thinks':>8}{'tokens':>8}{'GRPO s':>8}"


def _row(r: dict) -> str:
    sec = f"{r['grpo_seconds']:8.0f}" if "grpo_seconds" in r else f"{'':>8}"
    return (
        f"  {r['arm']:<26}{100 * r['pass@1']:7.1f}%{100 * r['greedy']:7.1f}%{100 * r['think_share']:7.1f}%"
        f"{r['mean_length']:8.1f}{sec}"
    )


if __name__ == "__main__":
    main()
