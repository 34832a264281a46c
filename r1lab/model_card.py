"""Model cards: the README.md of every final model directory, in the Hugging Face format (YAML metadata read by the
Hub and `huggingface_hub.ModelCard`, then a short body): what the model is, how it was trained, the command that
trains it again, its evaluation, and what it is for.

Metadata: `base_model` only when the starting model is known by a Hub id (the Hub accepts nothing else there; a
model trained from scratch has none, and a local starting directory is named in the body); `license` apache-2.0 for
a model r1lab trained from scratch, else the starting model card's licence, else "other" with a note; tags; the
datasets trained on (benchmarks by their Hub ids); `model-index` with the evaluation results. The pipeline adds its
R1-protocol evaluation to a card when it evaluates the model (`add_evaluation`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

CARD = "README.md"
COMMANDS = {"PretrainConfig": "pretrain", "SFTConfig": "sft", "GRPOConfig": "grpo"}
STAGE_TAGS = {"pretrain": "pretraining", "sft": "sft", "grpo": "grpo"}
NOT_REPRODUCING = ("report_to",)  # settings that do not change the model


# ----------------------------------------------------------------------------- the card of a trained model


def render(cfg, model, rows: list[dict]) -> str:
    """The card of the model a trainer (`cfg`: PretrainConfig, SFTConfig or GRPOConfig) just trained; `rows` are
    its metrics.jsonl rows (final losses, rewards and evaluations come from them)."""
    from huggingface_hub import ModelCardData

    kind = COMMANDS[type(cfg).__name__]
    start = getattr(cfg, "model", None) if kind != "pretrain" else None
    arch, sizes = architecture(model)
    parent = read_card(start) if start else None
    tasks = list(getattr(cfg, "tasks", []))
    hub = hub_id(start) if start else None
    licence, licence_note = _licence(start, parent)
    results = quick_eval_results(cfg, rows)
    data = ModelCardData(
        base_model=hub,
        license=licence["license"],
        license_name=licence.get("license_name"),
        license_link=licence.get("license_link"),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["r1lab", arch, STAGE_TAGS[kind]]
        + (["on-policy-distillation"] if getattr(cfg, "teacher", "") else [])
        + ["reasoning"],
        datasets=[dataset_id(t) for t in tasks] or None,
        model_name=cfg.out,
        eval_results=results or None,
    )
    tiny = arch == "deepseek-v3" and sizes["total"] < 100e6
    body = [
        f"# {Path(cfg.out).name} (r1lab)",
        "",
        f"A {_arch_name(arch)} model ({_size_line(sizes)}) trained with r1lab's `r1lab {kind}`: {_what(kind)}.",
        "",
        "## How it was trained",
        "",
        *training_lines(cfg, kind, rows, start, hub, parent, licence_note),
        "",
        "## Train it again",
        "",
        "```bash",
        command_line(cfg),
        "```",
        "",
        f"The resolved config is `{Path(cfg.out) / 'config.yaml'}` (`r1lab {kind} --config` reads it); the same "
        "seed and thread count give the same model.",
        "",
        "## Evaluation",
        "",
        *evaluation_lines(results),
        "",
        "## Intended use and limits",
        "",
        *_limits(tiny, sizes, tasks, start, hub),
        "",
        "## Use",
        "",
        "```bash",
        f"r1lab chat {cfg.out}/model        # or: r1lab serve, r1lab eval",
        "```",
        "It also loads with `transformers.AutoModelForCausalLM.from_pretrained`.",
    ]
    return _assemble(data, "\n".join(body) + "\n")


def architecture(model) -> tuple[str, dict]:
    """(architecture tag, {"total": parameters, "active": per token or None}) of a native or transformers model."""
    from r1lab import cost
    from r1lab.model.hf import base_model, is_native, trainable_parameters

    inner = base_model(getattr(model, "module", model))
    total = trainable_parameters(inner)[1]  # tied weights counted once
    if is_native(inner):
        arch, sizes = "deepseek-v3", {**inner.config.to_hf_dict(), "model_type": "deepseek_v3"}
    else:
        config = inner.config
        arch, sizes = str(config.model_type).replace("_", "-"), config.to_dict()
    try:
        active = cost.parameter_counts(sizes)["params_active"]
    except (ValueError, TypeError, KeyError, AttributeError):  # an architecture the cost model does not size
        active = None
    return arch, {"total": total, "active": active if active and active < total else None}


def training_lines(cfg, kind: str, rows: list[dict], start, hub, parent, licence_note: str | None) -> list[str]:
    """How the model was trained, as bullet lines: the recipe, the key settings and what the run measured."""
    last = lambda key: next((r[key] for r in reversed(rows) if r.get(key) is not None), None)  # noqa: E731
    first = lambda key: next((r[key] for r in rows if r.get(key) is not None), None)  # noqa: E731
    steps = max((r.get("step", 0) for r in rows), default=0)
    if kind == "pretrain":
        lines = [
            f"- from scratch on synthetic {_names(cfg.tasks)} problems in the R1-Zero format: "
            f"{cfg.direct_fraction:.0%} of the examples answer at once with an empty think block, the rest work "
            "step by step",
            f"- {steps} steps of {cfg.rows} packed rows x {cfg.seq_len} tokens; AdamW, learning rate {cfg.lr} "
            f"({cfg.warmup} warm-up steps, cosine to {cfg.min_lr_ratio}x), weight decay {cfg.weight_decay}",
            "- tokenizer: "
            + (
                f"`{cfg.tokenizer}`"
                if cfg.tokenizer
                else f"byte-level BPE, {cfg.vocab_size} tokens, trained on the corpus"
            ),
        ]
        if last("loss") is not None:
            lines.append(
                f"- training loss {first('loss'):.3f} at the first logged step, {last('loss'):.3f} at the last"
            )
    elif kind == "sft":
        lora = f", LoRA rank {cfg.hf.lora_rank}" if cfg.hf.lora else ""
        lines = [
            f"- fine-tuned from `{start}` on `{cfg.data}` (template {cfg.template}; loss on the reply tokens only)",
            f"- {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, {steps} steps of {cfg.grad_accum} x "
            f"{cfg.rows} packed rows x {cfg.seq_len} tokens; learning rate {cfg.lr}{lora}",
        ]
        if last("loss") is not None:
            lines.append(
                f"- training loss {first('loss'):.3f} -> {last('loss'):.3f}"
                + (f"; held-out loss {last('eval_loss'):.3f}" if last("eval_loss") is not None else "")
            )
    else:
        rewards = ", ".join(f"{r} x {w:g}" for r, w in zip(cfg.rewards, cfg.reward_weights)) or "none"
        lines = [
            f"- GRPO from `{start}` on {_names(cfg.tasks)} with the {cfg.template} template; rewards: {rewards}"
            + (f"; on-policy distillation from `{cfg.teacher}` (weight {cfg.teacher_weight:g})" if cfg.teacher else ""),
            f"- {steps} steps of {cfg.prompts_per_step} prompts x {cfg.num_generations} completions "
            f"(temperature {cfg.temperature}, top-p {cfg.top_p}, up to {cfg.max_new_tokens} tokens); "
            f"objective {cfg.policy_loss}, advantage {cfg.advantage}, loss {cfg.loss_agg}, KL weight {cfg.beta}, "
            f"learning rate {cfg.lr}",
        ]
        for key, label in (
            ("reward_mean", "mean reward"),
            ("accuracy", "accuracy of the samples"),
            ("think_share", "share of replies that think"),
            ("mean_length", "mean reply tokens"),
        ):
            if last(key) is not None:
                lines.append(f"- {label}: {first(key):.3g} at the first step, {last(key):.3g} at step {steps}")
    if start and not hub:
        lines.append(
            f"- the starting model `{start}` is a local directory (no Hub id is known for it, so the metadata "
            "names no base_model)"
        )
    if parent is not None and "r1lab" in (parent.data.tags or []):
        lines.append(f"- the starting model's own card, `{Path(start) / CARD}`, says how it was made")
    if licence_note:
        lines.append(f"- {licence_note}")
    return lines


def command_line(cfg) -> str:
    """`r1lab <command> --flag value ...`: every setting that differs from the command's defaults."""
    parts = ["r1lab", COMMANDS[type(cfg).__name__]]
    for name, value, default in _leaves(cfg, type(cfg)()):
        if value != default and name not in NOT_REPRODUCING:
            parts += ["--" + name.replace("_", "-"), shlex.quote(_flag(value))]
    return " ".join(parts)


# ----------------------------------------------------------------------------- evaluation results


def quick_eval_results(cfg, rows: list[dict]) -> list:
    """The held-out check a trainer ran last (pretrain and GRPO log {"eval": {task: {greedy, think_share, ...}}})."""
    final = next((r for r in reversed(rows) if isinstance(r.get("eval"), dict)), None)
    if not final:
        return []
    args = {"problems": cfg.eval_problems, "decoding": "greedy"}
    out = []
    for task, m in final["eval"].items():
        if m.get("greedy") is not None:
            out.append(_result(task, "accuracy", "greedy accuracy (end-of-training check)", m["greedy"], args))
        if m.get("think_share") is not None:
            out.append(
                _result(
                    task, "think_share", "greedy replies that think (end-of-training check)", m["think_share"], args
                )
            )
    return out


def protocol_results(summary: dict) -> list:
    """An R1-protocol evaluation summary (`r1lab.eval.evaluate`) as model-index results."""
    task, k = summary["task"], summary["k"]
    sampled = {
        "problems": summary["n"],
        "k": k,
        "temperature": summary["temperature"],
        "top_p": summary["top_p"],
        "max_new_tokens": summary["max_new_tokens"],
    }
    out = []
    if summary.get("greedy") is not None:
        greedy = {"problems": summary["n"], "decoding": "greedy", "max_new_tokens": summary["max_new_tokens"]}
        out.append(_result(task, "accuracy", "greedy accuracy", summary["greedy"], greedy))
    out.append(_result(task, "pass@1", f"pass@1 (mean over {k} samples)", summary["pass@1"], sampled))
    out.append(_result(task, f"cons@{k}", f"cons@{k} (majority vote)", summary["cons@k"], sampled))
    if summary.get("think_share") is not None:
        out.append(_result(task, "think_share", "sampled replies that think", summary["think_share"], sampled))
    return out


def add_evaluation(model_dir: str | Path, summary: dict) -> bool:
    """Add an R1-protocol evaluation to the card r1lab wrote in `model_dir` (results with the same dataset and
    metric are replaced) and re-render its evaluation table. False when the directory has no r1lab card."""
    card = read_card(model_dir)
    if card is None or "r1lab" not in (card.data.tags or []):
        return False
    new = protocol_results(summary)
    key = lambda r: (r.dataset_type, r.dataset_split, r.metric_type, r.metric_name)  # noqa: E731
    keys = {key(r) for r in new}
    card.data.eval_results = [r for r in card.data.eval_results or [] if key(r) not in keys] + new
    card.data.model_name = card.data.model_name or str(model_dir)
    datasets = list(card.data.datasets or [])
    if dataset_id(summary["task"]) not in datasets:
        card.data.datasets = datasets + [dataset_id(summary["task"])]
    table = "\n".join(evaluation_lines(card.data.eval_results))
    body = re.sub(r"(## Evaluation\n\n).*?(?=\n## |\Z)", lambda m: m.group(1) + table + "\n", card.text, flags=re.S)
    _write(Path(model_dir) / CARD, _assemble(card.data, body))
    return True


def evaluation_lines(results: list) -> list[str]:
    """The evaluation table of a card, from its model-index results."""
    if not results:
        return [
            "Not evaluated yet: `r1lab eval MODEL_DIR --task TASK` measures greedy accuracy, pass@1 over k "
            "samples and cons@k with the R1 protocol."
        ]
    lines = ["| dataset | split | metric | value | settings |", "|---|---|---|---|---|"]
    for r in results:
        settings = ", ".join(f"{k} {v}" for k, v in (r.metric_args or {}).items())
        lines.append(
            f"| {r.dataset_name} | {r.dataset_split or ''} | {r.metric_name or r.metric_type} | "
            f"{r.metric_value}% | {settings} |"
        )
    return lines


# ----------------------------------------------------------------------------- helpers


def read_card(model_dir: str | Path | None):
    """The parsed README.md of a model directory, or None (absent or unreadable)."""
    from huggingface_hub import ModelCard

    path = Path(model_dir) / CARD if model_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return ModelCard.load(path)
    except (ValueError, OSError, TypeError):
        return None


def hub_id(start: str) -> str | None:
    """The Hub id of a starting model: given as one, or a directory of the Hub cache (models--org--name/...)."""
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", str(Path(start).resolve()))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    from r1lab.model.load import hub_name

    if not Path(start).exists() and hub_name(start):
        return start
    return None


def dataset_id(task: str) -> str:
    """A benchmark's Hub dataset id; a synthetic task's own name."""
    from r1lab.tasks.benchmarks import BENCHMARKS

    return BENCHMARKS[task][0] if task in BENCHMARKS else task


def _result(task: str, metric_type: str, name: str, value: float, args: dict):
    from huggingface_hub import EvalResult

    from r1lab.tasks.benchmarks import BENCHMARKS

    hub = BENCHMARKS.get(task)
    return EvalResult(
        task_type="text-generation",
        dataset_type=hub[0] if hub else task,
        dataset_name=task if hub else f"{task} (r1lab synthetic, held-out split)",
        dataset_config=hub[1] if hub else None,
        dataset_split=hub[2]["test"] if hub else "test",
        metric_type=metric_type,
        metric_name=name,
        metric_value=round(100 * value, 1),
        metric_args=args,
    )


def _licence(start, parent) -> tuple[dict, str | None]:
    """The card's licence fields and a note when it could not be known."""
    if start is None:
        return {"license": "apache-2.0"}, None
    if parent is not None and parent.data.license:
        d = parent.data
        return {"license": d.license, "license_name": d.license_name, "license_link": d.license_link}, None
    return (
        {"license": "other", "license_name": "unknown"},
        f"licence: the starting model `{start}` has no model card that states one; it is that model's licence "
        "(check it before sharing)",
    )


def _limits(tiny: bool, sizes: dict, tasks: list[str], start, hub) -> list[str]:
    what = _names(tasks) if tasks else "its fine-tuning data"
    if tiny:
        return [
            f"A tiny research model ({_size_line(sizes)}): it shows R1-style training at a size that trains on a "
            f"laptop CPU. It answers problems like its training tasks ({what}) in the format it was trained on, "
            "and nothing else: it holds no conversation, knows no facts and follows no instructions outside that "
            "format. Its answers are often wrong (see the evaluation): use it to study training, not to compute "
            "anything."
        ]
    base = f"`{hub or start}`" if start else "its pretraining"
    return [
        f"Trained for {what}; it keeps the abilities, limits and biases of {base} and the terms of its licence. "
        "It was evaluated only as listed above: check it on your own data before any use where correctness "
        "matters."
    ]


def _what(kind: str) -> str:
    return {
        "pretrain": "a base model pretrained on synthetic verifiable problems",
        "sft": "supervised fine-tuning on chats or prompt/completion pairs",
        "grpo": "reinforcement learning with verifiable rewards (GRPO, as in DeepSeek-R1-Zero)",
    }[kind]


def _arch_name(arch: str) -> str:
    return "DeepSeek-V3-architecture (MLA, MoE)" if arch == "deepseek-v3" else f"{arch}-architecture"


def _size_line(sizes: dict) -> str:
    def n(x):
        return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}K"

    active = f", {n(sizes['active'])} active per token" if sizes.get("active") else ""
    return f"{n(sizes['total'])} parameters{active}"


def _names(tasks: list[str]) -> str:
    return ", ".join(f"`{t}`" for t in tasks)


def _leaves(cfg, default, prefix: str = ""):
    """(dotted name, value, default value) of every leaf setting of a (nested) config."""
    for f in dataclasses.fields(cfg):
        value, base = getattr(cfg, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, base, prefix + f.name + ".")
        else:
            yield prefix + f.name, value, base


def _flag(value) -> str:
    """A setting as its command-line value (as r1lab.config parses it back)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_flag(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _assemble(data, body: str) -> str:
    return f"---\n{data.to_yaml()}\n---\n\n{body.lstrip()}"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
