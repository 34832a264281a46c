"""Supervised fine-tuning on chat or prompt/completion JSONL, with the loss on the reply tokens only.

Data, one JSON object per line:
- `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}`: rendered with a
  chat template; every assistant turn is learned (its content and end-of-sequence token), nothing else. Each turn
  is learned after exactly the prompt the template renders for it at inference time (generation prompt included).
- `{"prompt": "...", "completion": "..."}`: strings used as they are, the completion learned (plus EOS); given as
  message lists instead, they are a chat whose completion turns are learned.
Samples are packed into rows of `seq_len` tokens in which no sample attends to another (`r1lab.train.packing`),
for r1lab's native model and any `transformers` causal LM (LoRA and gradient checkpointing via `HFOptions`).
Under torchrun each process takes a share of every micro-batch's rows; `rows` stays the global count, and the loss
is divided by the global number of reply tokens, so N processes take the steps one process takes.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from r1lab import config, trackers
from r1lab.config import opt
from r1lab.model.hf import HFOptions, base_model, is_native, load_trainable, trainable_parameters
from r1lab.reasoning import THINK_START
from r1lab.tokenizer import apply_template, carry_template, check_template
from r1lab.train import dist, loop
from r1lab.train.logprobs import packed_hidden_states
from r1lab.train.packing import Packed, pack
from r1lab.train.run import adamw, check_optimizer

ROLES = ("system", "user", "assistant")


@dataclass
class SFTConfig:
    out: str = opt("runs/sft", "run directory; re-running with the same one resumes")
    model: str = opt("", "model directory to fine-tune (r1lab's DeepSeek-V3 or any transformers causal LM)")
    data: str = opt("", 'JSONL: {"messages": [...]} chats or {"prompt", "completion"} pairs, one per line')
    eval_data: str | None = opt(None, "held-out JSONL; default: eval_fraction of --data")
    eval_fraction: float = opt(0.05, "share of --data held out for the held-out loss (0: none)")
    template: str = opt("model", "chat template for messages: model (the tokenizer's own), r1 or r1zero")
    epochs: int = opt(2, "passes over the data (the R1 recipe fine-tuned for 2)")
    seq_len: int = opt(1024, "packed row length; longer samples are dropped and counted")
    rows: int = opt(4, "packed rows per micro-batch (over all processes under torchrun)")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    lr: float = opt(5e-5, "peak learning rate")
    warmup: int = opt(10, "linear warm-up steps")
    min_lr_ratio: float = opt(0.1, "the cosine schedule ends at lr x this")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    bf16: bool | None = opt(None, "bf16 autocast for matmuls; none: on GPUs with bf16, float32 on CPUs")
    hf: HFOptions = opt(factory=HFOptions, help="")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (CUDA when present)")
    parallel: str = opt("ddp", "under torchrun: ddp (a replica per process) or fsdp (weights sharded)")
    eval_every: int = opt(0, "steps between held-out losses; 0: at the end only")
    log_every: int = opt(1, "steps between metrics rows")
    save_every: int = opt(50, "steps between checkpoints")
    seed: int = opt(0, "seed of the data order and LoRA's initial adapters")
    report_to: list[str] = opt(
        factory=list,
        help="experiment trackers that also get the metrics, config and "
        "samples: tensorboard, wandb, mlflow (comma-separated; each an "
        "extra: pip install 'r1lab[wandb]')",
    )

    def validate(self, files: bool = True) -> SFTConfig:
        """Check the settings; `files=False` skips the data files (a caller that writes them later)."""
        config.require_finite(self)
        if not self.model:
            raise ValueError("--model is required: the model directory to fine-tune")
        if not self.data:
            raise ValueError(
                '--data is required: a JSONL file of chats ({"messages": [...]}) or prompt/completion pairs'
            )
        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if files and path and not Path(path).is_file():
                raise FileNotFoundError(
                    f"--{name.replace('_', '-')} {path} is a directory; give the JSONL file"
                    if Path(path).is_dir()
                    else f"--{name.replace('_', '-')} file not found: {path}"
                )
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1) (got {self.eval_fraction})")
        check_template(self.template)
        for name in ("epochs", "seq_len", "rows", "grad_accum", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.eval_every < 0 or self.warmup < 0:
            raise ValueError(f"eval_every and warmup must be >= 0 (got {self.eval_every}, {self.warmup})")
        check_optimizer(self)
        self.hf.validate()
        dist.check_parallel(self.parallel, self.hf.lora)
        trackers.check(self.report_to)
        return self


# ----------------------------------------------------------------------------- data


def read_examples(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file, checked: a bad line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "save the data as UTF-8 JSONL"
                ) from None
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{i}: not valid JSON ({e.msg} at column {e.pos + 1}); one object per line"
                ) from None
            problem = check_example(ex)
            if problem:
                raise ValueError(f"{path}:{i}: {problem}")
            out.append(ex)
    if not out:
        raise ValueError(f"{path} holds no examples; write one JSON object per line")
    return out


def check_example(ex) -> str | None:
    """What is wrong with one example, or None."""
    if not isinstance(ex, dict):
        return f"expected a JSON object, got {type(ex).__name__}"
    if "messages" in ex:
        return _check_messages(ex["messages"], "messages", need_assistant=True)
    if "prompt" in ex and "completion" in ex:
        p, c = ex["prompt"], ex["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return None if c else "empty completion: nothing to learn"
        if isinstance(p, list) and isinstance(c, list):
            return _check_messages(p, "prompt", need_assistant=False) or _check_messages(
                p + c, "prompt + completion", need_assistant=True, learn_from=len(p)
            )
        return "prompt and completion must both be strings or both be lists of messages"
    return f"needs 'messages' (a list of {{role, content}}) or 'prompt' and 'completion'; it has {sorted(ex)}"


def _check_messages(msgs, name: str, need_assistant: bool, learn_from: int = 0) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return f"'{name}' must be a non-empty list of {{role, content}} messages"
    seen_user = False
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            return (
                f'{name}[{j}] must be {{"role": one of {", ".join(ROLES)}, "content": a string}} '
                f"(got {json.dumps(m)[:80]})"
            )
        if m["role"] == "assistant" and not seen_user:
            return f"{name}[{j}] is an assistant turn with no user turn before it"
        seen_user |= m["role"] == "user"
    if need_assistant and not any(m["role"] == "assistant" for m in msgs[learn_from:]):
        return f"'{name}' has no assistant turn to learn"
    return None


def strip_prefill(prompt: str, reply: str) -> str:
    """A reply minus the opening think tag that the prompt already ends with (R1's template prefills `<think>\\n`)."""
    head = prompt.rstrip()
    if head.endswith(THINK_START) and reply.lstrip().startswith(THINK_START):
        reply = reply.lstrip()[len(THINK_START) :]
        ws = prompt[len(head) :]
        if ws and reply.startswith(ws):
            reply = reply[len(ws) :]
    return reply


def chat_samples(tok, messages: list[dict], template: str, learn_from: int = 0) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) samples of one conversation that learn its assistant turns from `learn_from` on.
    Each turn follows the prompt the template renders for the conversation before it. When every prompt extends
    the previous prompt and reply (ChatML-like templates), the turns share one sample; otherwise (R1's template
    drops past thinking from the history) each turn is a sample of its own."""
    if tok.eos_token is None:
        raise ValueError("the tokenizer has no eos_token, so a reply cannot be taught to end; set one")
    turns = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i >= learn_from:
            prompt = apply_template(tok, messages[:i], template, add_generation_prompt=True)
            turns.append((prompt, strip_prefill(prompt, m["content"]) + tok.eos_token))
    pieces, text = [(turns[0][0], 0), (turns[0][1], 1)], turns[0][0] + turns[0][1]
    for prompt, reply in turns[1:]:
        if not prompt.startswith(text):
            return [_encode(tok, [(p, 0), (r, 1)]) for p, r in turns]
        pieces += [(prompt[len(text) :], 0), (reply, 1)]
        text = prompt + reply
    return [_encode(tok, pieces)]


def _encode(tok, pieces: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Each piece tokenized on its own, as the sampler encodes a prompt and then generates the reply."""
    ids, mask = [], []
    for text, learn in pieces:
        if text:
            t = tok(text, add_special_tokens=False)["input_ids"]
            ids += t
            mask += [learn] * len(t)
    return ids, mask


def tokenize_example(tok, ex: dict, template: str) -> list[tuple[list[int], list[int]]]:
    if "messages" in ex:
        return chat_samples(tok, ex["messages"], template)
    if isinstance(ex["prompt"], list):
        return chat_samples(tok, ex["prompt"] + ex["completion"], template, learn_from=len(ex["prompt"]))
    if tok.eos_token is None:
        raise ValueError("the tokenizer has no eos_token, so a completion cannot be taught to end; set one")
    return [_encode(tok, [(ex["prompt"], 0), (ex["completion"] + tok.eos_token, 1)])]


def held_out_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) example indices: a seeded random `fraction`, at least one when fraction > 0 and n > 1."""
    k = 0 if fraction <= 0 or n < 2 else max(1, round(n * fraction))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[k:]), sorted(order[:k])


@dataclass
class SFTData:
    """Tokenized and packed training and held-out rows; the row order of an epoch is a function of (seed, epoch)."""

    train: Packed
    held_out: Packed | None
    stats: dict

    def order(self, epoch: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(self.train.input_ids.shape[0], generator=g)


def build_data(cfg: SFTConfig, tok) -> SFTData:
    examples = read_examples(cfg.data)
    if cfg.eval_data:
        train_ex, eval_ex = examples, read_examples(cfg.eval_data)
    else:
        tr, ev = held_out_split(len(examples), cfg.eval_fraction, cfg.seed)
        train_ex, eval_ex = [examples[i] for i in tr], [examples[i] for i in ev]
    stats = {"examples": len(train_ex), "held_out_examples": len(eval_ex)}

    def samples(exs, kind):
        out, dropped = [], 0
        for ex in exs:
            for ids, mask in tokenize_example(tok, ex, cfg.template):
                if len(ids) > cfg.seq_len:
                    dropped += 1
                elif sum(mask):
                    out.append((ids, mask))
        stats[f"{kind}_dropped_too_long"] = dropped
        return out

    train, held = samples(train_ex, "train"), samples(eval_ex, "held_out")
    if not train:
        raise ValueError(
            f"no training sample of {cfg.data} fits seq_len={cfg.seq_len} "
            f"({stats['train_dropped_too_long']} longer); raise --seq-len"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    stats.update(
        train_samples=len(train),
        held_out_samples=len(held),
        train_label_tokens=sum(sum(m) for _, m in train),
        train_tokens=sum(len(i) for i, _ in train),
    )
    packed = pack(train, cfg.seq_len, pad_id=pad)
    stats["train_rows"] = packed.input_ids.shape[0]
    return SFTData(packed, pack(held, cfg.seq_len, pad_id=pad) if held else None, stats)


def select_rows(packed: Packed, rows: torch.Tensor) -> Packed:
    """These rows, trimmed to their longest real content."""
    n = int((packed.group[rows] >= 0).sum(1).max())
    return Packed(
        packed.input_ids[rows, :n],
        packed.position_ids[rows, :n],
        packed.group[rows, :n],
        packed.segment[rows, :n],
        [],
        packed.require_labels()[rows, :n],
    )


# ----------------------------------------------------------------------------- loss


def token_losses(model, batch: Packed) -> torch.Tensor:
    """Cross-entropy [R, L] of each label token predicted from the column before it (0 elsewhere); the vocabulary
    projection runs only where a label is predicted. Packed samples see only themselves."""
    h, head, cap = packed_hidden_states(model, batch)
    labels = batch.require_labels()
    r, c = (labels != -100).nonzero(as_tuple=True)
    dev = h.device
    logits = head(h.reshape(-1, h.shape[-1])[(r * labels.shape[1] + c - 1).to(dev)]).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    ce = F.cross_entropy(logits, labels[r, c].to(dev), reduction="none")
    out = torch.zeros(labels.shape, dtype=ce.dtype, device=dev)
    return out.index_put((r.to(dev), c.to(dev)), ce)


def _micro_batch_loss(model, batch: Packed):
    """(summed reply-token cross-entropy, balance loss or None): the training forward that DDP or FSDP wraps."""
    return token_losses(model, batch).sum(), _aux_loss(model)


def _aux_loss(model) -> torch.Tensor | None:
    """The native MoE's sequence-wise balance loss of the last forward, when its config asks for one."""
    if not is_native(model):
        return None
    aux = [m.aux_loss for m in base_model(model).main_moe() if getattr(m, "aux_loss", None) is not None]
    return torch.stack(aux).sum() if aux else None


@torch.no_grad()
def held_out_loss(model, packed: Packed, rows: int, bf16: bool, device) -> float:
    """Mean cross-entropy per reply token over the held-out rows (no dropout); processes split the rows."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        starts = range(0, packed.input_ids.shape[0], rows)
        for i in starts[dist.share(len(starts))]:
            batch = select_rows(packed, torch.arange(i, min(i + rows, packed.input_ids.shape[0])))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                total += token_losses(model, batch).sum().item()
            n += int((batch.require_labels() != -100).sum())
    finally:
        model.train(was)
    total, n = dist.all_sum([total, n])
    return total / max(1, n)


# ----------------------------------------------------------------------------- training


def sft(cfg: SFTConfig, resume: bool = True, progress: bool = True):
    """Fine-tune (or resume) and return (model, tokenizer, run); the final model (LoRA merged) is `<out>/model`."""
    from r1lab.cost import training_flops_per_token
    from r1lab.model.load import load_model_and_tokenizer

    s = loop.open_run(cfg, resume)
    run, device, bf16 = s.run, s.device, s.bf16
    if s.finished:
        model, tok = load_model_and_tokenizer(run.model_dir, device=device)
        return model, tok, run
    torch.manual_seed(cfg.seed)  # LoRA's initial adapters and dropout
    model, tok = load_trainable(cfg.model, cfg.hf, device=device, resume_from=run.checkpoint_dir if s.state else None)
    carry_template(tok, cfg.template)  # the model directory renders the prompts it was trained on
    data = build_data(cfg, tok)
    model.train()
    forward = dist.wrap(model, _micro_batch_loss, cfg.parallel)  # before the optimiser: FSDP shards the parameters
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    start = loop.restore(opt, s.state)
    n_rows = data.train.input_ids.shape[0]
    micro_per_epoch = math.ceil(n_rows / cfg.rows)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch
    if start == 0:
        trainable, params = trainable_parameters(model)
        run.log(
            0, **data.stats, steps=total, steps_per_epoch=steps_per_epoch, trainable_params=trainable, params=params
        )
    try:  # counted as full training (3 x forward), the usual convention for MFU, even when LoRA freezes the base
        fpt = training_flops_per_token(base_model(model).config, cfg.seq_len, include_mtp=False)
    except (ValueError, KeyError):
        fpt = None
    meter = loop.Throughput(fpt, s.peak)

    bar = loop.progress(range(start, total), total, "sft", progress)
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        order = data.order(epoch, cfg.seed)
        micro = range(k * cfg.grad_accum, min((k + 1) * cfg.grad_accum, micro_per_epoch))
        parts = [order[m * cfg.rows : (m + 1) * cfg.rows] for m in micro]
        mine = [p[dist.share(len(p))] for p in parts]  # this process's rows of each micro-batch (all of them alone)
        batches = [select_rows(data.train, r) if len(r) else None for r in mine]
        n_labels = int(dist.all_sum(sum(int((b.require_labels() != -100).sum()) for b in batches if b is not None)))
        lr = loop.set_lr(opt, step, total, cfg)
        loss_sum, step_tokens = 0.0, 0
        for i, b in enumerate(batches):
            with dist.accumulate(forward, sync=i == len(batches) - 1):
                if b is None:  # fewer rows than processes: a pass that adds nothing keeps DDP/FSDP in step
                    with dist.uncounted(model), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        ce, aux = forward(select_rows(data.train, order[:1]))
                    dist.backward((ce + (aux if aux is not None else 0.0)) * 0.0)
                    continue
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    ce, aux = forward(b)
                weight = len(mine[i]) / len(parts[i])  # the balance loss is a mean over the micro-batch's rows
                loss = ce / n_labels + (aux * weight / len(batches) if aux is not None else 0.0)
                dist.backward(loss)
            loss_sum += ce.item()
            step_tokens += b.n_tokens
        loss_sum = dist.all_sum(loss_sum)
        meter.add(step_tokens)
        grad_norm = loop.optimizer_step(model, opt, run, step + 1, loss_sum, cfg.grad_clip)
        if is_native(model):
            loop.balance_experts(model)
        done = step + 1
        if loop.due(done, cfg.log_every, total):
            row = run.log(
                done,
                loss=loss_sum / n_labels,
                lr=lr,
                grad_norm=grad_norm,
                epoch=done / steps_per_epoch,
                label_tokens=n_labels,
                **meter.report(),
            )
            loop.show(bar, loss=f"{row['loss']:.3f}")
        if data.held_out is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < total:
            with dist.full_weights(forward):
                run.log(done, eval_loss=held_out_loss(model, data.held_out, cfg.rows, bf16, device))
            meter.pause_until_now()
        if done % cfg.save_every == 0 and done < total:
            run.save(model, tok, done, opt)
    if data.held_out is not None:
        with dist.full_weights(forward):
            run.log(total, eval_loss=held_out_loss(model, data.held_out, cfg.rows, bf16, device))
    model.eval()
    run.finish(model, tok)  # a LoRA model is merged into its base here
    return base_model(model), tok, run
