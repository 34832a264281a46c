"""Distillation against RL on a small dense student (the R1 paper's Table 6 question, in miniature), built on the
r1zero recipe's models (made first when missing). The student is pretrained like the base model, then taught in
three ways for the same wall time:

  sft       distillation as in the paper: the R1-Zero RL model answers train problems; the student is fine-tuned
            on its filtered samples (no RL);
  onpolicy  on-policy distillation: the student samples, the R1-Zero RL model scores every sampled token, and the
            per-token reverse KL is the advantage (no reward);
  rl        GRPO on the student alone, with the accuracy and format rewards.

The SFT arm's wall time is the budget of the other two. The report compares the arms' pass@1 on the same held-out
problems, pairwise, with 95% intervals from the per-problem differences, whatever the outcome.

    <out>/distill/   student_pretrain/ distilled/ onpolicy/ student_rl/, eval_<stage>.json, summary.json, report
"""

from __future__ import annotations

from pathlib import Path

from r1lab import config
from r1lab.recipes.r1 import r1zero_models
from r1lab.recipes.settings import PipelineConfig
from r1lab.recipes.stages import (
    begin,
    compare,
    data_headline,
    eval_settings,
    evaluate,
    finish,
    grpo_config,
    headline,
    load_json,
    run_grpo,
    run_pretrain,
    teach,
)

ARMS = {
    "distilled": "student + SFT distillation",
    "onpolicy": "student + on-policy distillation",
    "student_rl": "student + GRPO",
}
PAIRS = [("distilled", "student_rl"), ("onpolicy", "student_rl"), ("distilled", "onpolicy")]


def student_pretrain_config(cfg: PipelineConfig, base: Path, out: Path):
    """The base model's pretraining (corpus, tokenizer, steps, optimiser) with the smaller dense student."""
    from r1lab.model.config import tiny_config

    model = {**cfg.pretrain.model, **cfg.distill.student}
    model["first_k_dense_replace"] = model.get("num_hidden_layers", tiny_config(8).num_hidden_layers)  # dense
    steps = cfg.distill.pretrain_steps or cfg.pretrain.steps
    pcfg = config.merge(
        cfg.pretrain,
        {
            "out": str(out),
            "seed": cfg.seed,
            "tasks": [cfg.task],
            "task_args": {cfg.task: cfg.task_args},
            "tokenizer": str(base),
            "steps": steps,
            "report_to": cfg.report_to,
        },
    )
    pcfg.model = model  # replaced, not merged: the student's own sizes
    return pcfg


def run(cfg: PipelineConfig, progress: bool = True, log=print) -> dict:
    from r1lab.model.load import model_info
    from r1lab.train.run import read_metrics

    base, teacher = r1zero_models(cfg, progress, log)
    out = Path(cfg.out) / "distill"
    st, s = begin(cfg, out), cfg.distill

    def evaluated(name: str, model: Path) -> dict:
        path = out / f"eval_{name}.json"
        st.run(f"eval_{name}", path, lambda: evaluate(model, cfg, path))
        return evaluate(model, cfg, path)

    pcfg = student_pretrain_config(cfg, base, out / "student_pretrain")
    student = Path(pcfg.out) / "model"
    log(
        f"[1/5] pretraining the dense student ({pcfg.model}) for {pcfg.steps} steps on the base model's corpus "
        f"-> {pcfg.out}"
    )
    st.run("student_pretrain", student, lambda: run_pretrain(pcfg, progress))
    evals = {"student_base": evaluated("student_base", student)}

    d = out / "distilled"
    log(
        f"[2/5] SFT distillation: the R1-Zero RL model answers {s.problems} train problems x {s.k}; the student is "
        f"fine-tuned on the correct replies -> {d}"
    )
    st.run(
        "distilled",
        d / "sft" / "model",
        lambda: teach(d, teacher, student, cfg, s, s.problems, s.per_problem, False, cfg.seed + 3, progress),
    )
    evals["distilled"] = evaluated("distilled", d / "sft" / "model")
    budget = st.wall("distilled")

    onp = grpo_config(
        cfg,
        out / "onpolicy",
        student,
        s.rl_max_steps,
        max_seconds=budget,
        save_every=20,
        teacher=str(teacher),
        rewards=[],
        reward_weights=[],
        lr=s.onpolicy_lr,
    )
    log(f"[3/5] on-policy distillation from the R1-Zero RL model for the SFT arm's {budget:.0f} s -> {onp.out}")
    st.run("onpolicy", Path(onp.out) / "model", lambda: run_grpo(onp, progress))
    evals["onpolicy"] = evaluated("onpolicy", Path(onp.out) / "model")

    rl = grpo_config(cfg, out / "student_rl", student, s.rl_max_steps, max_seconds=budget, save_every=20)
    log(f"[4/5] GRPO directly on the student for the same {budget:.0f} s -> {rl.out}")
    st.run("student_rl", Path(rl.out) / "model", lambda: run_grpo(rl, progress))
    evals["student_rl"] = evaluated("student_rl", Path(rl.out) / "model")

    log("[5/5] comparing and writing the report")
    t_info, s_info = model_info(teacher), model_info(student)
    teacher_eval = load_json(Path(cfg.out) / "eval_final.json") or evaluate(
        teacher, cfg, Path(cfg.out) / "eval_final.json"
    )
    stages = {
        "teacher": dict(label="teacher: R1-Zero RL model", **headline(teacher_eval["summary"])),
        "student_base": dict(label="student, pretrained", **headline(evals["student_base"]["summary"])),
    }
    arms = {}
    for name, label in ARMS.items():
        stages[name] = dict(label=label, **headline(evals[name]["summary"]), seconds=st.wall(name))
        rows = [r for r in read_metrics(out / name / "metrics.jsonl") if "reward_mean" in r]
        arms[name] = {
            "wall_seconds": st.wall(name),
            "cpu_seconds": st.seconds[name]["cpu"],
            "steps": rows[-1]["step"] if rows else None,
            "train_seconds": rows[-1].get("total_seconds") if rows else None,
        }
    arms["distilled"]["samples"] = data_headline(d / "data_stats.json")["kept"]
    comparisons = [dict(first=a, second=b, **compare(evals[a], evals[b])) for a, b in PAIRS]
    summary = {
        "recipe": "distill",
        "task": cfg.task,
        "task_args": cfg.task_args,
        "eval": eval_settings(cfg),
        "teacher": {
            "model": str(teacher),
            "params_total": t_info["params_total"],
            "params_active": t_info["params_active"],
        },
        "student": {
            "model": str(student),
            "params_total": s_info["params_total"],
            "params_active": s_info["params_active"],
            "config": pcfg.model,
            "pretrain_steps": pcfg.steps,
        },
        "stages": stages,
        "data": {"distilled": data_headline(d / "data_stats.json")},
        "arms": arms,
        "comparisons": comparisons,
        **st.times(),
    }
    return finish(
        out, summary, {"on-policy distillation": out / "onpolicy", "GRPO on the student": out / "student_rl"}, log
    )
