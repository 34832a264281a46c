"""Recipes: whole stories from one command, each stage a resumable directory under runs/<name>/.

`r1zero` (the default `r1lab pipeline`): tokenizer -> tiny DeepSeek-V3 base model -> R1-protocol eval -> GRPO
with the R1-Zero template and accuracy + format rewards -> eval -> report. Re-running with the same --out skips
finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from r1lab import config as C
from r1lab.recipes_r1 import DistillSettings, R1Settings
from r1lab.train.grpo import GRPOConfig
from r1lab.train.pretrain import PretrainConfig


@dataclass
class EvalSettings:
    limit: int = 200
    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 96


@dataclass
class PipelineConfig:
    out: str = "runs/r1zero"
    recipe: str = "r1zero"
    task: str = "arithmetic"         # the task every stage uses: pretraining corpus, RL prompts, held-out eval
    task_args: dict | None = None    # the task's knobs; None: TASK_DEFAULTS for the task (none for benchmarks)
    base_model: str = ""             # start from this model directory instead of pretraining one
    seed: int = 0
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    r1: R1Settings = field(default_factory=R1Settings)                  # --recipe r1 (r1lab.recipes_r1)
    distill: DistillSettings = field(default_factory=DistillSettings)   # --recipe distill


RECIPES = ("r1zero", "r1", "distill")
# The embedded default's difficulty: two-digit + and -, where a 2M-parameter model learns column work in minutes.
TASK_DEFAULTS = {"arithmetic": {"min_digits": 2, "max_digits": 2, "ops": "+-"}}


def run_pipeline(cfg: PipelineConfig, progress: bool = True, log=print) -> dict:
    if cfg.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {cfg.recipe!r}; choose one of {', '.join(RECIPES)}")
    if cfg.task_args is None:
        cfg = C.merge(cfg, {"task_args": TASK_DEFAULTS.get(cfg.task, {})})
    from r1lab.tasks import get_task

    try:  # an unknown task or knob is named now, before any stage runs
        get_task(cfg.task, **cfg.task_args)
    except TypeError as e:
        raise ValueError(f"{e}; fix --task-args (or task_args in the YAML) for task {cfg.task!r}") from None
    if cfg.recipe != "r1zero":  # built on this recipe's stages, in <out>/<recipe>/
        from r1lab import recipes_r1

        return {"r1": recipes_r1.run_r1, "distill": recipes_r1.run_distill}[cfg.recipe](cfg, progress, log)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    C.save(cfg, out / "config.yaml")
    timings = _load_json(out / "timings.json") or {}
    t_start = time.perf_counter()

    def stage(name, fn):
        """Run a stage; a stage that resumed adds its time, one found finished (a second or less) keeps its own."""
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        if dt > 1.0 or name not in timings:
            timings[name] = round(timings.get(name, 0) + dt, 1)
        (out / "timings.json").write_text(json.dumps(timings, indent=1))
        return result

    # 1. the base model
    if cfg.base_model:
        base_dir = Path(cfg.base_model)
    else:
        pcfg = C.merge(cfg.pretrain, {"out": str(out / "pretrain"), "seed": cfg.seed, "tasks": [cfg.task],
                                      "task_args": {cfg.task: cfg.task_args}})
        log(f"[1/5] pretraining the tiny DeepSeek-V3 base model -> {pcfg.out}")
        stage("pretrain", lambda: _pretrain(pcfg, progress))
        base_dir = Path(pcfg.out) / "model"

    gcfg = C.merge(cfg.grpo, {"out": str(out / "grpo"), "model": str(base_dir), "seed": cfg.seed,
                              "tasks": [cfg.task], "task_args": {cfg.task: cfg.task_args}})
    ecfg = cfg.eval

    # 2. evaluate the base model
    log(f"[2/5] evaluating the base model ({cfg.task}, {ecfg.limit} held-out problems, k={ecfg.k})")
    base = stage("eval_base", lambda: _evaluate(base_dir, cfg, gcfg, out / "eval_base.json"))

    # 3. R1-Zero: GRPO on the base model
    log(f"[3/5] GRPO with the {gcfg.template} template and rewards {', '.join(gcfg.rewards)} -> {gcfg.out}")
    stage("grpo", lambda: _grpo(gcfg, progress))

    # 4. evaluate the RL model
    log("[4/5] evaluating the RL model")
    final = stage("eval_final", lambda: _evaluate(Path(gcfg.out) / "model", cfg, gcfg, out / "eval_final.json"))

    # 5. report
    log("[5/5] writing the report")
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 1)
    summary = {
        "recipe": cfg.recipe, "task": cfg.task, "task_args": cfg.task_args,
        "base": _headline(base["summary"]), "final": _headline(final["summary"]),
        "wall_seconds": timings["total"], "stage_seconds": {k: v for k, v in timings.items() if k != "total"},
        "this_invocation_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    from r1lab.report import write_report

    write_report(out, summary)
    log(render_summary(summary))
    log(f"report: {out / 'report.html'} and {out / 'report.md'}")
    return summary


def _pretrain(pcfg: PretrainConfig, progress: bool):
    from r1lab.train.pretrain import pretrain

    return pretrain(pcfg, progress=progress)


def _grpo(gcfg: GRPOConfig, progress: bool):
    from r1lab.train.grpo import grpo

    return grpo(gcfg, progress=progress)


def _evaluate(model_dir: Path, cfg: PipelineConfig, gcfg: GRPOConfig, path: Path) -> dict:
    """R1-protocol evaluation of a model directory on the task's held-out problems (cached in `path`)."""
    cached = _load_json(path)
    if cached:
        return cached
    from r1lab.eval import EvalConfig, evaluate, load_problems, local_generator, write_report
    from r1lab.model.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    ecfg = cfg.eval
    e = EvalConfig(task=cfg.task, task_args=cfg.task_args, limit=ecfg.limit, k=ecfg.k, temperature=ecfg.temperature,
                   top_p=ecfg.top_p, max_new_tokens=ecfg.max_new_tokens, template=gcfg.template, seed=0)
    result = evaluate(local_generator(model, tok, gcfg.template), load_problems(e), e)
    write_report(result, path)
    return result


def _headline(s: dict) -> dict:
    return {"greedy": s["greedy"], "pass@1": s["pass@1"], "cons@k": s["cons@k"], "think_share": s["think_share"],
            "mean_length": s["mean_length"]}


def render_summary(summary: dict) -> str:
    b, f = summary["base"], summary["final"]

    def row(name, key, pct=True):
        fmt = (lambda x: f"{100 * x:6.1f}%") if pct else (lambda x: f"{x:7.1f}")
        delta = f[key] - b[key]
        d = f"{100 * delta:+6.1f} pts" if pct else f"{delta:+7.1f}"
        return f"  {name:<22}{fmt(b[key])}   {fmt(f[key])}   {d}"

    lines = [f"R1-Zero in miniature ({summary['task']}, held-out problems)",
             f"  {'':<22}{'base':>7}   {'after RL':>7}   change",
             row("pass@1 (k samples)", "pass@1"), row("greedy accuracy", "greedy"), row("cons@k", "cons@k"),
             row("replies that think", "think_share"), row("mean reply tokens", "mean_length", pct=False),
             f"  wall time {summary['wall_seconds']:.0f} s"]
    return "\n".join(lines)


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
