"""Pretrain the tiny native base model on synthetic verifiable problems in the R1-Zero format.

The corpus mixes worked solutions (`<think> steps </think> <answer> x </answer>`) with bare answers (an empty
think block), so the base model sometimes thinks and sometimes does not. That mix is what lets R1-Zero appear in
miniature: RL then discovers that thinking pays. (With only worked examples GRPO rewarded stopping early; with
too many bare answers the thinking skill stayed too weak to amplify.) With `tool_fraction`, that share of the worked
solutions calls the Python tool instead (r1lab.tools: `<think> <tool> print(47*38) </tool> <output> 1786 </output>
</think>`); the tool's output tokens are context, never labels, as in RL.

Under torchrun each process trains on a contiguous share of every step's `rows` (a global count), its loss weighted
by its share of the step's label tokens, so N processes take the steps one process takes (`r1lab.train.dist`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from r1lab import config, trackers
from r1lab.config import opt
from r1lab.model.config import tiny_config
from r1lab.model.deepseek import DeepseekV3
from r1lab.tasks import Problem, ToolTask, get_task
from r1lab.tokenizer import carry_template, check_template, render_prompt, train_tokenizer
from r1lab.tools import CALL_END, CALL_START, OUTPUT_END, OUTPUT_START, format_output
from r1lab.train import dist, loop
from r1lab.train.packing import Packed, pack
from r1lab.train.run import adamw, check_optimizer


@dataclass
class PretrainConfig:
    out: str = opt("runs/pretrain", "run directory; re-running with the same one resumes")
    tasks: list[str] = opt(factory=lambda: ["arithmetic"], help="tasks whose train splits make the corpus")
    task_args: dict[str, dict] = opt(
        factory=lambda: {"arithmetic": {"min_digits": 2, "max_digits": 2, "ops": "+-"}}, help="knobs per task as JSON"
    )
    direct_fraction: float = opt(
        0.65,
        "share of examples that answer at once with an empty think block (the rest "
        "work step by step): what lets RL discover that thinking pays",
    )
    tool_fraction: float = opt(
        0.0,
        "share of examples whose thinking calls the Python tool (tasks with a "
        "tool_solution); the other thinking ones are worked by hand",
    )
    template: str = opt("r1zero", "prompt format of the corpus: r1zero or r1")
    tokenizer: str | None = opt(None, "a tokenizer directory to reuse; default: train one on the corpus")
    vocab_size: int = opt(512, "size of the trained byte-level BPE")
    model: dict = opt(
        factory=dict, help="overrides of the tiny DeepSeek-V3 config as JSON, e.g. '{\"num_hidden_layers\": 6}'"
    )
    steps: int = opt(600, "optimiser steps")
    rows: int = opt(16, "packed rows per step")
    seq_len: int = opt(256, "packed row length")
    lr: float = opt(2e-3, "peak learning rate")
    warmup: int = opt(30, "linear warm-up steps")
    min_lr_ratio: float = opt(0.1, "the cosine schedule ends at lr x this")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    bf16: bool | None = opt(
        None, "bf16 autocast for matmuls (weights and optimiser stay float32); none: on GPUs with bf16, float32 on CPUs"
    )
    eval_every: int = opt(200, "steps between held-out greedy evaluations")
    eval_problems: int = opt(200, "held-out problems per evaluation")
    log_every: int = opt(10, "steps between metrics rows")
    save_every: int = opt(100, "steps between checkpoints")
    seed: int = opt(0, "seed of the corpus, the tokenizer and the initial weights")
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto (CUDA when present)")
    parallel: str = opt("ddp", "under torchrun: ddp (a replica per process) or fsdp (weights sharded)")
    report_to: list[str] = opt(
        factory=list,
        help="experiment trackers that also get the metrics, config and "
        "samples: tensorboard, wandb, mlflow (comma-separated; each an "
        "extra: pip install 'r1lab[wandb]')",
    )

    def validate(self) -> PretrainConfig:
        config.require_finite(self)
        check_template(self.template, allow_model=False)  # the corpus is rendered with one of r1lab's own
        if not 0 <= self.direct_fraction <= 1:
            raise ValueError(f"direct_fraction must be in [0, 1] (got {self.direct_fraction})")
        if not 0 <= self.tool_fraction <= 1 - self.direct_fraction:
            raise ValueError(
                f"tool_fraction must be in [0, 1 - direct_fraction] = [0, {1 - self.direct_fraction:g}] "
                f"(got {self.tool_fraction})"
            )
        for name in ("steps", "rows", "seq_len", "eval_problems", "log_every", "save_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        check_optimizer(self)
        if not self.tasks:
            raise ValueError("tasks is empty: name at least one task for the corpus (e.g. --tasks arithmetic)")
        from_tokenizer = sorted(set(self.model) & {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"})
        if from_tokenizer:
            raise ValueError(
                f"model overrides cannot set {', '.join(from_tokenizer)}: the tokenizer decides them "
                "(set --vocab-size instead)"
            )
        tiny_config(self.vocab_size, **{"max_position_embeddings": max(512, self.seq_len), **self.model}).validate()
        dist.check_parallel(self.parallel)
        for t in self.tasks:
            task = get_task(t, **self.task_args.get(t, {}))  # unknown task or knob -> a clear error now
            if self.tool_fraction and not hasattr(task, "tool_solution"):
                raise ValueError(
                    f"tool_fraction is {self.tool_fraction} but task {t!r} has no tool_solution (a "
                    f"program that solves its problems); set tool_fraction 0 or use such a task"
                )
        trackers.check(self.report_to)
        return self


def completion_text(problem: Problem, direct: bool, tool: tuple[str, str] | None = None) -> str:
    """The reply in R1-Zero format; `direct` answers with an empty think block; `tool` (program, what it prints)
    thinks with one call of the Python tool instead of the worked steps."""
    if tool is not None and not direct:
        think = f"{CALL_START} {tool[0]} {CALL_END}{format_output(tool[1])} "
    else:
        think = "" if direct or not problem.reasoning else problem.reasoning + " "
    return f" <think> {think}</think> <answer> {problem.answer} </answer>"


def tool_output_spans(text: str) -> list[tuple[str, bool]]:
    """`text` cut into (piece, written by the tool) pieces: each ` <output> ... </output>` span is the tool's."""
    pieces, i = [], 0
    while (j := text.find(" " + OUTPUT_START, i)) != -1:
        k = text.find(OUTPUT_END, j)
        k = len(text) if k == -1 else k + len(OUTPUT_END)
        pieces += [(text[i:j], False), (text[j:k], True)]
        i = k
    return [p for p in pieces + [(text[i:], False)] if p[0]]


class Corpus:
    """Training samples as a pure function of (seed, step): resuming at step s sees exactly the same data."""

    def __init__(self, cfg: PretrainConfig, tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        self.tasks = [get_task(t, **cfg.task_args.get(t, {})) for t in cfg.tasks]
        self.tool_tasks = {t.name: t for t in self.tasks if isinstance(t, ToolTask)}  # all, with tool_fraction

    def problems(self, seed: int, n: int) -> list[Problem]:
        rng = random.Random(seed)
        per_task = [n // len(self.tasks) + (i < n % len(self.tasks)) for i in range(len(self.tasks))]
        out = []
        for task, m in zip(self.tasks, per_task):
            if m:
                out += task.problems("train", n=m, seed=rng.randrange(1 << 30))
        rng.shuffle(out)
        return out

    def texts(self, seed: int, n: int) -> list[tuple[str, str]]:
        """(prompt, completion) pairs with the direct / tool / worked mix."""
        rng = random.Random(seed ^ 0x5EED)
        cfg, out = self.cfg, []
        for p in self.problems(seed, n):
            u = rng.random()
            tool = (
                self.tool_tasks[p.task].tool_solution(p)
                if cfg.direct_fraction <= u < (cfg.direct_fraction + cfg.tool_fraction)
                else None
            )
            out.append(
                (
                    render_prompt(self.tok, p.prompt, cfg.template),
                    completion_text(p, u < cfg.direct_fraction, tool) + self.tok.eos_token,
                )
            )
        return out

    def completion_ids(self, completion: str) -> tuple[list[int], list[int]]:
        """Token ids of a completion that calls the tool, and its labels mask (0 on the tool's output): each
        piece tokenised alone, as the sampler appends the tool's output."""
        ids, labels = [], []
        for piece, by_tool in tool_output_spans(completion):
            t = self.tok(piece, add_special_tokens=False)["input_ids"]
            ids += t
            labels += [0 if by_tool else 1] * len(t)
        return ids, labels

    def shared_prefix(self) -> list[int]:
        """Token ids every prompt starts with (BOS and the R1-Zero preamble): forwarded once per row."""
        a, b = (render_prompt(self.tok, q, self.cfg.template) for q in ("1", "2"))
        common = a[: next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)]
        ids = self.tok(common, add_special_tokens=False)["input_ids"]
        return ids[:-1]  # the last token may merge with what follows; keep only tokens surely shared

    def check_fits(self, n: int = 64) -> None:
        """Refuse a seq_len that no example fits (packing would wait forever for one): name the length that would."""
        pairs = self.texts(self.cfg.seed * 1_000_003 - 1, n)
        lengths = sorted(len(self.tok(p + c, add_special_tokens=False)["input_ids"]) for p, c in pairs)
        if lengths[0] > self.cfg.seq_len:
            raise ValueError(
                f"no example fits in seq_len {self.cfg.seq_len}: with the template the shortest of {n} "
                f"drawn examples has {lengths[0]} tokens and the longest {lengths[-1]}; use --seq-len "
                f"{lengths[-1]} or more"
            )

    def batch(self, step: int) -> Packed:
        """`rows` packed rows of examples for this step: each row holds the template's shared prefix once and its
        examples attend to it (use the 4D `mask()`)."""
        cfg = self.cfg
        prefix = self.shared_prefix()
        need = cfg.rows * (cfg.seq_len - len(prefix))
        samples, total, chunk = [], 0, 0
        while total < need:
            pairs = self.texts((cfg.seed * 1_000_003 + step) * 1009 + chunk, 64)
            enc_p = self.tok([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
            enc_c = self.tok([c for _, c in pairs], add_special_tokens=False)["input_ids"]
            for (_, text), p, c in zip(pairs, enc_p, enc_c):
                if p[: len(prefix)] != prefix:
                    raise ValueError(
                        "a prompt does not start with the shared template prefix; the tokenizer "
                        "splits the template differently (pretrain without prefix sharing)"
                    )
                p = p[len(prefix) :]
                c, labels = self.completion_ids(text) if OUTPUT_START in text else (c, [1] * len(c))
                if len(prefix) + len(p) + len(c) <= cfg.seq_len:
                    samples.append((p + c, [0] * len(p) + labels))
                    total += len(p) + len(c)
            chunk += 1
        packed = pack(samples, cfg.seq_len, pad_id=self.tok.pad_token_id, prefix=prefix)
        keep = slice(0, cfg.rows)
        return Packed(
            packed.input_ids[keep],
            packed.position_ids[keep],
            packed.group[keep],
            packed.segment[keep],
            [],
            packed.require_labels()[keep],
        )


def build_tokenizer(cfg: PretrainConfig):
    if cfg.tokenizer:
        from r1lab.model.load import load_tokenizer

        return load_tokenizer(cfg.tokenizer)
    from r1lab.tokenizer import R1ZERO_PREAMBLE

    probe = Corpus.__new__(Corpus)  # problems only; no tokenizer needed to draw them
    probe.cfg, probe.tasks = cfg, [get_task(t, **cfg.task_args.get(t, {})) for t in cfg.tasks]
    tools = {t.name: t for t in probe.tasks if isinstance(t, ToolTask)} if cfg.tool_fraction else {}
    texts = [
        f"{R1ZERO_PREAMBLE} User: {p.prompt}. Assistant:"
        f"{completion_text(p, False, tools[p.task].tool_solution(p) if tools and i % 2 else None)}"
        for i, p in enumerate(probe.problems(cfg.seed + 7919, 3000))
    ]
    return train_tokenizer(texts, vocab_size=cfg.vocab_size)


def build_model(cfg: PretrainConfig, tok) -> DeepseekV3:
    mcfg = tiny_config(
        len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{"max_position_embeddings": max(512, cfg.seq_len), **cfg.model},
    )
    torch.manual_seed(cfg.seed)
    return DeepseekV3(mcfg)


def quick_eval(model, tok, cfg: PretrainConfig, seed: int = 0) -> dict:
    """Held-out greedy figures per task (`r1lab.eval.greedy_check`); with a corpus that calls the tool, the replies
    may call it too."""
    from r1lab.eval import greedy_check
    from r1lab.tools import make_tool

    tasks = {name: get_task(name, **cfg.task_args.get(name, {})) for name in cfg.tasks}
    tools = make_tool("python", tok) if cfg.tool_fraction else None
    return greedy_check(model, tok, tasks, cfg.template, cfg.eval_problems, cfg.seq_len // 2, tools, seed)


def pretrain(cfg: PretrainConfig, resume: bool = True, progress: bool = True):
    """Train (or resume) and return (model, tokenizer, run). The final model is written to `<out>/model`."""
    from r1lab.cost import training_flops_per_token
    from r1lab.model.checkpoint import load_model
    from r1lab.model.load import load_tokenizer

    if dist.world() > cfg.rows:
        raise ValueError(
            f"rows ({cfg.rows}) is smaller than the number of processes ({dist.world()}); every "
            "process trains on a share of the step's rows: raise --rows"
        )
    s = loop.open_run(cfg, resume)
    run, device = s.run, s.device
    if s.finished:
        return load_model(run.model_dir, device=device), load_tokenizer(run.model_dir), run
    if s.state:
        model, tok = load_model(run.checkpoint_dir, device=device), load_tokenizer(run.checkpoint_dir)
    else:
        tok = build_tokenizer(cfg)
        model = build_model(cfg, tok).to(device)
    carry_template(tok, cfg.template)  # the model directory renders the prompts it was trained on
    model.train()
    forward = dist.wrap(model, _forward, cfg.parallel)  # before the optimiser: FSDP shards the parameters
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    start = loop.restore(opt, s.state)
    corpus = Corpus(cfg, tok)
    corpus.check_fits()
    meter = loop.Throughput(training_flops_per_token(model.config, cfg.seq_len), s.peak)

    bar = loop.progress(range(start, cfg.steps), cfg.steps, "pretrain", progress)
    for step in bar:
        batch = corpus.batch(step)
        if dist.active():
            batch, weights = process_rows(batch)
        lr = loop.set_lr(opt, step, cfg.steps, cfg)
        dev = lambda t: t.to(device)  # noqa: E731
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16):
            # a 4D mask: samples see the shared preamble and themselves (the MTP loss too: DeepseekV3.forward)
            out = forward(
                dev(batch.input_ids),
                attention_mask=dev(batch.mask()),
                position_ids=dev(batch.position_ids),
                labels=dev(batch.labels),
                token_mask=dev(batch.attention_mask),
            )
        loss, lm_loss = out.loss, out.lm_loss
        if dist.active():  # this process's share of the step's loss (token means by tokens, the balance loss by rows)
            aux = out.aux_loss if out.aux_loss is not None else 0.0
            loss = (out.loss - aux) * weights[0] + aux * weights[1]
            lm_loss = lm_loss * weights[0]
        dist.backward(loss)
        grad_norm = loop.optimizer_step(model, opt, run, step + 1, loss.item(), cfg.grad_clip)
        imbalance = loop.balance_experts(model)
        meter.add(batch.n_tokens)
        done = step + 1
        if loop.due(done, cfg.log_every, cfg.steps):
            loss_v, lm_v = dist.all_sum([loss.item(), lm_loss.item()])
            mtp = dist.all_sum(out.mtp_loss.item()) / dist.world() if out.mtp_loss is not None else None
            row = run.log(
                done,
                loss=loss_v,
                lm_loss=lm_v,
                lr=lr,
                grad_norm=grad_norm,
                mtp_loss=mtp,
                expert_imbalance=imbalance,
                **meter.report(),
            )
            loop.show(bar, loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if done % cfg.eval_every == 0 and done < cfg.steps:
            model.eval()
            with dist.full_weights(forward):  # every process evaluates (the same problems)
                run.log(done, eval=quick_eval(model, tok, cfg))
            model.train()
            meter.pause_until_now()
        if done % cfg.save_every == 0 and done < cfg.steps:
            run.save(model, tok, done, opt)
    model.eval()
    with dist.full_weights(forward):
        run.log(cfg.steps, eval=quick_eval(model, tok, cfg))
    run.finish(model, tok)
    return model, tok, run


def _forward(model, *args, **kwargs):
    return model(*args, **kwargs)


def process_rows(batch: Packed) -> tuple[Packed, tuple[float, float]]:
    """This process's share of the step's rows, and the weights of its losses: its share of the step's label
    tokens (for token means) and of its rows (for the per-row balance loss)."""
    mine = dist.share(batch.input_ids.shape[0])
    part = Packed(
        batch.input_ids[mine],
        batch.position_ids[mine],
        batch.group[mine],
        batch.segment[mine],
        [],
        batch.require_labels()[mine],
    )
    n_mine = int((part.require_labels()[:, 1:] != -100).sum())
    n_all = dist.all_sum(n_mine)
    return part, (n_mine / max(1.0, n_all), (mine.stop - mine.start) / batch.input_ids.shape[0])
