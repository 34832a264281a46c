"""What every recipe's stages share: resumable timed stages, the held-out evaluation (cached), the stage configs
built from the pipeline's, SFT data made from a teacher's filtered samples, and the paired comparison of two
models on the same problems.

A recipe directory holds `config.yaml`, `timings.json` ({stage: {"wall": s, "cpu": s}}), one directory per
training stage, `eval_<stage>.json` per evaluation, `summary.json` and the report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from r1lab import config
from r1lab.reasoning import split_reasoning
from r1lab.recipes.settings import PipelineConfig
from r1lab.train.grpo import GRPOConfig


def load_json(path: Path):
    """A JSON file's content, or None when it is missing or torn (a stage that did not finish writing it)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Stages:
    """A recipe directory's stages: one found finished (its output exists) is skipped and keeps the wall and CPU
    seconds it took; CPU seconds count every thread of this process."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / "timings.json"
        self.seconds = load_json(self.path) or {}
        self.started = time.perf_counter()

    def run(self, name: str, output: Path, fn: Callable[[], object]) -> None:
        if Path(output).exists() and name in self.seconds:
            return
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        self.seconds[name] = {"wall": round(time.perf_counter() - t0, 1), "cpu": round(time.process_time() - c0, 1)}
        self.path.write_text(json.dumps(self.seconds, indent=1))

    def wall(self, name: str) -> float:
        return self.seconds[name]["wall"]

    def total(self) -> float:
        return round(sum(v["wall"] for v in self.seconds.values()), 1)

    def times(self) -> dict:
        """What a summary records of the time spent."""
        return {
            "wall_seconds": self.total(),
            "stage_seconds": self.seconds,
            "this_invocation_seconds": round(time.perf_counter() - self.started, 1),
        }


def begin(cfg: PipelineConfig, directory: Path) -> Stages:
    """A recipe's directory with its resolved config, and its stage timings so far."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save(cfg, directory / "config.yaml")
    return Stages(directory)


# ----------------------------------------------------------------------------- evaluation


def evaluate(model_dir: Path, cfg: PipelineConfig, path: Path) -> dict:
    """R1-protocol evaluation of a model directory on the task's held-out problems with the pipeline's eval settings
    and the RL template (every stage of every recipe alike), cached in `path`."""
    cached = load_json(path)
    if cached:
        return cached
    from r1lab.eval import EvalConfig, EvalTemplate, load_problems, local_generator, write_report
    from r1lab.eval import evaluate as run_eval
    from r1lab.model.load import load_model_and_tokenizer
    from r1lab.tools import make_tool

    model, tok = load_model_and_tokenizer(model_dir)
    e = cfg.eval
    ecfg = EvalConfig(
        task=cfg.task,
        task_args=cfg.task_args or {},
        limit=e.limit,
        k=e.k,
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_new_tokens,
        seed=0,
        template=cast(EvalTemplate, cfg.grpo.template),
    )  # checked by GRPOConfig.validate
    tools = make_tool(cfg.grpo.tools, tok, cfg.grpo.tool_limits)  # the tool RL had, for every model evaluated
    result = run_eval(local_generator(model, tok, cfg.grpo.template, tools=tools), load_problems(ecfg), ecfg)
    write_report(result, path)
    announce(model_dir, cfg, result["summary"])
    return result


def announce(model_dir: Path, cfg: PipelineConfig, summary: dict) -> None:
    """A new evaluation of a model the pipeline trained (one under its --out; a --base-model is left alone) joins its
    model card and its stage's tracker runs."""
    from r1lab.model_card import add_evaluation
    from r1lab.trackers import report_evaluation

    if Path(model_dir).resolve().is_relative_to(Path(cfg.out).resolve()):
        add_evaluation(model_dir, summary)
        report_evaluation(Path(model_dir).parent, cfg.report_to, summary)


def headline(summary: dict) -> dict:
    """The figures a recipe's table shows of one evaluation."""
    return {
        k: summary[k]
        for k in ("greedy", "pass@1", "cons@k", "think_share", "tool_share", "mean_length")
        if k in summary
    }


def eval_settings(cfg: PipelineConfig) -> dict:
    e = cfg.eval
    return {
        "problems": e.limit,
        "k": e.k,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "max_new_tokens": e.max_new_tokens,
    }


def compare(a: dict, b: dict) -> dict:
    """pass@1 of evaluation `a` against `b` on the same held-out problems: the difference with a 95% interval from
    the paired per-problem differences, and which is ahead (or neither, inside the interval)."""
    x = {r["id"]: r["pass@1"] for r in a["records"] if not r.get("skipped")}
    y = {r["id"]: r["pass@1"] for r in b["records"] if not r.get("skipped")}
    diffs = [x[i] - y[i] for i in x if i in y]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n) if n > 1 else float("inf")
    winner = "first" if mean - half > 0 else "second" if mean + half < 0 else "neither"
    return {
        "first_pass@1": a["summary"]["pass@1"],
        "second_pass@1": b["summary"]["pass@1"],
        "difference": mean,
        "interval95": half if math.isfinite(half) else None,
        "problems": n,
        "winner": winner,
    }


# ----------------------------------------------------------------------------- training stages


def grpo_config(
    cfg: PipelineConfig, out: Path, model: Path, steps: int, language_weight: float = 0.0, **extra
) -> GRPOConfig:
    """The pipeline's GRPO settings for one stage: its directory, starting model, steps and task."""
    rewards, weights = list(cfg.grpo.rewards), list(cfg.grpo.reward_weights)
    if language_weight and "language" not in rewards:
        rewards, weights = rewards + ["language"], weights + [language_weight]
    return config.merge(
        cfg.grpo,
        {
            "out": str(out),
            "model": str(model),
            "seed": cfg.seed,
            "tasks": [cfg.task],
            "task_args": {cfg.task: cfg.task_args},
            "steps": steps,
            "rewards": rewards,
            "reward_weights": weights,
            "report_to": cfg.report_to,
            **extra,
        },
    )


def run_grpo(gcfg: GRPOConfig, progress: bool) -> Path:
    from r1lab.train.grpo import grpo

    grpo(gcfg, progress=progress)
    return Path(gcfg.out) / "model"


def run_pretrain(pcfg, progress: bool) -> Path:
    from r1lab.train.pretrain import pretrain

    pretrain(pcfg, progress=progress)
    return Path(pcfg.out) / "model"


def r1zero_reply(message: str) -> str:
    """A kept reply (R1's `<think>\\n...\\n</think>\\n\\nanswer`) in the format the tiny models were pretrained on,
    ` <think> reasoning </think> answer`: what follows the R1-Zero template's "Assistant:"."""
    reasoning, answer = split_reasoning(message)
    think = f"{reasoning} " if reasoning else ""
    return f" <think> {think}</think> {answer}"


def select_longest(kept: list[dict], per_problem: int, need_reasoning: bool = False) -> list[dict]:
    """At most `per_problem` records per problem, the longest reasoning first (ties: the order sampled), in the
    order the problems came; `need_reasoning` drops replies with an empty think block."""
    by_id: dict[str, list[dict]] = {}
    for r in kept:
        by_id.setdefault(r["id"], []).append(r)
    out = []
    for group in by_id.values():
        lengths = [len(split_reasoning(r["messages"][-1]["content"])[0] or "") for r in group]
        order = sorted(range(len(group)), key=lambda i: -lengths[i])
        out += [group[i] for i in order if lengths[i] or not need_reasoning][:per_problem]
    return out


def make_sft_data(
    out: Path,
    teacher: Path,
    cfg: PipelineConfig,
    problems: int,
    k: int,
    per_problem: int,
    need_reasoning: bool,
    seed: int,
    progress: bool,
) -> dict:
    """Teacher samples on train problems -> rejection sampling (r1lab.distill: finished, well-formed, correct,
    one language, no duplicates) -> the longest `per_problem` per problem -> `out/data.jsonl` in the r1zero
    format; returns the counts (also in `out/data_stats.json`). A finished dataset is reused."""
    from r1lab.distill import DistillConfig, filter_samples, load_problems, sample_teacher, write_dataset

    stats = out / "data_stats.json"
    if (out / "data.jsonl").is_file() and stats.is_file():
        return json.loads(stats.read_text())
    dcfg = DistillConfig(
        out=str(out),
        teacher=str(teacher),
        student=str(teacher),
        tasks=[cfg.task],
        task_args={cfg.task: cfg.task_args or {}},
        problems=problems,
        k=k,
        temperature=cfg.eval.temperature,
        top_p=cfg.eval.top_p,
        max_new_tokens=cfg.grpo.max_new_tokens,
        teacher_template="r1zero",
        seed=seed,
    )
    probs = load_problems(dcfg)
    passed, counts = filter_samples(sample_teacher(dcfg, probs, progress), probs)
    kept = select_longest(passed, per_problem, need_reasoning)
    for r in kept:
        r["messages"][-1]["content"] = r1zero_reply(r["messages"][-1]["content"])
    lengths = [len(split_reasoning(r["messages"][-1]["content"])[0] or "") for r in kept]
    counts.update(
        k=k,
        passed=len(passed),
        kept=len(kept),
        problems_with_kept=len({r["id"] for r in kept}),
        per_problem=per_problem,
        need_reasoning=need_reasoning,
        teacher=str(teacher),
        mean_reasoning_chars=round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
    )
    if not kept:
        raise ValueError(
            f"no sample of {teacher} passed the filters ({counts['candidates']} candidates, rejected: "
            f"{ {k: v for k, v in counts['rejected'].items() if v} }); raise k or the number of problems"
        )
    write_dataset(kept, counts, out)
    return counts


def sft_on_data(out: Path, model: Path, cfg: PipelineConfig, epochs: int, lr: float, rows: int, progress: bool) -> Path:
    """Fine-tune `model` on `out/data.jsonl` with the r1zero template -> `out/sft/model`."""
    from r1lab.train.sft import SFTConfig, sft

    scfg = SFTConfig(
        out=str(out / "sft"),
        model=str(model),
        data=str(out / "data.jsonl"),
        template="r1zero",
        epochs=epochs,
        seq_len=cfg.pretrain.seq_len,
        rows=rows,
        lr=lr,
        warmup=2,
        bf16=cfg.pretrain.bf16,
        eval_fraction=0.05,
        log_every=5,
        save_every=100,
        seed=cfg.seed,
        device="cpu",
        report_to=list(cfg.report_to),
    )
    sft(scfg, progress=progress)
    return out / "sft" / "model"


def teach(
    out: Path,
    teacher: Path,
    student: Path,
    cfg: PipelineConfig,
    settings,
    problems: int,
    per_problem: int,
    need_reasoning: bool,
    seed: int,
    progress: bool,
) -> Path:
    """A data stage: the teacher's filtered samples (`make_sft_data`), then SFT of the student on them."""
    make_sft_data(out, teacher, cfg, problems, settings.k, per_problem, need_reasoning, seed, progress)
    return sft_on_data(out, student, cfg, settings.sft_epochs, settings.sft_lr, settings.sft_rows, progress)


def data_headline(path: Path) -> dict:
    """The counts of a data stage that a summary shows."""
    c = json.loads(Path(path).read_text())
    return {
        "problems": c["problems"],
        "k": c["k"],
        "candidates": c["candidates"],
        "passed": c["passed"],
        "kept": c["kept"],
        "mean_reasoning_chars": c["mean_reasoning_chars"],
        "rejected": {k: v for k, v in c["rejected"].items() if v},
    }


def finish(out: Path, summary: dict, rl_runs: dict[str, Path], log) -> dict:
    """Write summary.json and the report (r1lab.recipes.report), print the table, return the summary."""
    from r1lab.recipes.report import render, write_report

    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_report(out, summary, rl_runs)
    log(render(summary))
    log(f"report: {out / 'report.html'} and {out / 'report.md'}")
    return summary
