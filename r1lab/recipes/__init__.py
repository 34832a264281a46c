"""Recipes: whole stories from one command (`r1lab pipeline`), each stage a resumable directory under its output.

    r1zero.py   R1-Zero in miniature (the default): base model -> GRPO -> before/after report
    r1.py       DeepSeek-R1's four stages on top of r1zero's models
    distill.py  SFT distillation, on-policy distillation and GRPO on a smaller student, for the same time
    settings.py the pipeline's settings; stages.py what the recipes share; report.py renders a summary
Re-running with the same --out skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from r1lab import config
from r1lab.recipes.settings import RECIPES, TASK_DEFAULTS, PipelineConfig

if TYPE_CHECKING:
    from r1lab.train.grpo import GRPOConfig
    from r1lab.train.pretrain import PretrainConfig

__all__ = ["PipelineConfig", "RECIPES", "TASK_DEFAULTS", "run_pipeline"]


def run_pipeline(cfg: PipelineConfig, progress: bool = True, log=print) -> dict:
    """Check everything, then run the recipe `cfg.recipe`; returns its summary (also in summary.json)."""
    from r1lab.tasks import get_task

    cfg.validate()
    if cfg.task_args is None:
        cfg = config.merge(cfg, {"task_args": TASK_DEFAULTS.get(cfg.task, {})})
    try:  # an unknown task or knob is named now, before any stage runs
        get_task(cfg.task, **(cfg.task_args or {}))  # never None here: set just above
    except TypeError as e:
        raise ValueError(f"{e}; fix --task-args (or task_args in the YAML) for task {cfg.task!r}") from None
    check_stages(cfg)
    return importlib.import_module(f"r1lab.recipes.{cfg.recipe}").run(cfg, progress, log)


def check_stages(cfg: PipelineConfig) -> None:
    """The training stages' settings as the recipes build them, checked before the first stage runs: a bad
    --grpo.lr or student size is named now, not after minutes of pretraining."""
    from pathlib import Path

    from r1lab.recipes.distill import student_pretrain_config
    from r1lab.recipes.stages import grpo_config

    out = Path(cfg.out)
    base = Path(cfg.base_model) if cfg.base_model else out / "pretrain" / "model"
    checks: list[tuple[str, Callable[[], GRPOConfig | PretrainConfig]]] = [
        ("the grpo settings (--grpo.* flags)", lambda: grpo_config(cfg, out / "grpo", base, cfg.grpo.steps))
    ]
    if not cfg.base_model:
        checks.append(
            (
                "the pretrain settings (--pretrain.* flags)",
                lambda: config.merge(cfg.pretrain, {"tasks": [cfg.task], "task_args": {cfg.task: cfg.task_args}}),
            )
        )
    if cfg.recipe == "distill":
        checks.append(
            ("the student (--distill.student)", lambda: student_pretrain_config(cfg, base, out / "distill" / "student"))
        )
    for what, stage in checks:
        try:
            stage().validate()
        except ValueError as e:
            raise config.ConfigError(f"{what}: {e}") from None
