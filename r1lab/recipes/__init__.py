"""Recipes: whole stories from one command (`r1lab pipeline`), each stage a resumable directory under its output.

    r1zero.py   R1-Zero in miniature (the default): base model -> GRPO -> before/after report
    r1.py       DeepSeek-R1's four stages on top of r1zero's models
    distill.py  SFT distillation, on-policy distillation and GRPO on a smaller student, for the same time
    settings.py the pipeline's settings; stages.py what the recipes share; report.py renders a summary
Re-running with the same --out skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import importlib

from r1lab import config
from r1lab.recipes.settings import RECIPES, TASK_DEFAULTS, PipelineConfig

__all__ = ["PipelineConfig", "RECIPES", "TASK_DEFAULTS", "run_pipeline"]


def run_pipeline(cfg: PipelineConfig, progress: bool = True, log=print) -> dict:
    """Check everything, then run the recipe `cfg.recipe`; returns its summary (also in summary.json)."""
    from r1lab.tasks import get_task

    cfg.validate()
    if cfg.task_args is None:
        cfg = config.merge(cfg, {"task_args": TASK_DEFAULTS.get(cfg.task, {})})
    try:  # an unknown task or knob is named now, before any stage runs
        get_task(cfg.task, **cfg.task_args)
    except TypeError as e:
        raise ValueError(f"{e}; fix --task-args (or task_args in the YAML) for task {cfg.task!r}") from None
    return importlib.import_module(f"r1lab.recipes.{cfg.recipe}").run(cfg, progress, log)
