"""R1-Zero in miniature, the default `r1lab pipeline`: tokenizer -> tiny DeepSeek-V3 base model -> R1-protocol eval
-> GRPO with the R1-Zero template and accuracy + format rewards, nothing else -> eval -> report.

    <out>/pretrain/ grpo/        the two training stages (each resumable; `model/` is its final model)
    <out>/eval_base.json eval_final.json summary.json report.html report.md plots/ timings.json config.yaml
"""

from __future__ import annotations

from pathlib import Path

from r1lab import config
from r1lab.recipes.settings import PipelineConfig
from r1lab.recipes.stages import begin, eval_settings, evaluate, finish, grpo_config, headline, run_grpo, run_pretrain


def models(cfg: PipelineConfig) -> tuple[Path, Path]:
    """(base model, R1-Zero RL model) directories of a pipeline output."""
    out = Path(cfg.out)
    return (Path(cfg.base_model) if cfg.base_model else out / "pretrain" / "model"), out / "grpo" / "model"


def run(cfg: PipelineConfig, progress: bool = True, log=print) -> dict:
    out = Path(cfg.out)
    stages = begin(cfg, out)
    base, rl = models(cfg)
    if not cfg.base_model:
        pcfg = config.merge(
            cfg.pretrain,
            {
                "out": str(out / "pretrain"),
                "seed": cfg.seed,
                "tasks": [cfg.task],
                "task_args": {cfg.task: cfg.task_args},
                "report_to": cfg.report_to,
            },
        )
        log(f"[1/5] pretraining the tiny DeepSeek-V3 base model -> {pcfg.out}")
        stages.run("pretrain", base, lambda: run_pretrain(pcfg, progress))
    e = cfg.eval
    log(f"[2/5] evaluating the base model ({cfg.task}, {e.limit} held-out problems, k={e.k})")
    stages.run("eval_base", out / "eval_base.json", lambda: evaluate(base, cfg, out / "eval_base.json"))
    gcfg = grpo_config(cfg, out / "grpo", base, cfg.grpo.steps)
    log(f"[3/5] GRPO with the {gcfg.template} template and rewards {', '.join(gcfg.rewards)} -> {gcfg.out}")
    stages.run("grpo", rl, lambda: run_grpo(gcfg, progress))
    log("[4/5] evaluating the RL model")
    stages.run("eval_final", out / "eval_final.json", lambda: evaluate(rl, cfg, out / "eval_final.json"))
    log("[5/5] writing the report")
    summary = {
        "recipe": "r1zero",
        "task": cfg.task,
        "task_args": cfg.task_args,
        "eval": eval_settings(cfg),
        "base": headline(evaluate(base, cfg, out / "eval_base.json")["summary"]),
        "final": headline(evaluate(rl, cfg, out / "eval_final.json")["summary"]),
        **stages.times(),
    }
    return finish(out, summary, {"GRPO": out / "grpo"}, log)
