"""The pipeline's settings: which recipe, which task, and each stage's config (flags `--pretrain.steps`, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from r1lab import trackers
from r1lab.config import opt
from r1lab.sampler import R1_TEMPERATURE, R1_TOP_P
from r1lab.train.grpo import GRPOConfig
from r1lab.train.pretrain import PretrainConfig

RECIPES = ("r1zero", "r1", "distill")
# The embedded default's difficulty: two-digit + and -, where a 2M-parameter model learns column work in minutes.
TASK_DEFAULTS = {"arithmetic": {"min_digits": 2, "max_digits": 2, "ops": "+-"}}


@dataclass
class EvalSettings:
    """The held-out evaluation every stage of every recipe gets (the R1 protocol)."""

    limit: int = opt(200, "held-out problems (synthetic tasks draw them from the test split; benchmarks: the first N)")
    k: int = opt(4, "samples per problem for pass@1 and cons@k")
    temperature: float = opt(R1_TEMPERATURE, "sampling temperature of the k samples")
    top_p: float = opt(R1_TOP_P, "nucleus sampling of the k samples")
    max_new_tokens: int = opt(96, "most tokens per reply")


@dataclass
class R1Settings:
    """Sizes of the four-stage R1 recipe; the RL stages take their other settings from the pipeline's `grpo`."""

    cold_start_problems: int = opt(256, "train problems the R1-Zero model answers for the cold-start data")
    cold_start_per_problem: int = opt(1, "replies kept per problem: the longest correct ones that think")
    rl_steps: int = opt(30, "GRPO steps of stage 2, reasoning RL")
    rejection_problems: int = opt(256, "train problems the stage-2 model answers in stage 3")
    rejection_per_problem: int = opt(2, "replies kept per problem in stage 3")
    final_rl_steps: int = opt(20, "GRPO steps of stage 4")
    k: int = opt(4, "samples per problem when making SFT data (temperature and top-p: eval's)")
    sft_epochs: int = opt(2, "epochs of each SFT stage (the paper fine-tuned for 2)")
    sft_lr: float = opt(2e-4, "SFT learning rate (about where pretraining ended; 1e-3 made the model forget)")
    sft_rows: int = opt(8, "packed rows (of pretrain.seq_len tokens) per SFT step")
    language_weight: float = opt(0.1, "weight of the language-consistency reward in the RL stages; 0: off")


@dataclass
class DistillSettings:
    """The smaller student and the three ways of teaching it for the same wall time: SFT on the R1-Zero RL model's
    filtered samples, on-policy distillation from that model, or GRPO on the student alone."""

    student: dict = opt(
        factory=lambda: {
            "num_hidden_layers": 3,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "kv_lora_rank": 64,
            "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16,
            "v_head_dim": 32,
        },
        help="overrides of pretrain.model for the dense student (0.55M parameters; a 0.26M one stayed near 2% "
        "pass@1 however taught)",
    )
    pretrain_steps: int = opt(0, "the student's pretraining steps; 0: the base model's")
    problems: int = opt(512, "train problems the teacher answers for the SFT data")
    k: int = opt(4, "teacher samples per problem")
    per_problem: int = opt(2, "replies kept per problem, longest reasoning first")
    sft_epochs: int = opt(2, "epochs of the student's SFT")
    sft_lr: float = opt(2e-4, "SFT learning rate")
    sft_rows: int = opt(8, "packed rows per SFT step")
    onpolicy_lr: float = opt(2e-5, "learning rate of on-policy distillation (the student's GRPO keeps grpo.lr)")
    rl_max_steps: int = opt(1000, "the on-policy and GRPO arms stop at the SFT arm's wall time, or here")


@dataclass
class PipelineConfig:
    out: str = opt("runs/r1zero", "output directory; re-running with the same one resumes")
    recipe: Literal["r1zero", "r1", "distill"] = opt("r1zero", "r1zero, r1 (the paper's four stages) or distill")
    task: str = opt("arithmetic", "the task every stage uses: pretraining corpus, RL prompts, held-out evaluation")
    task_args: dict | None = opt(
        None, "the task's knobs as JSON; none: the task's defaults (arithmetic: two-digit + and -)"
    )
    base_model: str = opt("", "start from this model directory instead of pretraining the tiny one")
    seed: int = opt(0, "seed of every stage (a stage's own seed flag is set from this)")
    report_to: list[str] = opt(
        factory=list,
        help="experiment trackers every training stage reports to (a tracker run "
        "per stage, with the pipeline's evaluation of its model): "
        "tensorboard, wandb, mlflow",
    )
    pretrain: PretrainConfig = opt(factory=PretrainConfig, help="")
    grpo: GRPOConfig = opt(factory=GRPOConfig, help="")
    eval: EvalSettings = opt(factory=EvalSettings, help="")
    r1: R1Settings = opt(factory=R1Settings, help="")
    distill: DistillSettings = opt(factory=DistillSettings, help="")

    def validate(self) -> PipelineConfig:
        """Every recipe's sizes, checked before any stage runs."""
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        r, d, e = self.r1, self.distill, self.eval
        for name, v in [
            ("r1.cold_start_problems", r.cold_start_problems),
            ("r1.cold_start_per_problem", r.cold_start_per_problem),
            ("r1.rl_steps", r.rl_steps),
            ("r1.rejection_problems", r.rejection_problems),
            ("r1.rejection_per_problem", r.rejection_per_problem),
            ("r1.final_rl_steps", r.final_rl_steps),
            ("r1.k", r.k),
            ("r1.sft_epochs", r.sft_epochs),
            ("r1.sft_rows", r.sft_rows),
            ("distill.problems", d.problems),
            ("distill.k", d.k),
            ("distill.per_problem", d.per_problem),
            ("distill.sft_epochs", d.sft_epochs),
            ("distill.sft_rows", d.sft_rows),
            ("distill.rl_max_steps", d.rl_max_steps),
            ("eval.limit", e.limit),
            ("eval.k", e.k),
            ("eval.max_new_tokens", e.max_new_tokens),
        ]:
            if v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {v})")
        if d.pretrain_steps < 0 or r.language_weight < 0:
            raise ValueError(
                f"--distill.pretrain-steps and --r1.language-weight must be >= 0 "
                f"(got {d.pretrain_steps}, {r.language_weight})"
            )
        if r.sft_lr <= 0 or d.sft_lr <= 0 or d.onpolicy_lr <= 0:
            raise ValueError(
                f"--r1.sft-lr, --distill.sft-lr and --distill.onpolicy-lr must be > 0 "
                f"(got {r.sft_lr}, {d.sft_lr}, {d.onpolicy_lr})"
            )
        if "num_hidden_layers" in d.student and d.student["num_hidden_layers"] < 1:
            raise ValueError(
                f"the student needs at least one layer (got num_hidden_layers={d.student['num_hidden_layers']})"
            )
        if not 0 <= e.temperature <= 2 or not 0 < e.top_p <= 1:
            raise ValueError(
                f"--eval.temperature must be in [0, 2] and --eval.top-p in (0, 1] (got {e.temperature}, {e.top_p})"
            )
        trackers.check(self.report_to)
        return self
