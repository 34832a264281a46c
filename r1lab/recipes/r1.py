"""DeepSeek-R1's four stages in miniature, on top of the r1zero recipe's models (made first when missing), each
evaluated on the same held-out problems as r1zero:

  1. cold start: the R1-Zero model (the paper's source of cold-start data) answers train problems; the correct,
     well-formed replies that think, longest first, fine-tune the base model;
  2. reasoning RL: GRPO on that model, with a language-consistency reward beside accuracy and format;
  3. rejection sampling: the stage-2 model answers more train problems; its correct, readable replies fine-tune
     the base model again (2 epochs, as in the paper);
  4. final RL: GRPO on the stage-3 model.

Replies are written in the r1zero format every stage shares (` <think> ... </think> <answer> ... </answer>` after
the R1-Zero template): the tiny base model was pretrained on it, so stages differ only in their weights.

    <out>/r1/   cold_start/ reasoning_rl/ rejection_sft/ final_rl/, eval_<stage>.json, summary.json, report
A data stage holds data.jsonl, data_stats.json and sft/ (whose model/ is the stage's model).
"""

from __future__ import annotations

from pathlib import Path

from r1lab.recipes import r1zero
from r1lab.recipes.settings import PipelineConfig
from r1lab.recipes.stages import (
    begin,
    data_headline,
    eval_settings,
    evaluate,
    finish,
    grpo_config,
    headline,
    run_grpo,
    teach,
)

STAGES = [
    ("cold_start", "1 cold-start SFT"),
    ("reasoning_rl", "2 reasoning RL"),
    ("rejection_sft", "3 rejection sampling + SFT"),
    ("final_rl", "4 final RL"),
]


def r1zero_models(cfg: PipelineConfig, progress: bool, log) -> tuple[Path, Path]:
    """(base model, R1-Zero RL model): the r1zero recipe's, run first (and evaluated, and reported) when missing."""
    from r1lab import config

    base, rl = r1zero.models(cfg)
    if not ((rl / "config.json").is_file() and (Path(cfg.out) / "summary.json").is_file()):
        log(f"[r1zero] the {cfg.recipe} recipe starts from the r1zero recipe's models: running its stages in {cfg.out}")
        r1zero.run(config.merge(cfg, {"recipe": "r1zero"}), progress=progress, log=log)
    return base, rl


def run(cfg: PipelineConfig, progress: bool = True, log=print) -> dict:
    base, teacher = r1zero_models(cfg, progress, log)
    out = Path(cfg.out) / "r1"
    st, s = begin(cfg, out), cfg.r1

    def evaluated(name: str, model: Path) -> dict:
        path = out / f"eval_{name}.json"
        st.run(f"eval_{name}", path, lambda: evaluate(model, cfg, path))
        return evaluate(model, cfg, path)

    evals = {}
    d1 = out / "cold_start"
    log(
        f"[1/4] cold start: the R1-Zero model answers {s.cold_start_problems} train problems x {s.k}; the longest "
        f"correct replies fine-tune the base model -> {d1}"
    )
    st.run(
        "cold_start",
        d1 / "sft" / "model",
        lambda: teach(
            d1, teacher, base, cfg, s, s.cold_start_problems, s.cold_start_per_problem, True, cfg.seed + 1, progress
        ),
    )
    evals["cold_start"] = evaluated("cold_start", d1 / "sft" / "model")

    g2 = grpo_config(cfg, out / "reasoning_rl", d1 / "sft" / "model", s.rl_steps, s.language_weight)
    log(f"[2/4] reasoning RL: {s.rl_steps} GRPO steps, rewards {', '.join(g2.rewards)} -> {g2.out}")
    st.run("reasoning_rl", Path(g2.out) / "model", lambda: run_grpo(g2, progress))
    evals["reasoning_rl"] = evaluated("reasoning_rl", Path(g2.out) / "model")

    d3 = out / "rejection_sft"
    log(
        f"[3/4] rejection sampling: the stage-2 model answers {s.rejection_problems} train problems x {s.k}; "
        f"the correct, readable replies fine-tune the base model -> {d3}"
    )
    st.run(
        "rejection_sft",
        d3 / "sft" / "model",
        lambda: teach(
            d3,
            Path(g2.out) / "model",
            base,
            cfg,
            s,
            s.rejection_problems,
            s.rejection_per_problem,
            False,
            cfg.seed + 2,
            progress,
        ),
    )
    evals["rejection_sft"] = evaluated("rejection_sft", d3 / "sft" / "model")

    g4 = grpo_config(
        cfg, out / "final_rl", d3 / "sft" / "model", s.final_rl_steps, s.language_weight, seed=cfg.seed + 4
    )
    log(f"[4/4] final RL: {s.final_rl_steps} GRPO steps -> {g4.out}")
    st.run("final_rl", Path(g4.out) / "model", lambda: run_grpo(g4, progress))
    evals["final_rl"] = evaluated("final_rl", Path(g4.out) / "model")

    root = Path(cfg.out)
    stages = {
        "base": dict(label="base model", **headline(evaluate(base, cfg, root / "eval_base.json")["summary"])),
        "r1zero": dict(
            label="R1-Zero (GRPO on the base)", **headline(evaluate(teacher, cfg, root / "eval_final.json")["summary"])
        ),
    }
    for name, label in STAGES:
        stages[name] = dict(label=label, **headline(evals[name]["summary"]), seconds=st.wall(name))
    summary = {
        "recipe": "r1",
        "task": cfg.task,
        "task_args": cfg.task_args,
        "eval": eval_settings(cfg),
        "stages": stages,
        "data": {n: data_headline(out / n / "data_stats.json") for n in ("cold_start", "rejection_sft")},
        **st.times(),
    }
    return finish(out, summary, {"reasoning RL": out / "reasoning_rl", "final RL": out / "final_rl"}, log)
