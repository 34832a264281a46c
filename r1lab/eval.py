"""Evaluation with the R1 protocol: greedy accuracy, pass@1 as the mean correctness of k samples at temperature
0.6 / top-p 0.95, cons@k by majority vote, and the unbiased pass@k estimator (Chen et al., 2021).

The same scoring runs on a local model (through the shared sampler) or on any OpenAI-compatible endpoint, so
served models and external APIs are measured the same way. A problem whose gold answer cannot be judged is
skipped and counted, never scored as right or wrong.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, cast

from r1lab.config import opt
from r1lab.reasoning import split_reasoning
from r1lab.sampler import R1_TEMPERATURE, R1_TOP_P
from r1lab.tasks import R1_MATH_INSTRUCTION, Problem, get_task
from r1lab.tasks.answers import extract_answer, normalize_answer
from r1lab.tools import CALL_END

BENCHMARKS = ("gsm8k", "math500", "aime24", "amc23")
CODE_BENCHMARKS = ("humaneval",)  # judged by running tests in the sandbox; no math instruction
# the prompt formats; as EvalConfig.template's type, also the check of --template (r1lab.config)
EvalTemplate = Literal["auto", "r1zero", "r1", "model"]


@dataclass
class EvalConfig:
    task: str = opt(
        "arithmetic",
        "arithmetic, countdown, linear, pyfunc, gsm8k, math500, aime24, amc23, humaneval (or a registered task)",
    )
    task_args: dict = opt(factory=dict, help="knobs of a synthetic task as JSON, e.g. '{\"max_digits\": 2}'")
    split: str = opt("test", "the split to evaluate: test (held out) or train")
    limit: int | None = opt(
        None, "first N problems of a benchmark, or N held-out problems of a synthetic task (default: all, or 200)"
    )
    k: int = opt(4, "samples per problem for pass@1 (their mean) and cons@k (their majority vote)")
    temperature: float = opt(R1_TEMPERATURE, "sampling temperature of the k samples (the R1 protocol: 0.6)")
    top_p: float = opt(R1_TOP_P, "nucleus sampling of the k samples (the R1 protocol: 0.95)")
    max_new_tokens: int = opt(256, "most tokens per reply")
    greedy: bool = opt(True, "also decode each problem greedily (temperature 0)")
    template: EvalTemplate = opt(
        "auto",
        "prompt format: auto (the model's own chat template when it has one, else r1zero for synthetic "
        "tasks and r1 for benchmarks), r1zero, r1, or model",
    )
    seed: int = opt(0, "seed of the samples (and of the synthetic problems drawn)")
    max_batch: int = opt(256, "most sequences a local model decodes together")
    tools: str = opt(
        "none",
        "a tool a local model's replies may call while they think: none or python (programs "
        "run in the sandbox; r1lab.tools)",
    )

    def validate(self) -> EvalConfig:
        if self.k < 1:
            raise ValueError(f"--k must be >= 1 (got {self.k})")
        if self.tools not in ("none", "python"):
            raise ValueError(f"--tools must be none or python (got {self.tools!r})")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1 (got {self.limit})")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1 (got {self.max_batch})")
        if not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"--temperature must be in [0, 2] and --top-p in (0, 1] (got {self.temperature}, {self.top_p})"
            )
        try:  # an unknown task or knob is named now
            get_task(self.task, **self.task_args)
        except TypeError as e:
            raise ValueError(f"{e}; fix --task-args for task {self.task!r}") from None
        return self


@dataclass
class Sample:
    text: str  # the full reply (thinking and answer)
    reasoning: str | None
    content: str
    tokens: int
    answer: str | None = None
    correct: bool | None = None

    @property
    def thinks(self) -> bool:
        return bool(self.reasoning and self.reasoning.strip())


# ----------------------------------------------------------------------------- maths


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples with c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most frequent extracted answer (normalised); ties go to the one seen first; None if none extracted."""
    norm = [(normalize_answer(a), a) for a in answers if a is not None and a.strip()]
    if not norm:
        return None
    counts = Counter(n for n, _ in norm)
    best = max(counts.values())
    return next(a for n, a in norm if counts[n] == best)


# ----------------------------------------------------------------------------- problems and prompts


def load_problems(cfg: EvalConfig) -> list[Problem]:
    task = require_sandbox(get_task(cfg.task, **cfg.task_args))
    if cfg.task in BENCHMARKS + CODE_BENCHMARKS:
        probs = task.problems(cfg.split)
        return probs[: cfg.limit] if cfg.limit else probs
    return task.problems(cfg.split, n=cfg.limit or 200, seed=cfg.seed)


def require_sandbox(task):
    """The task, once the sandbox can run here if the task runs code: refused before any generation, since
    without one no reply could be judged (SandboxUnavailable names the fix and the opt-in)."""
    if getattr(task, "runs_code", False):
        from r1lab.sandbox import require

        require()
    return task


def user_turn(problem: Problem) -> str:
    """The question as the user sends it: benchmarks get R1's math instruction."""
    if problem.task in BENCHMARKS:
        return f"{problem.prompt}\n{R1_MATH_INSTRUCTION}"
    return problem.prompt


def resolve_template(cfg: EvalConfig, tokenizer=None) -> str:
    """`auto`: the model's own chat template (r1lab's trainers save the one they trained with), else r1zero for
    synthetic tasks and r1 for benchmarks."""
    if cfg.template != "auto":
        return cfg.template
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return "model"
    return "r1zero" if cfg.task not in BENCHMARKS + CODE_BENCHMARKS else "r1"


# the final model of each recipe, inside a `r1lab pipeline` output directory
RECIPE_MODELS = {"r1zero": "grpo/model", "r1": "r1/final_rl/model", "distill": "distill/distilled/sft/model"}


def run_settings(path: str | Path) -> tuple[Path, dict, Path | None]:
    """(model directory, evaluation settings, the config.yaml they came from) for a model directory or a run
    directory: a pipeline's output (its final model, its task and its eval settings) or one trainer's run (its
    final model, its first task and that task's knobs, its template and reply length). A plain model directory
    outside any run gives no settings."""
    import yaml

    from r1lab.model.checkpoint import CheckpointError

    path = Path(path)
    run = path if (path / "config.yaml").is_file() else path.parent if (path.parent / "config.yaml").is_file() else None
    if run is None:
        return path, {}, None
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise CheckpointError(
            f"{run / 'config.yaml'} is not valid YAML ({e}); pass the model directory itself"
        ) from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{run / 'config.yaml'} is not a run config; pass the model directory itself")
    for key, kind in (("recipe", str), ("tasks", list), ("task_args", dict), ("grpo", dict), ("eval", dict)):
        if cfg.get(key) is not None and not isinstance(cfg[key], kind):  # a hand-edited or foreign config.yaml
            raise CheckpointError(
                f"{run / 'config.yaml'}: {key} is a {type(cfg[key]).__name__}, not a "
                f"{kind.__name__}; correct it, or pass the model directory itself"
            )
    if "recipe" in cfg and "grpo" in cfg:  # a pipeline's output directory (runs/r1zero)
        ev = cfg.get("eval") or {}
        settings = {
            "task": cfg.get("task"),
            "task_args": cfg.get("task_args") or {},
            "template": (cfg.get("grpo") or {}).get("template"),
            "limit": ev.get("limit"),
            "k": ev.get("k"),
            "temperature": ev.get("temperature"),
            "top_p": ev.get("top_p"),
            "max_new_tokens": ev.get("max_new_tokens"),
            "seed": 0,
            "tools": (cfg.get("grpo") or {}).get("tools"),
        }
        model = run / RECIPE_MODELS.get(cfg["recipe"], "grpo/model") if path == run else path
    else:  # a trainer's run directory (pretrain, sft, grpo)
        tasks = cfg.get("tasks") or []
        task = tasks[0] if tasks else None
        settings = {
            "task": task,
            "task_args": (cfg.get("task_args") or {}).get(task, {}) if task else None,
            "template": cfg.get("template"),
            "max_new_tokens": cfg.get("max_new_tokens"),
            "tools": cfg.get("tools"),
        }
        model = run / "model" if path == run else path
    if not (model / "config.json").is_file():
        raise CheckpointError(
            f"{run} has no final model yet ({model} is missing): let the run finish, or "
            f"evaluate a checkpoint directory directly"
        )
    return model, {k: v for k, v in settings.items() if v is not None}, run / "config.yaml"


def to_sample(text: str, tokens: int) -> Sample:
    reasoning, content = split_reasoning(text)
    return Sample(text=text, reasoning=reasoning, content=content, tokens=tokens)


# ----------------------------------------------------------------------------- generation sources

Generate = Callable[[list[str], int, float, float, int, int], list[list[Sample]]]


def greedy_check(
    model, tok, tasks: dict, template: str, n: int, max_new_tokens: int, tools=None, seed: int = 0
) -> dict:
    """The trainers' in-run check: greedy accuracy, think share and mean reply length on `n` held-out problems of
    each task ({name: task}; the test split training never draws), in the template training uses."""
    generate = local_generator(model, tok, template, tools=tools)
    out = {}
    for name, task in tasks.items():
        cfg = EvalConfig(
            task=name, limit=n, k=1, seed=seed, max_new_tokens=max_new_tokens, template=cast(EvalTemplate, template)
        )  # a trainer's template: checked by its config
        s = evaluate(generate, task.problems("test", n=n, seed=seed), cfg)["summary"]
        out[name] = {
            "greedy": s["greedy"],
            "think_share": s["greedy_think_share"],
            "mean_length": s["greedy_mean_length"],
        }
    return out


def local_generator(model, tokenizer, template: str, max_batch: int = 256, tools=None) -> Generate:
    """prompts (user turns), n, temperature, top_p, seed -> n Samples per prompt, from the shared sampler (with
    `tools`, an r1lab.tools tool the replies may call)."""
    from r1lab.sampler import Sampler, SamplingParams
    from r1lab.tokenizer import render_prompt

    sampler = Sampler(model, tokenizer, max_batch=max_batch, tools=tools)

    def generate(prompts, n, temperature, top_p, seed, max_new_tokens=256):
        rendered = [render_prompt(tokenizer, p, template) for p in prompts]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed)
        outs = sampler.generate(rendered, params)
        grouped = defaultdict(list)
        for o in outs:
            grouped[o.prompt_index].append(to_sample(o.text, o.model_tokens))
        return [grouped[i] for i in range(len(prompts))]

    return generate


def endpoint_generator(
    base_url: str, model: str, api_key: str | None = None, concurrency: int = 16, timeout: float = 600.0
) -> Generate:
    """The same interface over an OpenAI-compatible /chat/completions endpoint (one request per sample, so
    servers without `n` work too), with `r1lab.client`'s retries. `reasoning_content` is used when the server
    splits the thinking."""
    from r1lab.client import ChatClient

    client = ChatClient(base_url, model, api_key, concurrency=concurrency, timeout=timeout)

    def sample(r) -> Sample:
        if r.reasoning is None:
            return to_sample(r.content, r.completion_tokens)
        return Sample(text=r.text, reasoning=r.reasoning, content=r.content, tokens=r.completion_tokens)

    def generate(prompts, n, temperature, top_p, seed, max_new_tokens=256):
        bodies = [
            client.body(p, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed + j)
            for p in prompts
            for j in range(n)
        ]
        flat = [sample(r) for r in client.complete(bodies)]
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    return generate


# ----------------------------------------------------------------------------- scoring


def score(samples: list[Sample], problem: Problem, check, extract=extract_answer) -> list[Sample]:
    """Extract each sample's answer from its reply (not its thinking) and judge it; a thinking block that never
    closes has no answer, exactly as in `r1lab.rewards.final_answer`. Code tasks extract their program instead."""
    for s in samples:
        s.answer = extract(s.content)  # what follows the thinking, as the accuracy reward reads it
        s.correct = check(s.answer, problem)
    return samples


def evaluate(generate: Generate, problems: list[Problem], cfg: EvalConfig) -> dict:
    """Run the protocol; returns {"summary": {...}, "records": [...]} (JSON-ready)."""
    cfg.validate()
    if not problems:
        raise ValueError(f"no problems to evaluate for task {cfg.task!r} (check --task, --split and --limit)")
    task = require_sandbox(get_task(cfg.task, **cfg.task_args))
    check, extract = task.check, getattr(task, "extract", extract_answer)
    prompts = [user_turn(p) for p in problems]
    sampled = generate(prompts, cfg.k, cfg.temperature, cfg.top_p, cfg.seed, cfg.max_new_tokens)
    greedy = generate(prompts, 1, 0.0, 1.0, cfg.seed, cfg.max_new_tokens) if cfg.greedy else [[]] * len(problems)

    records, skipped = [], 0
    for p, samples, g in zip(problems, sampled, greedy):
        score(samples, p, check, extract)
        score(g, p, check, extract)
        judged = [s.correct for s in samples]
        if any(c is None for c in judged) or any(s.correct is None for s in g):
            skipped += 1
            records.append({"id": p.id, "skipped": True, "gold": p.answer, "meta": p.meta})
            continue
        c = sum(1 for ok in judged if ok)  # every sample judged (none is None)
        vote = majority_answer([s.answer for s in samples])
        records.append(
            {
                "id": p.id,
                "prompt": p.prompt,
                "gold": p.answer,
                "meta": p.meta,
                "skipped": False,
                "pass@1": c / cfg.k,
                "correct": c,
                "cons": bool(vote is not None and check(vote, p)),
                "vote": vote,
                "greedy": asdict(g[0]) if g else None,
                "samples": [asdict(s) for s in samples],
            }
        )
    return {"summary": summarize(records, cfg, skipped), "records": records}


def summarize(records: list[dict], cfg: EvalConfig, skipped: int) -> dict:
    judged = [r for r in records if not r["skipped"]]
    n = len(judged)

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    samples = [s for r in judged for s in r["samples"]]
    summary = {
        "task": cfg.task,
        "n": n,
        "skipped": skipped,
        "k": cfg.k,
        "greedy": mean(r["greedy"]["correct"] for r in judged) if cfg.greedy else None,
        "pass@1": mean(r["pass@1"] for r in judged),
        "cons@k": mean(r["cons"] for r in judged),
        "pass@k": {
            str(j): mean(pass_at_k(cfg.k, r["correct"], j) for r in judged)
            for j in sorted({1, 2, 4, 8, 16, 32, 64, cfg.k})
            if j <= cfg.k
        },
        "think_share": mean(bool(s["reasoning"] and s["reasoning"].strip()) for s in samples),
        "tool_share": mean(CALL_END in (s["reasoning"] or "") for s in samples),  # replies that called a tool
        "mean_length": mean(s["tokens"] for s in samples),
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
    }
    if cfg.greedy and judged:
        summary["greedy_think_share"] = mean(
            bool(r["greedy"]["reasoning"] and r["greedy"]["reasoning"].strip()) for r in judged
        )
        summary["greedy_mean_length"] = mean(r["greedy"]["tokens"] for r in judged)
    for key in ("level", "subject"):  # MATH-500's breakdown
        groups = defaultdict(list)
        for r in judged:
            if key in (r.get("meta") or {}):
                groups[str(r["meta"][key])].append(r["pass@1"])
        if groups:
            summary[f"by_{key}"] = {g: {"n": len(v), "pass@1": sum(v) / len(v)} for g, v in sorted(groups.items())}
    return summary


def render_table(summary: dict) -> str:
    def pct(x):
        return "   -  " if x is None else f"{100 * x:5.1f}%"

    lines = [
        f"{summary['task']}: {summary['n']} problems ({summary['skipped']} skipped), k={summary['k']}, "
        f"T={summary['temperature']}, top-p={summary['top_p']}",
        f"  greedy       {pct(summary['greedy'])}",
        f"  pass@1       {pct(summary['pass@1'])}   (mean over {summary['k']} samples)",
        f"  cons@{summary['k']:<7} {pct(summary['cons@k'])}   (majority vote)",
    ]
    for j, v in summary["pass@k"].items():
        if j != "1":
            lines.append(f"  pass@{j:<7} {pct(v)}")
    lines.append(f"  thinks       {pct(summary['think_share'])}   mean length {summary['mean_length'] or 0:.1f} tokens")
    for key in ("by_level", "by_subject"):
        if key in summary:
            lines.append(f"  {key[3:]}:")
            lines += [f"    {g:<28} {pct(v['pass@1'])}  (n={v['n']})" for g, v in summary[key].items()]
    return "\n".join(lines)


def write_report(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
