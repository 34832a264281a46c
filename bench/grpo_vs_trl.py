"""Seconds per GRPO step: r1lab's GRPOTrainer against TRL's GRPOTrainer, same model, prompts, reward and settings.

Both train the same tiny random-initialised model (saved once, loaded twice): a Qwen2ForCausalLM, whose modules both
run from `transformers` (TRL through the model's forward, r1lab through FastDecoder: its own KV cache and grouped
training layout), and r1lab's tiny DeepSeek-V3, which TRL runs as DeepseekV3ForCausalLM and r1lab natively.
A step is 16 arithmetic prompts x 8 samples = 128 completions of at most 64 new tokens at temperature 1, a
text-hash reward, beta 0, one optimiser step per batch, float32, the same torch thread count. A random model
rarely emits EOS, so the EOS logit is raised (a constant embedding direction read by the EOS row of the output
head, calibrated to a target mean length) and completions end naturally at varied lengths in both systems.

The two alternate: a TRL callback runs one r1lab step after each TRL step, so both see the same machine load.
The first --warmup steps of each are dropped; the table gives the best (and median) of the --steps that follow,
with where the time goes, and the JSON keeps every step.

    python bench/grpo_vs_trl.py [--models qwen2 native] [--warmup 3] [--steps 5] [--threads 1] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import platform
import pstats
import statistics
import tempfile
import time
import warnings
import zlib
from collections import defaultdict
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import models
import torch
from record import versions, write_json

from r1lab.runtime import settle_allocator

BENCH_FILE = Path(__file__).resolve()


def text_hash_reward(completions, **kw) -> list[float]:
    """A deterministic pseudo-random score of the completion text in [0, 1): it varies within a group but does not
    depend on length, so GRPO does not push the length distribution around and successive steps compare. (A
    text-hash reward gives empty and short completions less, and the mean length climbs from 32 to 60 in 3 steps.)"""
    return [zlib.crc32(c.encode()) % 1000 / 1000 for c in completions]


# ----------------------------------------------------------------------------- the model both systems train


@torch.no_grad()
def raise_eos(model, tok, embed: torch.Tensor, head: torch.Tensor, target_len: float) -> dict:
    """Make completions end at EOS after about `target_len` tokens: every embedding gets a strong constant component
    on one direction (it survives the random layers and the final norm, so the EOS hazard is about the same at
    every position), and the EOS row of the output head reads it with a weight found by bisection on the mean
    length of sampled completions."""
    from r1lab.sampler import Sampler, SamplingParams
    from r1lab.tasks import get_task
    from r1lab.tokenizer import render_prompt

    k, eos = 0, tok.eos_token_id
    embed[:, k] += 20 * embed.std()
    sampler = Sampler(model, tok)
    prompts = [render_prompt(tok, p.prompt, "r1") for p in get_task("arithmetic").problems("test", n=16, seed=1)]
    lo, hi = 0.0, 4.0
    for _ in range(12):
        head[eos, k] = mid = (lo + hi) / 2
        outs = sampler.generate(prompts, SamplingParams(max_new_tokens=64, n=8, seed=0))
        mean_len = sum(len(o.token_ids) for o in outs) / len(outs)
        lo, hi = (mid, hi) if mean_len > target_len else (lo, mid)
    return {"eos_weight": mid, "calibration_mean_length": mean_len}


def build_qwen2(tok, path: Path, target_len: float, size: str = "tiny") -> dict:
    model = models.qwen2(tok, size)
    eos = raise_eos(model, tok, model.get_input_embeddings().weight, model.get_output_embeddings().weight, target_len)
    models.save(model, tok, path)
    return {**models.describe(model), **eos}


def build_native(tok, path: Path, target_len: float, size: str = "tiny") -> dict:
    model = models.native(tok, size)
    eos = raise_eos(model, tok, model.model.embed_tokens.weight, model.lm_head.weight, target_len)
    models.save(model, tok, path)
    return {**models.describe(model), **eos}


# ----------------------------------------------------------------------------- timing helpers


class Clock:
    """Seconds per named phase, per step."""

    def __init__(self):
        self.step: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, fn, name):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.step[name] += time.perf_counter() - t0

        return timed

    def close(self, **extra) -> dict:
        row = {**self.step, **extra}
        self.steps.append(row)
        self.step = defaultdict(float)
        return row


@contextmanager
def patched(module, name, clock: Clock, label: str):
    original = getattr(module, name)
    setattr(module, name, clock.wrap(original, label))
    try:
        yield
    finally:
        setattr(module, name, original)


def profile_summary(prof: cProfile.Profile, n: int = 14) -> list[dict]:
    """The functions with the most self time in one profiled step."""
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_, nc, tt, ct, _) in stats.stats.items():
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({fn})" if line else fn,
                "calls": nc,
                "self_s": round(tt, 4),
                "cumulative_s": round(ct, 4),
            }
        )
    return sorted(rows, key=lambda r: -r["self_s"])[:n]


# ----------------------------------------------------------------------------- one model, both systems


def run_pair(path: Path, args) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    import r1lab.train.grpo as G
    import r1lab.train.rollout as rollout_module
    from r1lab.model.load import load_model_and_tokenizer
    from r1lab.tokenizer import render_prompt

    P, Gn, T = 16, 8, 64
    total = args.warmup + args.steps + (1 if args.profile else 0)
    tmp = Path(tempfile.mkdtemp(prefix="grpo_vs_trl_"))

    # ---- r1lab
    cfg = G.GRPOConfig(
        out=str(tmp / "r1lab"),
        model=str(path),
        tasks=["arithmetic"],
        template=args.template,
        rewards=[f"{BENCH_FILE}:text_hash_reward"],
        reward_weights=[1.0],
        steps=total,
        prompts_per_step=P,
        num_generations=Gn,
        max_new_tokens=T,
        temperature=1.0,
        top_p=1.0,
        lr=args.lr,
        warmup=0,
        beta=0.0,
        mu=1,
        bf16=args.dtype == "bfloat16",
        loss_agg="token-mean",
        seed=0,
        device=args.device,
        **({"row_tokens": args.row_tokens} if args.row_tokens else {}),
    )
    model_r, tok_r = load_model_and_tokenizer(path, device=args.device)
    r1 = G.GRPOTrainer(cfg, model=model_r, tokenizer=tok_r, resume=False, progress=False)
    r1_clock = Clock()
    r1.sampler.generate = r1_clock.wrap(r1.sampler.generate, "generate")
    r1.opt.step = r1_clock.wrap(r1.opt.step, "optimizer")
    r1.policy = r1_clock.wrap(r1.policy, "forward")  # the trainer's bound training forward (token log-probs)

    # ---- the same prompts, step by step, for TRL (r1lab draws step s's prompts from a seeded stream)
    rows = []
    for s in range(total):
        for p in r1.rollouts.draw(s, 0, P):
            rows.append({"prompt": render_prompt(tok_r, p.prompt, args.template), "answer": p.answer})
    tok_t = AutoTokenizer.from_pretrained(path)
    assert tok_t(text=[rows[0]["prompt"]])["input_ids"][0] == r1.sampler.encode(rows[0]["prompt"]), (
        "TRL and r1lab must see the same prompt tokens"
    )

    trl_clock = Clock()

    class TimedTRL(trl.GRPOTrainer):
        """TRL's trainer with stopwatches around its phases (behaviour unchanged)."""

        def _generate_single_turn(self, *a, **kw):
            with_time = trl_clock.wrap(super()._generate_single_turn, "generate")
            ids, logprobs = with_time(*a, **kw)
            trl_clock.step["completion_tokens"] += sum(len(c) for c in ids)
            trl_clock.step["completions"] += len(ids)
            trl_clock.step["truncated"] += sum(len(c) == T and c[-1] != tok_t.eos_token_id for c in ids)
            return ids, logprobs

        def _calculate_rewards(self, *a, **kw):
            return trl_clock.wrap(super()._calculate_rewards, "reward")(*a, **kw)

        def _generate_and_score_completions(self, *a, **kw):
            return trl_clock.wrap(super()._generate_and_score_completions, "rollout")(*a, **kw)

        def compute_loss(self, *a, **kw):
            return trl_clock.wrap(super().compute_loss, "forward")(*a, **kw)

        def training_step(self, *a, **kw):
            return trl_clock.wrap(super().training_step, "training_step")(*a, **kw)

    r1_profile, trl_profile = [], []

    def r1lab_step(step: int) -> None:
        prof = cProfile.Profile() if args.profile and step == total - 1 else None
        with (
            patched(rollout_module, "score", r1_clock, "reward"),
            patched(G, "packed_rows", r1_clock, "layout"),
            patched(G, "grouped_batches", r1_clock, "layout"),
        ):
            if prof:
                prof.enable()
            t0 = time.perf_counter()
            r1.model.eval()
            ro = r1.rollout(step)
            t1 = time.perf_counter()
            r1.model.train()
            stats = r1.update(ro, cfg.lr)
            t2 = time.perf_counter()
            if prof:
                prof.disable()
                r1_profile.extend(profile_summary(prof))
        flat = ro.flat
        r1_clock.close(
            total=t2 - t0,
            rollout=t1 - t0,
            update=t2 - t1,
            completions=len(flat),
            completion_tokens=sum(len(c.token_ids) for c in flat),
            truncated=sum(c.finish_reason == "length" for c in flat),
            trained_tokens=stats["trained_tokens"],
            threads=torch.get_num_threads(),
        )

    class Alternate(TrainerCallback):
        """Times each TRL optimiser step, then runs one r1lab step, so the two interleave."""

        def __init__(self):
            self.t0, self.prof = 0.0, None

        def on_step_begin(self, args_, state, control, **kw):
            if args.profile and state.global_step == total - 1:
                self.prof = cProfile.Profile()
                self.prof.enable()
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            dt = time.perf_counter() - self.t0
            if self.prof:
                self.prof.disable()
                trl_profile.extend(profile_summary(self.prof))
                self.prof = None
            trl_clock.close(total=dt, threads=torch.get_num_threads())
            r1lab_step(state.global_step - 1)

    # ---- TRL: each optimiser step generates and trains on 16 prompts x 8 = 128 completions
    # (per_device_train_batch_size 128, gradient accumulation 1 -> generation_batch_size 128, steps_per_generation 1,
    # so TRL also takes old log-probs as the detached current ones: no extra forward)
    targs = trl.GRPOConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=P * Gn,
        gradient_accumulation_steps=1,
        num_generations=Gn,
        max_completion_length=T,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        bf16=args.dtype == "bfloat16",
        fp16=False,
        use_cpu=args.device == "cpu",
        max_steps=total,
        shuffle_dataset=False,
        seed=0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )
    model_t = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = TimedTRL(
        model=model_t,
        reward_funcs=text_hash_reward,
        args=targs,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok_t,
        callbacks=[Alternate()],
    )
    torch.set_num_threads(args.threads)
    with redirect_stdout(io.StringIO()):  # TRL prints a summary dict at the end
        trainer.train()

    measured = slice(args.warmup, args.warmup + args.steps)
    out = {
        "model_class_trl": type(model_t).__name__,
        "model_class_r1lab": type(model_r).__name__,
        "trl_steps": trl_clock.steps,
        "r1lab_steps": r1_clock.steps,
        "trl": summarise(trl_clock.steps[measured], "trl"),
        "r1lab": summarise(r1_clock.steps[measured], "r1lab"),
    }
    out["ratio_best"] = out["trl"]["best_s"] / out["r1lab"]["best_s"]
    out["ratio_median"] = out["trl"]["median_s"] / out["r1lab"]["median_s"]
    if args.profile:
        out["trl_profile"], out["r1lab_profile"] = trl_profile, r1_profile
    return out


def summarise(steps: list[dict], system: str) -> dict:
    """Best and median step, and the mean seconds of each phase (phases in the order they happen)."""
    totals = [s["total"] for s in steps]
    mean = lambda k: statistics.fmean(s.get(k, 0.0) for s in steps)  # noqa: E731
    if system == "trl":
        phases = {
            "generate": mean("generate"),
            "reward": mean("reward"),
            "rollout other": mean("rollout") - mean("generate") - mean("reward"),
            "forward + loss": mean("forward"),
            "backward": mean("training_step") - mean("rollout") - mean("forward"),
            "clip + optimizer + other": mean("total") - mean("training_step"),
        }
    else:
        phases = {
            "generate": mean("generate"),
            "reward": mean("reward"),
            "rollout other": mean("rollout") - mean("generate") - mean("reward"),
            "layout": mean("layout"),
            "forward": mean("forward"),
            "optimizer": mean("optimizer"),
            "loss + backward + clip + other": mean("update") - mean("layout") - mean("forward") - mean("optimizer"),
        }
    return {
        "best_s": min(totals),
        "median_s": statistics.median(totals),
        "mean_s": statistics.fmean(totals),
        "phases_mean_s": phases,
        "mean_completion_length": sum(s["completion_tokens"] for s in steps)
        / max(1, sum(s["completions"] for s in steps)),
        "truncated_share": sum(s["truncated"] for s in steps) / max(1, sum(s["completions"] for s in steps)),
    }


def print_pair(name: str, res: dict) -> None:
    t, r = res["trl"], res["r1lab"]
    print(f"\n== {name}: TRL runs {res['model_class_trl']}, r1lab runs {res['model_class_r1lab']}")
    print(f"{'':26s}{'TRL':>10s}{'r1lab':>10s}")
    print(
        f"{'seconds/step (best)':26s}{t['best_s']:10.3f}{r['best_s']:10.3f}   r1lab is {res['ratio_best']:.2f}x faster"
    )
    print(
        f"{'seconds/step (median)':26s}{t['median_s']:10.3f}{r['median_s']:10.3f}   "
        f"r1lab is {res['ratio_median']:.2f}x faster"
    )
    print(f"{'mean completion length':26s}{t['mean_completion_length']:10.1f}{r['mean_completion_length']:10.1f}")
    print(f"{'truncated at 64':26s}{t['truncated_share']:10.2f}{r['truncated_share']:10.2f}")
    for sys_name, s in (("TRL", t), ("r1lab", r)):
        parts = "  ".join(f"{k} {v:.3f}" for k, v in s["phases_mean_s"].items())
        print(f"  {sys_name:6s} mean s/step by phase: {parts}")
    for key in ("trl_profile", "r1lab_profile"):
        if key in res:
            print(f"  {key.split('_')[0]} profile of one step, most self time:")
            for row in res[key][:8]:
                print(f"    {row['self_s']:8.3f}s {row['calls']:7d} calls  {row['function']}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["qwen2", "native"], choices=["qwen2", "native"])
    ap.add_argument("--size", default="tiny", choices=list(models.SIZES), help="the models' size (bench/models.py)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for both systems")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="bfloat16: autocast in both systems (weights and optimiser float32)",
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both (two threads on two busy cores collapse; 1 is the steadier default)",
    )
    ap.add_argument("--template", default="r1", choices=["r1", "r1zero"])
    ap.add_argument("--target-length", type=float, default=32.0, help="mean completion length the EOS boost aims at")
    ap.add_argument(
        "--lr",
        type=float,
        default=1e-6,
        help="the same for both; TRL's default. At 1e-4 a few Adam "
        "steps move the random model's EOS rate (mean length 32 -> 15 or -> 60 within 3 steps, in "
        "either direction), and the two systems would no longer time the same workload",
    )
    ap.add_argument("--row-tokens", type=int, default=0, help="r1lab's packed training row length (0: its default)")
    ap.add_argument("--profile", action="store_true", help="cProfile one extra step of each (not in the timings)")
    ap.add_argument("--out", default="bench/results/grpo_vs_trl.json")
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        ap.error(f"--warmup must be >= 0 and --steps >= 1 (got {args.warmup}, {args.steps})")
    torch.set_num_threads(args.threads)
    allocator = settle_allocator()  # the same policy as the r1lab command's, for both systems
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    datasets.disable_progress_bars()
    tok = models.build_tokenizer()
    results, built = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            path = Path(d) / name
            built[name] = (build_qwen2 if name == "qwen2" else build_native)(tok, path, args.target_length, args.size)
            torch.set_num_threads(args.threads)
            results[name] = run_pair(path, args)
            print_pair(name, results[name])
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    result = {
        "benchmark": "grpo_vs_trl",
        "models": built,
        "size": args.size,
        "device": args.device,
        "threads": args.threads,
        "load_average_at_end": load,
        "settings": {
            "prompts_per_step": 16,
            "num_generations": 8,
            "max_new_tokens": 64,
            "temperature": 1.0,
            "top_p": 1.0,
            "beta": 0.0,
            "updates_per_batch": 1,
            "dtype": args.dtype,
            "lr": args.lr,
            "template": args.template,
            "task": "arithmetic",
            "reward": "crc32 of the text % 1000 / 1000",
            "eos_target_length": args.target_length,
            "warmup_steps": args.warmup,
            "measured_steps": args.steps,
        },
        "results": results,
        "allocator": allocator,
        "versions": versions("torch", "transformers", "trl"),
        "machine": platform.processor() or platform.machine(),
    }
    print()
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
