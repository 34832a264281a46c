"""The R1 recipe and distillation in miniature, built on the r1zero recipe's stages (its base model and its
R1-Zero RL model, made first when missing).

`r1` (DeepSeek-R1's four stages, each evaluated on the same held-out problems as r1zero):
  1. cold start: the R1-Zero model (the paper's source of cold-start data) answers train problems; the correct,
     well-formed replies that think, longest first, fine-tune the base model;
  2. reasoning RL: GRPO on that model, with a language-consistency reward beside accuracy and format;
  3. rejection sampling: the stage-2 model answers more train problems; its correct, readable replies fine-tune
     the base model again (2 epochs, as in the paper);
  4. final RL: GRPO on the stage-3 model.
`distill`: a smaller dense student, pretrained like the base model, then (i) fine-tuned on the R1-Zero RL model's
filtered samples (distillation, no RL) or (ii) trained with GRPO directly for the same wall time; the report
compares their pass@1 as the paper does (Table 6), whatever the outcome.

Replies are written in the r1zero format every stage shares (` <think> ... </think> <answer> ... </answer>`
after the R1-Zero template): the tiny base model was pretrained on it and the held-out eval prompts with it, so
stages differ only in their weights. R1's own chat template would add a format the base model never saw.

    <out>/r1/        cold_start/ reasoning_rl/ rejection_sft/ final_rl/, eval_<stage>.json, summary.json, report
    <out>/distill/   student_pretrain/ distilled/ student_rl/, eval_<stage>.json, summary.json, report
A data stage holds data.jsonl, data_stats.json and sft/ (whose model/ is the stage's model).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from r1lab import config as C
from r1lab.reasoning import split_reasoning

if TYPE_CHECKING:
    from r1lab.recipes import PipelineConfig
    from r1lab.train.grpo import GRPOConfig


@dataclass
class R1Settings:
    """Sizes of the four-stage R1 recipe; the RL stages take their other settings from the pipeline's `grpo`."""
    cold_start_problems: int = 256    # train problems the R1-Zero model answers for the cold-start data
    cold_start_per_problem: int = 1   # replies kept per problem: the longest correct ones that think
    rl_steps: int = 30                # stage 2, reasoning RL
    rejection_problems: int = 256     # stage 3, train problems the stage-2 model answers
    rejection_per_problem: int = 2
    final_rl_steps: int = 20          # stage 4
    k: int = 4                        # samples per problem when making SFT data (temperature and top-p: eval's)
    sft_epochs: int = 2               # the paper fine-tuned for 2 epochs
    sft_lr: float = 2e-4              # about where the base model's pretraining ended; 1e-3 made it forget (-40 pts)
    sft_rows: int = 8                 # packed rows (of pretrain.seq_len tokens) per SFT step
    language_weight: float = 0.1      # language-consistency reward in the RL stages (the paper's stage 2); 0: off


@dataclass
class DistillSettings:
    """The student and the two ways of teaching it (distillation from the R1-Zero RL model, or GRPO on it)."""
    # tiny_config overrides over pretrain.model: dense, 0.55M parameters against the teacher's 1.94M. Measured: a
    # 0.26M student (2 layers of 96) stayed near 2% pass@1 whatever it was taught; this one reaches the teacher.
    student: dict = field(default_factory=lambda: {
        "num_hidden_layers": 3, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32})
    pretrain_steps: int = 0           # 0: the base model's pretraining steps (same corpus and settings)
    problems: int = 512               # train problems the teacher answers
    k: int = 4
    per_problem: int = 2              # replies kept per problem, longest reasoning first
    sft_epochs: int = 2
    sft_lr: float = 2e-4              # about where the base model's pretraining ended; 1e-3 made it forget (-40 pts)
    sft_rows: int = 8
    rl_max_steps: int = 1000          # GRPO on the student stops at the distillation's wall time, or here


def validate(cfg: "PipelineConfig") -> None:
    """Check the recipe sizes before any stage runs."""
    r, d = cfg.r1, cfg.distill
    for name, v in [("r1.cold_start_problems", r.cold_start_problems), ("r1.cold_start_per_problem", r.cold_start_per_problem),
                    ("r1.rl_steps", r.rl_steps), ("r1.rejection_problems", r.rejection_problems),
                    ("r1.rejection_per_problem", r.rejection_per_problem), ("r1.final_rl_steps", r.final_rl_steps),
                    ("r1.k", r.k), ("r1.sft_epochs", r.sft_epochs), ("r1.sft_rows", r.sft_rows),
                    ("distill.problems", d.problems), ("distill.k", d.k), ("distill.per_problem", d.per_problem),
                    ("distill.sft_epochs", d.sft_epochs), ("distill.sft_rows", d.sft_rows),
                    ("distill.rl_max_steps", d.rl_max_steps)]:
        if v < 1:
            raise ValueError(f"--{name} must be >= 1 (got {v})")
    if d.pretrain_steps < 0 or r.language_weight < 0:
        raise ValueError(f"--distill.pretrain-steps and --r1.language-weight must be >= 0 "
                         f"(got {d.pretrain_steps}, {r.language_weight})")
    if r.sft_lr <= 0 or d.sft_lr <= 0:
        raise ValueError(f"--r1.sft-lr and --distill.sft-lr must be > 0 (got {r.sft_lr}, {d.sft_lr})")
    if "num_hidden_layers" in d.student and d.student["num_hidden_layers"] < 1:
        raise ValueError(f"the student needs at least one layer (got num_hidden_layers={d.student['num_hidden_layers']})")


# ----------------------------------------------------------------------------- stages


class Stages:
    """A recipe directory's stages: one found finished (its output exists) is skipped and keeps the wall and CPU
    seconds it took (timings.json); CPU seconds count every thread of this process."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / "timings.json"
        self.seconds = _load_json(self.path) or {}

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


def _r1zero_stages(cfg: "PipelineConfig", progress: bool, log) -> tuple[Path, Path]:
    """(base model, R1-Zero RL model): the r1zero recipe's, run first (and evaluated, and reported) when missing."""
    from r1lab.recipes import run_pipeline

    out = Path(cfg.out)
    base = Path(cfg.base_model) if cfg.base_model else out / "pretrain" / "model"
    rl = out / "grpo" / "model"
    if not ((rl / "config.json").is_file() and (out / "summary.json").is_file()):
        log(f"[r1zero] the {cfg.recipe} recipe starts from the r1zero recipe's models: running its stages in {out}")
        run_pipeline(C.merge(cfg, {"recipe": "r1zero"}), progress=progress, log=log)
    return base, rl


def _grpo_config(cfg: "PipelineConfig", out: Path, model: Path, steps: int, language_weight: float = 0.0,
                 **extra) -> "GRPOConfig":
    rewards, weights = list(cfg.grpo.rewards), list(cfg.grpo.reward_weights)
    if language_weight and "language" not in rewards:
        rewards, weights = rewards + ["language"], weights + [language_weight]
    return C.merge(cfg.grpo, {"out": str(out), "model": str(model), "seed": cfg.seed, "tasks": [cfg.task],
                              "task_args": {cfg.task: cfg.task_args}, "steps": steps, "rewards": rewards,
                              "reward_weights": weights, **extra})


def _grpo(gcfg: "GRPOConfig", progress: bool) -> Path:
    from r1lab.train.grpo import grpo

    grpo(gcfg, progress=progress)
    return Path(gcfg.out) / "model"


def _evaluate(model: Path, cfg: "PipelineConfig", path: Path) -> dict:
    """The r1zero recipe's held-out evaluation (same problems, k, sampling and template), cached in `path`."""
    from r1lab.recipes import _evaluate as evaluate_model

    return evaluate_model(model, cfg, cfg.grpo, path)


# ----------------------------------------------------------------------------- SFT data from a teacher


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


def make_sft_data(out: Path, teacher: Path, cfg: "PipelineConfig", problems: int, k: int, per_problem: int,
                  need_reasoning: bool, seed: int, progress: bool) -> dict:
    """Teacher samples on train problems -> rejection sampling (r1lab.distill: finished, well-formed, correct,
    one language, no duplicates) -> the longest `per_problem` per problem -> `out/data.jsonl` in the r1zero
    format; returns the counts (also in `out/data_stats.json`). A finished dataset is reused."""
    from r1lab.distill import DistillConfig, filter_samples, load_problems, sample_teacher, write_dataset

    stats = out / "data_stats.json"
    if (out / "data.jsonl").is_file() and stats.is_file():
        return json.loads(stats.read_text())
    dcfg = DistillConfig(out=str(out), teacher=str(teacher), student=str(teacher), tasks=[cfg.task],
                         task_args={cfg.task: cfg.task_args}, problems=problems, k=k, temperature=cfg.eval.temperature,
                         top_p=cfg.eval.top_p, max_new_tokens=cfg.grpo.max_new_tokens, teacher_template="r1zero",
                         seed=seed)
    probs = load_problems(dcfg)
    passed, counts = filter_samples(sample_teacher(dcfg, probs, progress), probs)
    kept = select_longest(passed, per_problem, need_reasoning)
    for r in kept:
        r["messages"][-1]["content"] = r1zero_reply(r["messages"][-1]["content"])
    lengths = [len(split_reasoning(r["messages"][-1]["content"])[0] or "") for r in kept]
    counts.update(k=k, passed=len(passed), kept=len(kept), problems_with_kept=len({r["id"] for r in kept}),
                  per_problem=per_problem, need_reasoning=need_reasoning, teacher=str(teacher),
                  mean_reasoning_chars=round(sum(lengths) / len(lengths), 1) if lengths else 0.0)
    if not kept:
        raise ValueError(f"no sample of {teacher} passed the filters ({counts['candidates']} candidates, rejected: "
                         f"{ {k: v for k, v in counts['rejected'].items() if v} }); raise k or the number of problems")
    write_dataset(kept, counts, out)
    return counts


def _sft(out: Path, model: Path, cfg: "PipelineConfig", epochs: int, lr: float, rows: int, progress: bool) -> Path:
    """Fine-tune `model` on `out/data.jsonl` with the r1zero template -> `out/sft/model`."""
    from r1lab.train.sft import SFTConfig, sft

    scfg = SFTConfig(out=str(out / "sft"), model=str(model), data=str(out / "data.jsonl"), template="r1zero",
                     epochs=epochs, seq_len=cfg.pretrain.seq_len, rows=rows, lr=lr, warmup=2, bf16=cfg.pretrain.bf16,
                     eval_fraction=0.05, log_every=5, save_every=100, seed=cfg.seed, device="cpu")
    sft(scfg, progress=progress)
    return out / "sft" / "model"


def _teach(out: Path, teacher: Path, student: Path, cfg: "PipelineConfig", s: "R1Settings | DistillSettings",
           problems: int, per_problem: int, need_reasoning: bool, seed: int, progress: bool) -> Path:
    """A data stage: the teacher's filtered samples (`make_sft_data`), then SFT of the student on them."""
    make_sft_data(out, teacher, cfg, problems, s.k, per_problem, need_reasoning, seed, progress)
    return _sft(out, student, cfg, s.sft_epochs, s.sft_lr, s.sft_rows, progress)


# ----------------------------------------------------------------------------- r1


R1_STAGES = [("cold_start", "1 cold-start SFT"), ("reasoning_rl", "2 reasoning RL"),
             ("rejection_sft", "3 rejection sampling + SFT"), ("final_rl", "4 final RL")]


def _begin(cfg: "PipelineConfig", name: str, progress: bool, log) -> tuple[Path, Path, Path, Stages, float]:
    """Checks, the r1zero models (made when missing), the recipe's directory and its stage timings."""
    validate(cfg)
    base, rl = _r1zero_stages(cfg, progress, log)
    out = Path(cfg.out) / name
    out.mkdir(parents=True, exist_ok=True)
    C.save(cfg, out / "config.yaml")
    return base, rl, out, Stages(out), time.perf_counter()


def run_r1(cfg: "PipelineConfig", progress: bool = True, log=print) -> dict:
    base, r1zero, out, st, t_start = _begin(cfg, "r1", progress, log)
    s = cfg.r1
    evals = {}

    def evaluate(name: str, model: Path):
        st.run(f"eval_{name}", out / f"eval_{name}.json", lambda: _evaluate(model, cfg, out / f"eval_{name}.json"))
        evals[name] = _evaluate(model, cfg, out / f"eval_{name}.json")

    d = out / "cold_start"
    log(f"[1/4] cold start: the R1-Zero model answers {s.cold_start_problems} train problems x {s.k}; the longest "
        f"correct replies fine-tune the base model -> {d}")
    st.run("cold_start", d / "sft" / "model", lambda: _teach(
        d, r1zero, base, cfg, s, s.cold_start_problems, s.cold_start_per_problem, True, cfg.seed + 1, progress))
    evaluate("cold_start", d / "sft" / "model")

    g2 = _grpo_config(cfg, out / "reasoning_rl", d / "sft" / "model", s.rl_steps, s.language_weight)
    log(f"[2/4] reasoning RL: {s.rl_steps} GRPO steps, rewards {', '.join(g2.rewards)} -> {g2.out}")
    st.run("reasoning_rl", Path(g2.out) / "model", lambda: _grpo(g2, progress))
    evaluate("reasoning_rl", Path(g2.out) / "model")

    d3 = out / "rejection_sft"
    log(f"[3/4] rejection sampling: the stage-2 model answers {s.rejection_problems} train problems x {s.k}; "
        f"the correct, readable replies fine-tune the base model -> {d3}")
    st.run("rejection_sft", d3 / "sft" / "model", lambda: _teach(
        d3, Path(g2.out) / "model", base, cfg, s, s.rejection_problems, s.rejection_per_problem, False, cfg.seed + 2,
        progress))
    evaluate("rejection_sft", d3 / "sft" / "model")

    g4 = _grpo_config(cfg, out / "final_rl", d3 / "sft" / "model", s.final_rl_steps, s.language_weight,
                      seed=cfg.seed + 4)
    log(f"[4/4] final RL: {s.final_rl_steps} GRPO steps -> {g4.out}")
    st.run("final_rl", Path(g4.out) / "model", lambda: _grpo(g4, progress))
    evaluate("final_rl", Path(g4.out) / "model")

    from r1lab.recipes import _headline, _load_json as load

    stages = {"base": dict(label="base model", **_headline(load(Path(cfg.out) / "eval_base.json")["summary"])),
              "r1zero": dict(label="R1-Zero (GRPO on the base)",
                             **_headline(load(Path(cfg.out) / "eval_final.json")["summary"]))}
    for name, label in R1_STAGES:
        stages[name] = dict(label=label, **_headline(evals[name]["summary"]), seconds=st.wall(name))
    summary = {"recipe": "r1", "task": cfg.task, "task_args": cfg.task_args, "eval": _eval_settings(cfg),
               "stages": stages,
               "data": {n: _data_headline(out / n / "data_stats.json") for n in ("cold_start", "rejection_sft")},
               "wall_seconds": st.total(), "stage_seconds": st.seconds,
               "this_invocation_seconds": round(time.perf_counter() - t_start, 1)}
    return _finish(out, summary, render_r1(summary), {"reasoning RL": out / "reasoning_rl", "final RL": out / "final_rl"},
                   log)


def render_r1(summary: dict) -> str:
    e = summary["eval"]
    lines = [f"The R1 recipe in miniature ({summary['task']}, {e['problems']} held-out problems, k={e['k']})",
             _table_header()]
    lines += [_table_row(v) for v in summary["stages"].values()]
    for name, d in summary["data"].items():
        lines.append(f"  {name} data: {d['problems']} problems x {d['k']} samples -> {d['passed']} passed the "
                     f"filters, {d['kept']} kept (mean reasoning {d['mean_reasoning_chars']:.0f} chars); rejected "
                     f"{_rejections(d)}")
    lines.append(f"  wall time {summary['wall_seconds']:.0f} s (after the r1zero stages)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- distill


def student_pretrain_config(cfg: "PipelineConfig", base: Path, out: Path):
    """The base model's pretraining (corpus, tokenizer, steps, optimiser) with the smaller dense student."""
    model = {**cfg.pretrain.model, **cfg.distill.student}
    from r1lab.model.config import tiny_config

    model["first_k_dense_replace"] = model.get("num_hidden_layers", tiny_config(8).num_hidden_layers)  # dense
    steps = cfg.distill.pretrain_steps or cfg.pretrain.steps
    pcfg = C.merge(cfg.pretrain, {"out": str(out), "seed": cfg.seed, "tasks": [cfg.task],
                                  "task_args": {cfg.task: cfg.task_args}, "tokenizer": str(base), "steps": steps})
    pcfg.model = model  # replaced, not merged: the student's own sizes
    return pcfg


def run_distill(cfg: "PipelineConfig", progress: bool = True, log=print) -> dict:
    from r1lab.recipes import _headline, _load_json as load

    base, teacher, out, st, t_start = _begin(cfg, "distill", progress, log)
    s = cfg.distill

    pcfg = student_pretrain_config(cfg, base, out / "student_pretrain")
    student = Path(pcfg.out) / "model"
    log(f"[1/4] pretraining the dense student ({pcfg.model}) for {pcfg.steps} steps on the base model's corpus "
        f"-> {pcfg.out}")

    def pretrain_student():
        from r1lab.train.pretrain import pretrain

        pretrain(pcfg, progress=progress)
    st.run("student_pretrain", student, pretrain_student)
    st.run("eval_student_base", out / "eval_student_base.json",
           lambda: _evaluate(student, cfg, out / "eval_student_base.json"))

    d = out / "distilled"
    log(f"[2/4] distillation: the R1-Zero RL model answers {s.problems} train problems x {s.k}; the student is "
        f"fine-tuned on the correct replies -> {d}")
    st.run("distill", d / "sft" / "model", lambda: _teach(
        d, teacher, student, cfg, s, s.problems, s.per_problem, False, cfg.seed + 3, progress))
    st.run("eval_distilled", out / "eval_distilled.json",
           lambda: _evaluate(d / "sft" / "model", cfg, out / "eval_distilled.json"))

    budget = st.wall("distill")
    g = _grpo_config(cfg, out / "student_rl", student, s.rl_max_steps, max_seconds=budget, save_every=20)
    log(f"[3/4] GRPO directly on the student for the distillation's {budget:.0f} s -> {g.out}")
    st.run("student_rl", Path(g.out) / "model", lambda: _grpo(g, progress))
    st.run("eval_student_rl", out / "eval_student_rl.json",
           lambda: _evaluate(Path(g.out) / "model", cfg, out / "eval_student_rl.json"))

    log("[4/4] comparing and writing the report")
    ev = {n: load(out / f"eval_{n}.json") for n in ("student_base", "distilled", "student_rl")}
    from r1lab.model.load import model_info

    t_info, s_info = model_info(teacher), model_info(student)
    rl_rows = [r for r in load_metrics(Path(g.out)) if "reward_mean" in r]
    stages = {"teacher": dict(label="teacher: R1-Zero RL model", **_headline(load(Path(cfg.out) / "eval_final.json")["summary"])),
              "student_base": dict(label="student, pretrained", **_headline(ev["student_base"]["summary"])),
              "distilled": dict(label="student + distillation", **_headline(ev["distilled"]["summary"]),
                                seconds=st.wall("distill")),
              "student_rl": dict(label="student + GRPO (same time)", **_headline(ev["student_rl"]["summary"]),
                                 seconds=st.wall("student_rl"))}
    comparison = compare(ev["distilled"], ev["student_rl"])
    comparison.update(
        distill_seconds=st.wall("distill"), rl_seconds=st.wall("student_rl"),
        distill_cpu_seconds=st.seconds["distill"]["cpu"], rl_cpu_seconds=st.seconds["student_rl"]["cpu"],
        rl_steps=rl_rows[-1]["step"] if rl_rows else 0,
        rl_train_seconds=rl_rows[-1].get("total_seconds") if rl_rows else None,
        distill_samples=_data_headline(d / "data_stats.json")["kept"])
    summary = {"recipe": "distill", "task": cfg.task, "task_args": cfg.task_args, "eval": _eval_settings(cfg),
               "teacher": {"model": str(teacher), "params_total": t_info["params_total"],
                           "params_active": t_info["params_active"]},
               "student": {"model": str(student), "params_total": s_info["params_total"],
                           "params_active": s_info["params_active"], "config": pcfg.model,
                           "pretrain_steps": pcfg.steps},
               "stages": stages, "data": {"distilled": _data_headline(d / "data_stats.json")},
               "distill_vs_rl": comparison, "wall_seconds": st.total(), "stage_seconds": st.seconds,
               "this_invocation_seconds": round(time.perf_counter() - t_start, 1)}
    return _finish(out, summary, render_distill(summary), {"GRPO on the student": out / "student_rl"}, log)


def compare(distilled: dict, rl: dict) -> dict:
    """pass@1 of the distilled student against the RL-trained one on the same held-out problems: the difference
    with a 95% interval from the paired per-problem differences, and which is ahead (or neither, inside it)."""
    a = {r["id"]: r["pass@1"] for r in distilled["records"] if not r.get("skipped")}
    b = {r["id"]: r["pass@1"] for r in rl["records"] if not r.get("skipped")}
    ids = [i for i in a if i in b]
    diffs = [a[i] - b[i] for i in ids]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n) if n > 1 else float("inf")
    winner = "distillation" if mean - half > 0 else "rl" if mean + half < 0 else "neither"
    return {"distill_pass@1": distilled["summary"]["pass@1"], "rl_pass@1": rl["summary"]["pass@1"],
            "difference": mean, "interval95": half if math.isfinite(half) else None, "problems": n,
            "winner": winner}


def verdict(c: dict) -> str:
    d = 100 * c["difference"]
    ci = f" ± {100 * c['interval95']:.1f}" if c["interval95"] is not None else ""
    head = f"distillation minus RL: {d:+.1f}{ci} pts pass@1 (95% interval, paired over {c['problems']} problems)"
    if c["winner"] == "distillation":
        return head + ": distillation wins, as in the paper"
    if c["winner"] == "rl":
        return head + ": GRPO on the student wins here, unlike the paper"
    return head + ": no clear difference at this size and budget"


def render_distill(summary: dict) -> str:
    e, c, t, s = summary["eval"], summary["distill_vs_rl"], summary["teacher"], summary["student"]
    lines = [f"Distillation vs RL on a small dense student ({summary['task']}, {e['problems']} held-out problems, "
             f"k={e['k']})",
             f"  teacher {t['params_total']:,} parameters ({t['params_active']:,} active); student "
             f"{s['params_total']:,} (dense, pretrained {s['pretrain_steps']} steps on the base model's corpus)",
             _table_header()]
    lines += [_table_row(v) for v in summary["stages"].values()]
    d = summary["data"]["distilled"]
    lines += [f"  distillation: {d['problems']} problems x {d['k']} teacher samples -> {d['kept']} kept; "
              f"{c['distill_seconds']:.0f} s wall ({c['distill_cpu_seconds']:.0f} s CPU) for sampling and SFT",
              f"  GRPO on the student: {c['rl_steps']} steps in {c['rl_seconds']:.0f} s wall "
              f"({c['rl_cpu_seconds']:.0f} s CPU); the teacher's own training is not counted for either",
              f"  {verdict(c)}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- shared


def _finish(out: Path, summary: dict, table: str, rl_runs: dict, log) -> dict:
    from r1lab.report import write_stage_report

    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_stage_report(out, summary, table, rl_runs)
    log(table)
    log(f"report: {out / 'report.html'} and {out / 'report.md'}")
    return summary


def _eval_settings(cfg: "PipelineConfig") -> dict:
    e = cfg.eval
    return {"problems": e.limit, "k": e.k, "temperature": e.temperature, "top_p": e.top_p,
            "max_new_tokens": e.max_new_tokens}


def _data_headline(path: Path) -> dict:
    c = json.loads(Path(path).read_text())
    return {"problems": c["problems"], "k": c["k"], "candidates": c["candidates"],
            "passed": c["passed"], "kept": c["kept"], "mean_reasoning_chars": c["mean_reasoning_chars"],
            "rejected": {k: v for k, v in c["rejected"].items() if v}}


def _rejections(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d["rejected"].items()) or "none"


def _table_header() -> str:
    return f"  {'':<30}{'pass@1':>8}{'greedy':>8}{'cons@k':>8}{'thinks':>8}{'tokens':>8}{'seconds':>9}"


def _table_row(v: dict) -> str:
    pct = lambda x: f"{100 * x:7.1f}%" if x is not None else f"{'-':>8}"  # noqa: E731
    sec = f"{v['seconds']:9.0f}" if v.get("seconds") is not None else f"{'':>9}"
    return (f"  {v['label']:<30}{pct(v['pass@1'])}{pct(v['greedy'])}{pct(v['cons@k'])}{pct(v['think_share'])}"
            f"{v['mean_length'] or 0:8.1f}{sec}")


def load_metrics(run_dir: Path) -> list[dict]:
    from r1lab.train.run import read_metrics

    return read_metrics(Path(run_dir) / "metrics.jsonl")


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
