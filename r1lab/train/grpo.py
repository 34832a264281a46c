"""GRPO with verifiable rewards (DeepSeekMath; the RL of DeepSeek-R1-Zero) and its known variants.

One step: draw prompts, sample G completions each with the shared sampler, reward them, turn rewards into
group-relative advantages, and take `mu` optimiser steps on the clipped surrogate (minus beta * KL to a frozen
reference when beta > 0). Variants are settings: Dr. GRPO (advantage_scale=False, loss_agg="drgrpo"), DAPO
(epsilon_high > epsilon_low, dynamic_sampling, loss_agg="token-mean", mask_truncated or the overlong reward).

Engineering that keeps a step cheap:
- old-policy log-probs come from the sampler (no extra forward) unless mu > 1 asks for them to be reused;
- no reference model exists when beta == 0;
- training rows lay each group out as [prompt | c1 | ... | cG] with a mask that lets every completion see the
  prompt and itself only: the prompt is forwarded once per group, not G times, and the result is identical;
- groups are packed into rows without padding between them, and `lm_head` runs only where a completion token
  is predicted.

Under torchrun (`r1lab.train.dist`) every process draws the same prompts and samples a contiguous share of them,
whole groups only, each prompt from its own seed: N processes sample exactly the completions one process would, and
every group's advantages use all G of its rewards, computed where the group was sampled. Losses divide by the
completion and token counts of the whole step (summed over processes), so the update equals one process's.
`rollout="vllm"` samples with a colocated vLLM engine instead (`r1lab.train.vllm_rollout`).
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field

import torch

from r1lab import config as C
from r1lab.reasoning import split_reasoning
from r1lab.rewards import get_reward
from r1lab.sampler import Completion, Sampler, SamplingParams
from r1lab.tasks import Problem, get_task
from r1lab.model.hf import HFOptions
from r1lab.tokenizer import carry_template, render_prompt
from r1lab.runtime import use_bf16
from r1lab.train import dist as D
from r1lab.train import losses as L
from r1lab.train.advantages import get_advantage, zero_variance_groups
from r1lab.train.packing import Packed, assign_rows, pack_groups
from r1lab.train.run import Run, adamw, cosine_lr, set_rng_state


@dataclass
class GRPOConfig:
    out: str = "runs/grpo"
    model: str = ""                   # policy: a model directory (native r1lab or any transformers causal LM)
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    task_args: dict = field(default_factory=dict)
    template: str = "r1zero"          # r1zero | r1 | model
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "format"])  # names or path.py:function
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.1])
    steps: int = 40
    max_seconds: float = 0.0          # stop after the step that reaches this much training time (0: no limit)
    prompts_per_step: int = 16
    num_generations: int = 8          # G, completions per prompt
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 5e-5                  # 1e-4 also taught the tiny model to think, but wore its arithmetic down
    warmup: int = 5
    min_lr_ratio: float = 1.0         # 1.0: constant after warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta: float = 0.0                 # KL weight; 0 keeps no reference model
    kl_estimator: str = "k3"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2         # DAPO clip-higher: 0.28
    advantage: str = "grpo"           # grpo | rloo
    advantage_scale: bool = True      # divide by the group std (False: Dr. GRPO)
    loss_agg: str = "seq-mean"        # seq-mean (GRPO) | token-mean (DAPO) | drgrpo
    dynamic_sampling: bool = False    # DAPO: drop zero-variance groups, draw more prompts
    max_resample_rounds: int = 3
    mask_truncated: bool = False      # DAPO overlong filtering: no loss on completions cut at max_new_tokens
    mu: int = 1                       # optimiser steps per rollout batch
    balance_experts: bool = False     # keep nudging MoE routing biases during RL (off: routing stays as pretrained,
                                      # so the policy changes only through the gradient the rewards asked for)
    micro_batch_tokens: int = 16384   # training tokens per forward (gradient accumulation above that)
    row_tokens: int = 256             # packed row length (a group longer than this gets a row alone): masked
                                      # attention grows with the square of it; 256 vs 1024 made updates 1.7x faster
    bf16: bool | None = None          # bf16 autocast; None: on GPUs with bf16, float32 on CPUs (runtime.use_bf16)
    hf: HFOptions = field(default_factory=HFOptions)  # transformers models: LoRA, gradient checkpointing, dtype
    device: str = "auto"              # auto: CUDA when present, else CPU
    parallel: str = "ddp"             # under torchrun: ddp (a replica per process) | fsdp (weights sharded)
    rollout: str = "native"           # native (r1lab's sampler) | vllm (transformers models on GPU, colocated)
    vllm_gpu_memory: float = 0.3      # --rollout vllm: share of the GPU for vLLM's weights and KV cache
    eval_every: int = 0               # 0: only at the end
    eval_problems: int = 200
    log_every: int = 1
    save_every: int = 20
    seed: int = 0

    def validate(self) -> "GRPOConfig":
        C.require_finite(self)
        if not self.model:
            raise ValueError("--model is required: a model directory to train")
        if len(self.rewards) != len(self.reward_weights):
            raise ValueError(f"rewards ({len(self.rewards)}) and reward_weights ({len(self.reward_weights)}) "
                             "must have the same length")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 for group-relative advantages (got {self.num_generations})")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "mu", "micro_batch_tokens", "row_tokens", "log_every",
                     "save_every", "eval_problems"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for RL sampling (got {self.temperature})")
        if self.beta < 0 or self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError("beta, epsilon_low and epsilon_high must be >= 0")
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0 (got {self.max_seconds}); 0 runs every step")
        self.hf.validate()
        D.check_parallel(self.parallel, self.hf.lora)
        if self.rollout not in ("native", "vllm"):
            raise ValueError(f"rollout must be native or vllm (got {self.rollout!r})")
        if self.rollout == "vllm":
            from r1lab.train.vllm_rollout import check_available

            if not 0 < self.vllm_gpu_memory < 1:
                raise ValueError(f"vllm_gpu_memory must be in (0, 1) (got {self.vllm_gpu_memory})")
            check_available()
        get_advantage(self.advantage), L.get_aggregation(self.loss_agg), L.get_kl(self.kl_estimator)
        for t in self.tasks:
            get_task(t, **self.task_args.get(t, {}))
        for spec in self.rewards:
            get_reward(spec)
        return self


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    problems: list[Problem]
    prompt_ids: list[list[int]]
    completions: list[list[Completion]]      # [P][G]
    rewards: torch.Tensor                    # [P, G], NaN where no reward could judge
    parts: dict[str, torch.Tensor]           # per reward function [P, G]
    correct: torch.Tensor                    # [P, G] accuracy (NaN where not judged)
    zero_variance_share: float = 0.0
    rounds: int = 1

    @property
    def flat(self) -> list[Completion]:
        return [c for group in self.completions for c in group]


def score(completions: list[list[Completion]], problems: list[Problem], fns, weights, accuracy_fn):
    """Weighted sum of reward functions (None -> NaN, skipped in the sum like TRL; all None -> NaN)."""
    flat = [c for g in completions for c in g]
    G = len(completions[0])
    cols = dict(completions=[c.text for c in flat],
                answer=[p.answer for p in problems for _ in range(G)],
                task=[p.task for p in problems for _ in range(G)],
                prompts=[p.prompt for p in problems for _ in range(G)],
                meta=[p.meta for p in problems for _ in range(G)],
                completion_ids=[c.token_ids for c in flat])
    parts = {}
    total = torch.zeros(len(flat), dtype=torch.float64)
    judged = torch.zeros(len(flat), dtype=torch.bool)
    for spec, fn, w in zip(fns.keys(), fns.values(), weights):
        vals = fn(**cols)
        if len(vals) != len(flat):
            raise ValueError(f"reward {spec!r} returned {len(vals)} values for {len(flat)} completions")
        r = torch.tensor([math.nan if v is None else float(v) for v in vals], dtype=torch.float64)
        parts[spec] = r.view(-1, G)
        ok = ~torch.isnan(r)
        total += torch.where(ok, w * r, torch.zeros_like(r))
        judged |= ok
    total[~judged] = math.nan
    acc = torch.tensor([math.nan if v is None else float(v) for v in accuracy_fn(**cols)], dtype=torch.float64)
    return total.view(-1, G), parts, acc.view(-1, G)


# ----------------------------------------------------------------------------- training layout


@dataclass
class Layout:
    """Packed [prompt | c1 | ... | cG] groups, and for every completion token where its prediction is read."""
    packed: Packed
    pred_index: torch.Tensor      # [M] flat index (row * L + col) of the hidden state predicting each token
    target: torch.Tensor          # [M] the completion token
    seq: torch.Tensor             # [M] completion number in the batch (prompt-major)
    pos: torch.Tensor             # [M] token number within its completion

    @property
    def n_tokens(self) -> int:
        return self.packed.n_tokens


def build_layouts(prompt_ids: list[list[int]], completion_ids: list[list[list[int]]], max_tokens: int,
                  pad_id: int, row_tokens: int = 256) -> list[Layout]:
    """Groups packed into rows of about `row_tokens` (a prompt shared by its G completions; a longer group gets a
    row of its own), rows split into micro-batches of about `max_tokens` tokens. A completion's first token is
    predicted from its prompt's last token."""
    sizes = [len(p) + sum(len(c) for c in cs) for p, cs in zip(prompt_ids, completion_ids)]
    cap = max(row_tokens, max(sizes))
    rows = assign_rows(sizes, cap)
    G = len(completion_ids[0])
    layouts, current, used = [], [], 0
    for row in rows + [None]:
        n_row = sum(sizes[g] for g in row) if row else 0
        if current and (row is None or used + n_row > max_tokens):
            members = [g for r in current for g in r]
            local = {g: i for i, g in enumerate(members)}
            packed = pack_groups([(prompt_ids[g], completion_ids[g]) for g in members], cap, pad_id,
                                 rows=[[local[g] for g in r] for r in current])
            layouts.append(_index(packed, members, prompt_ids, completion_ids, G))
            current, used = [], 0
        if row is not None:
            current.append(row)
            used += n_row
    return layouts


def _index(packed: Packed, members, prompt_ids, completion_ids, G) -> Layout:
    L_ = packed.input_ids.shape[1]
    pred, tgt, seq, tpos = [], [], [], []
    for i, g in enumerate(members):
        (r0, c0) = packed.places[i][0]
        last_prompt = r0 * L_ + c0 - 1
        for j, ((r, at), c) in enumerate(zip(packed.places[i], completion_ids[g])):
            m = len(c)
            pred.append(torch.cat([torch.tensor([last_prompt]), r * L_ + at + torch.arange(m - 1)]))
            tgt.append(torch.tensor(c))
            seq.append(torch.full((m,), g * G + j))
            tpos.append(torch.arange(m))
    return Layout(packed, torch.cat(pred), torch.cat(tgt), torch.cat(seq), torch.cat(tpos))


# ------------------------------------------------------------------ grouped layout (native and Llama-family models)


@dataclass
class GroupBatch:
    """Prompts [P, Lp] and their completions [N, Lc] held apart, both right-padded (see `grouped_model`: each prompt
    runs once and completions do not score each other; see DeepseekV3.grouped_hidden_states)."""
    prompt_ids: torch.Tensor
    prompt_lens: torch.Tensor
    completion_ids: torch.Tensor
    completion_lens: torch.Tensor
    group: torch.Tensor           # [N] the prompt (row of prompt_ids) each completion continues
    target: torch.Tensor          # [M] completion tokens, completion by completion
    seq: torch.Tensor             # [M] completion number in the batch (prompt-major)
    pos: torch.Tensor             # [M] token number within its completion

    @property
    def n_tokens(self) -> int:
        return int(self.prompt_lens.sum() + self.completion_lens.sum())


def build_group_batches(prompt_ids: list[list[int]], completion_ids: list[list[list[int]]], max_tokens: int,
                        pad_id: int) -> list[GroupBatch]:
    """Consecutive groups in micro-batches of about `max_tokens` real tokens (at least one group each)."""
    G = len(completion_ids[0])
    sizes = [len(p) + sum(len(c) for c in cs) for p, cs in zip(prompt_ids, completion_ids)]
    batches, current, used = [], [], 0
    for g in list(range(len(prompt_ids))) + [None]:
        if current and (g is None or used + sizes[g] > max_tokens):
            batches.append(_group_batch(current, prompt_ids, completion_ids, G, pad_id))
            current, used = [], 0
        if g is not None:
            current.append(g)
            used += sizes[g]
    return batches


def _group_batch(members, prompt_ids, completion_ids, G, pad_id) -> GroupBatch:
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(  # noqa: E731
        [torch.tensor(x, dtype=torch.long) for x in xs], batch_first=True, padding_value=pad_id)
    comps = [c for g in members for c in completion_ids[g]]
    seq = torch.cat([torch.full((len(c),), g * G + j) for g in members for j, c in enumerate(completion_ids[g])])
    return GroupBatch(pad([prompt_ids[g] for g in members]), torch.tensor([len(prompt_ids[g]) for g in members]),
                      pad(comps), torch.tensor([len(c) for c in comps]),
                      torch.arange(len(members)).repeat_interleave(G), torch.tensor([t for c in comps for t in c]),
                      seq, torch.cat([torch.arange(len(c)) for c in comps]))


# ----------------------------------------------------------------------------- policy log-probs


def _backbone(model):
    """(hidden_fn(ids, mask4d, pos) -> final hidden states, lm_head, soft-cap or None) for native or HF models."""
    from r1lab.model.deepseek import DeepseekV3

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base, DeepseekV3):
        return ((lambda ids, mask, pos, real: base.hidden_states(ids, mask, pos, token_mask=real)),
                base.lm_head, None, True)
    decoder = base.get_decoder()
    cap = getattr(base.config, "final_logit_softcapping", None)
    return ((lambda ids, mask, pos, real: decoder(input_ids=ids, attention_mask=mask,
                                                  position_ids=pos).last_hidden_state),
            base.get_output_embeddings(), cap, False)


def token_logprobs(model, lay: "Layout | GroupBatch", temperature: float, entropy: bool = False):
    """log pi(token) at the sampling temperature for every completion token of the layout [M] (and entropy)."""
    hidden_fn, head, cap, native = _backbone(model)
    if isinstance(lay, GroupBatch):
        return _logprobs(_grouped_hidden(grouped_model(model), lay), head, cap, lay.target, temperature, entropy)
    mask = lay.packed.mask()
    if not native:  # transformers adds 4D masks to the scores in eager attention: make it additive
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    dev = head.weight.device
    h = hidden_fn(lay.packed.input_ids.to(dev), mask.to(dev), lay.packed.position_ids.to(dev),
                  lay.packed.attention_mask.to(dev))
    return _logprobs(h.reshape(-1, h.shape[-1])[lay.pred_index.to(dev)], head, cap, lay.target, temperature, entropy)


def grouped_model(model):
    """What runs GRPO's grouped layout for `model`: the native DeepSeek-V3 itself, a Llama-family transformers model
    through `FastDecoder`, or None (other models train on packed rows)."""
    from r1lab.model.llama import fast_decoder

    base = _backbone_base(model)
    return base if type(base).__name__ == "DeepseekV3" else fast_decoder(model)


def _grouped_hidden(base, b: GroupBatch) -> torch.Tensor:
    """Hidden states predicting each completion token [M]: the prompt's last for the first token, then the
    completion's own."""
    dev = base.lm_head.weight.device
    p_lens, c_lens, group = b.prompt_lens.to(dev), b.completion_lens.to(dev), b.group.to(dev)
    hp, hc = base.grouped_hidden_states(b.prompt_ids.to(dev), p_lens, b.completion_ids.to(dev), c_lens, group,
                                        padded=False)                       # real tokens only, row by row
    last = hp.index_select(0, p_lens.cumsum(0) - 1)                             # [P] each prompt's last token
    n = torch.arange(len(c_lens), device=dev).repeat_interleave(c_lens)         # [M] completion of each token
    pos = b.pos.to(dev)
    prev = (c_lens.cumsum(0) - c_lens)[n] + pos - 1                             # the token before, in hc
    return torch.cat([hc, last]).index_select(0, torch.where(pos == 0, len(hc) + group[n], prev))


def _logprobs(h, head, cap, target, temperature: float, entropy: bool):
    logits = head(h).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp_all = (logits / temperature).log_softmax(-1)
    logp = logp_all.gather(1, target.to(h.device)[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1).detach() if entropy else None
    return logp, ent


def to_matrix(values: torch.Tensor, lay: Layout, shape) -> torch.Tensor:
    out = values.new_zeros(shape)
    out[lay.seq.to(values.device), lay.pos.to(values.device)] = values
    return out


# ----------------------------------------------------------------------------- the trainer


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig, model=None, tokenizer=None, resume: bool = True, progress: bool = True):
        from r1lab.hardware import measure_matmul_peak
        from r1lab.model.hf import load_trainable
        from r1lab.model.load import load_model_and_tokenizer

        self.cfg = cfg.validate()
        device = D.setup(cfg.device)  # under torchrun: join the process group before anything is written
        self.bf16 = use_bf16(cfg.bf16, device)
        self.run = Run(cfg.out, cfg, resume=resume)
        self.progress = progress
        # measured before any seeding or RNG restore: the measurement draws random numbers (once per process)
        finished = self.run.done() and resume
        self.peak = None if finished else measure_matmul_peak(torch.bfloat16 if self.bf16 else torch.float32,
                                                              device=device)
        self.state = None if finished else self.run.load()  # a finished run keeps all its metrics
        torch.manual_seed(cfg.seed)  # LoRA's initial adapters
        if finished:  # the final model (LoRA merged into it); train() returns it at once
            model, tokenizer = load_model_and_tokenizer(self.run.model_dir, device=device)
        elif self.state:  # full weights, or LoRA adapters put back over cfg.model
            model, tokenizer = load_trainable(cfg.model, cfg.hf, device=device, resume_from=self.run.checkpoint_dir)
        elif model is None:
            model, tokenizer = load_trainable(cfg.model, cfg.hf, device=device)
        if not finished:
            carry_template(tokenizer, cfg.template)  # the model directory renders the prompts it was trained on
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device
        self.native = type(_backbone_base(model)).__name__ == "DeepseekV3"
        # prompts once per group in training: native models, and Llama-family ones unless FSDP shards their layers
        # (FastDecoder calls a layer's modules, not its forward, where FSDP gathers the shards)
        self.grouped = self.native or (grouped_model(model) is not None
                                       and not (D.active() and cfg.parallel == "fsdp"))
        self.ref = None
        if cfg.beta > 0:  # the initial policy, frozen (a resumed run rebuilds it from the starting model)
            self.ref = (load_model_and_tokenizer(cfg.model, device=self.device)[0] if self.state
                        else copy.deepcopy(model))
            self.ref.eval().requires_grad_(False)
        # the training forward: plain, or inside DDP / FSDP under torchrun (before the optimiser: FSDP shards)
        self.policy = D.wrap(model, token_logprobs, cfg.parallel)
        self.opt = adamw(model, cfg.lr, cfg.weight_decay)
        self.start = 0
        if self.state:
            D.load_optimizer_state(self.opt, self.state["optimizer"])
            set_rng_state(self.state["rng"])
            self.start = self.state["step"]
        self.step = self.start  # the step being taken (named in errors)
        self.seconds = self.state["extra"].get("seconds", 0.0) if self.state else 0.0  # training time so far
        if cfg.rollout == "vllm":
            if self.native:
                raise ValueError("--rollout vllm samples transformers models; r1lab's native DeepSeek-V3 samples with "
                                 "--rollout native")
            from r1lab.train.vllm_rollout import VLLMRollout

            dtype = cfg.hf.dtype if cfg.hf.dtype in ("bfloat16", "float16") else "bfloat16"
            with D.full_weights(self.policy):
                self.sampler = VLLMRollout(cfg.model, model, tokenizer, cfg.vllm_gpu_memory, dtype, cfg.seed)
        else:
            self.sampler = Sampler(model, tokenizer)
        self.reward_fns = {spec: get_reward(spec) for spec in cfg.rewards}
        self.accuracy_fn = get_reward("accuracy")
        self.tasks = [get_task(t, **cfg.task_args.get(t, {})) for t in cfg.tasks]

    # -------------------------------------------------------------- data
    def draw(self, step: int, round_: int, n: int) -> list[Problem]:
        rng = random.Random((self.cfg.seed * 1_000_003 + step) * 31 + round_)
        task = self.tasks[rng.randrange(len(self.tasks))]
        return task.problems("train", n=n, seed=rng.randrange(1 << 30))

    def rollout(self, step: int) -> Rollout:
        """This step's scored groups. Every process draws the same prompts and samples its share, whole groups, each
        prompt seeded by (seed, step, round, its place in the draw); only the kept and zero-variance counts that
        dynamic sampling needs are summed over processes."""
        cfg = self.cfg
        keep_p, keep_ids, keep_c, keep_r, keep_parts, keep_acc = [], [], [], [], [], []
        kept = zero_var_total = groups_total = 0
        rounds = 0
        while kept < cfg.prompts_per_step and rounds <= (cfg.max_resample_rounds if cfg.dynamic_sampling else 0):
            need = cfg.prompts_per_step - kept
            drawn = self.draw(step, rounds, need)
            mine = D.share(len(drawn))
            problems = drawn[mine]
            seed = (cfg.seed * 1_000_003 + step) * 31 + rounds
            zero_round = kept_round = 0
            if problems:
                prompts = [render_prompt(self.tok, p.prompt, cfg.template) for p in problems]
                ids = [self.sampler.encode(p) for p in prompts]
                params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                        top_p=cfg.top_p, n=cfg.num_generations, seed=seed)
                seeds = [(seed * 1_000_003 + i) % (1 << 63) for i in range(mine.start, mine.stop)]
                outs = self.sampler.generate(ids, params, seeds=seeds)
                groups = [outs[i * cfg.num_generations:(i + 1) * cfg.num_generations] for i in range(len(problems))]
                rewards, parts, acc = score(groups, problems, self.reward_fns, cfg.reward_weights, self.accuracy_fn)
                zero = zero_variance_groups(rewards)
                zero_round = int(zero.sum())
                for i in range(len(problems)):
                    if cfg.dynamic_sampling and zero[i]:
                        continue
                    keep_p.append(problems[i]); keep_ids.append(ids[i]); keep_c.append(groups[i])
                    keep_r.append(rewards[i]); keep_acc.append(acc[i])
                    keep_parts.append({k: v[i] for k, v in parts.items()})
                    kept_round += 1
            zero_round, kept_round = D.all_sum([zero_round, kept_round])
            zero_var_total += int(zero_round)
            groups_total += len(drawn)
            kept += int(kept_round)
            rounds += 1
        if not keep_p:  # every group had equal rewards in every round: nothing to learn from this step
            return Rollout([], [], [], torch.zeros(0, cfg.num_generations), {}, torch.zeros(0, cfg.num_generations),
                           zero_var_total / max(1, groups_total), rounds)
        return Rollout(keep_p, keep_ids, keep_c, torch.stack(keep_r),
                       {k: torch.stack([d[k] for d in keep_parts]) for k in keep_parts[0]}, torch.stack(keep_acc),
                       zero_var_total / max(1, groups_total), rounds)

    # -------------------------------------------------------------- update
    def update(self, ro: Rollout, lr: float) -> dict:
        cfg = self.cfg
        dev = self.device
        P, G = ro.rewards.shape
        N, T = P * G, cfg.max_new_tokens
        adv = get_advantage(cfg.advantage)(ro.rewards, scale=cfg.advantage_scale).float().flatten().to(dev)  # [N]
        completion_ids = [[c.token_ids for c in g] for g in ro.completions]
        old = torch.zeros(N, T)
        mask = torch.zeros(N, T)
        for n, c in enumerate(ro.flat):
            old[n, : len(c.logprobs)] = torch.tensor(c.logprobs)
            if not (cfg.mask_truncated and c.finish_reason == "length"):
                mask[n, : len(c.token_ids)] = 1
        layouts = self.layouts(ro.prompt_ids, completion_ids) if P else []
        n_tokens = mask.sum().clamp(min=1)
        n_seqs = N
        if D.active():  # the step's counts over all processes: each process's loss is its share of the mean
            total_tokens, n_seqs = D.all_sum([float(mask.sum()), N])
            n_tokens = torch.tensor(total_tokens).clamp(min=1)
        old, mask, n_tokens = old.to(dev), mask.to(dev), n_tokens.to(dev)
        if cfg.rollout == "vllm":  # vLLM's log-probs come from other kernels: the training forward's, once
            old = self.current_logprobs(layouts, (N, T))
        agg = L.get_aggregation(cfg.loss_agg)
        ref = None
        if self.ref is not None:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                ref = torch.zeros(N, T, device=dev)
                for lay in layouts:
                    lp, _ = token_logprobs(self.ref, lay, cfg.temperature)
                    ref += to_matrix(lp.float(), lay, (N, T))
        for g in self.opt.param_groups:
            g["lr"] = lr
        stats = dict(loss=0.0, kl=0.0, clip_frac=0.0, entropy=0.0)
        batches = D.even_out(layouts)  # as many passes on every process (None: this one has run out)
        for epoch in range(cfg.mu):
            for i, lay in enumerate(batches):
                with D.accumulate(self.policy, sync=i == len(batches) - 1):
                    if lay is None:
                        self._idle_pass()
                        continue
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                        lp, ent = self.policy(lay, cfg.temperature, entropy=epoch == 0)
                    logp = to_matrix(lp.float(), lay, (N, T))
                    m = to_matrix(torch.ones_like(lp, dtype=torch.float), lay, (N, T)) * mask
                    loss_tok, clipped = L.get_policy_loss("clip")(logp, old, adv, cfg.epsilon_low, cfg.epsilon_high)
                    if ref is not None:
                        kl_tok = L.get_kl(cfg.kl_estimator)(logp, ref)
                        loss_tok = loss_tok + cfg.beta * kl_tok
                        stats["kl"] += ((kl_tok.detach() * m).sum() / n_tokens).item() / cfg.mu
                    loss = agg(loss_tok, m, n_tokens, n_seqs, T)
                    D.backward(loss)
                stats["loss"] += loss.item() / cfg.mu
                stats["clip_frac"] += ((clipped * m).sum() / n_tokens).item() / cfg.mu
                if ent is not None:
                    stats["entropy"] += ((to_matrix(ent.float(), lay, (N, T)) * m).sum() / n_tokens).item()
            stats["grad_norm"] = D.clip_grad_norm(self.model.parameters(), cfg.grad_clip).item()
            self.run.check_finite(self.step + 1, loss=stats["loss"], grad_norm=stats["grad_norm"])
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.native and cfg.balance_experts:
                D.sync_expert_load(_backbone_base(self.model))
                _backbone_base(self.model).update_expert_bias()
        stats["trained_tokens"] = sum(lay.n_tokens for lay in layouts)
        if D.active():  # each process summed its shares of the step's means
            keys = ("loss", "kl", "clip_frac", "entropy", "trained_tokens")
            stats.update(zip(keys, D.all_sum([stats[k] for k in keys])))
        return stats

    def layouts(self, prompt_ids: list[list[int]], completion_ids: list[list[list[int]]]) -> list:
        """Training micro-batches: native and Llama-family models keep prompts and completions apart (prompts run
        once, no attention across completions); other transformers models pack [prompt | c1 | ... | cG] rows with a
        4D mask."""
        cfg = self.cfg
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        if self.grouped:
            return build_group_batches(prompt_ids, completion_ids, cfg.micro_batch_tokens, pad)
        return build_layouts(prompt_ids, completion_ids, cfg.micro_batch_tokens, pad, cfg.row_tokens)

    def _idle_pass(self) -> None:
        """A forward and backward that add nothing, for a process with fewer micro-batches than another."""
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        with D.uncounted(self.model), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            lp, _ = self.policy(self.layouts([[pad]], [[[pad]]])[0], self.cfg.temperature)
        D.backward(lp.sum() * 0.0)

    @torch.no_grad()
    def current_logprobs(self, layouts: list, shape) -> torch.Tensor:
        """The policy's log-probs of the sampled tokens as it is now [N, T] (every process runs as many passes)."""
        out = torch.zeros(shape, device=self.device)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for lay in D.even_out(layouts):
            with D.uncounted(self.model), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                          enabled=self.bf16):
                lp, _ = self.policy(lay if lay is not None else self.layouts([[pad]], [[[pad]]])[0],
                                    self.cfg.temperature)
            if lay is not None:
                out += to_matrix(lp.float(), lay, shape)
        return out

    # -------------------------------------------------------------- loop
    def train(self):
        from r1lab.cost import achieved_flops_report, training_flops_per_token

        cfg = self.cfg
        if self.run.done() and self.run.resume:
            return self.model, self.tok, self.run
        try:  # counted as full training (3 x forward), the usual convention for MFU, even when LoRA freezes the base
            fpt = training_flops_per_token(_backbone_base(self.model).config, 512, include_mtp=False)
        except (ValueError, KeyError):  # an architecture the cost model does not know
            fpt = None
        peak = self.peak
        steps = range(self.start, cfg.steps)
        bar = steps
        show = self.progress and D.is_main()
        if show:
            from tqdm import tqdm
            bar = tqdm(steps, desc="grpo", initial=self.start, total=cfg.steps, dynamic_ncols=True)
        for step in bar:
            self.step = step
            t0 = time.perf_counter()
            self.model.eval()
            with D.full_weights(self.policy):  # FSDP: the sampler needs whole weights
                ro = self.rollout(step)
            t1 = time.perf_counter()
            self.model.train()
            lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
            stats = self.update(ro, lr) if D.all_sum(len(ro.problems)) else {"skipped_update": True}
            if cfg.rollout == "vllm" and "skipped_update" not in stats:
                with D.full_weights(self.policy):
                    self.sampler.push(self.model)
            t2 = time.perf_counter()
            self.seconds += t2 - t0
            out_of_time = bool(cfg.max_seconds) and self.seconds >= cfg.max_seconds
            if cfg.max_seconds:  # every process stops after the same step
                out_of_time = bool(D.all_sum(int(out_of_time)))
            row = self.metrics(ro, stats, lr, t1 - t0, t2 - t1)
            if "trained_tokens" in stats and fpt:
                row.update({f"train_{k}": v for k, v in
                            achieved_flops_report(stats["trained_tokens"], t2 - t1, fpt, peak * D.world()).items()})
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or out_of_time:
                self.run.log(step + 1, **row, total_seconds=self.seconds)
            if show:  # a step where nothing could be judged has no reward or accuracy to show
                bar.set_postfix({k: "-" if row[key] is None else f"{row[key]:{fmt}}" for k, key, fmt in (
                    ("reward", "reward_mean", ".2f"), ("acc", "accuracy", ".2f"), ("len", "mean_length", ".0f"),
                    ("think", "think_share", ".2f"))})
            if out_of_time:  # max_seconds reached: this step is the last
                break
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                self.model.eval()
                with D.full_weights(self.policy):  # every process evaluates (the same problems and seeds)
                    self.run.log(step + 1, eval=self.quick_eval())
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                self.run.save(self.model, self.tok, step + 1, self.opt, extra={"seconds": self.seconds})
        self.model.eval()
        self.run.finish(self.model, self.tok)  # a LoRA model is merged into its base here
        return _backbone_base(self.model), self.tok, self.run

    def metrics(self, ro: Rollout, stats: dict, lr: float, sample_s: float, train_s: float) -> dict:
        """The step's row: rollout statistics over every process's groups, and the update's."""
        flat = ro.flat
        lengths = [len(c.token_ids) for c in flat]
        thinks = [bool((split_reasoning(c.text)[0] or "").strip()) for c in flat]
        groups = len(ro.problems)
        if D.active():
            ro, flat, lengths, thinks, groups = _gather_rollout(ro, lengths, thinks)

        def nanmean(t):
            t = t[~torch.isnan(t)]
            return t.mean().item() if len(t) else None

        def nanstd(t):
            t = t[~torch.isnan(t)]
            return t.std().item() if len(t) > 1 else None

        row = dict(reward_mean=nanmean(ro.rewards.flatten()) if flat else float("nan"),
                   reward_std=nanstd(ro.rewards.flatten()) if flat else None,
                   accuracy=nanmean(ro.correct.flatten()) if flat else float("nan"),
                   mean_length=sum(lengths) / len(lengths) if lengths else float("nan"),
                   think_share=sum(thinks) / len(thinks) if thinks else float("nan"),
                   truncated_share=sum(c.finish_reason == "length" for c in flat) / max(1, len(flat)),
                   zero_variance_share=ro.zero_variance_share, sample_rounds=ro.rounds, groups=groups,
                   lr=lr, sample_seconds=sample_s, train_seconds=train_s,
                   sample_tokens_per_s=sum(lengths) / sample_s if sample_s > 0 else None, **stats)
        for name, v in ro.parts.items():
            row[f"reward/{name}/mean"] = nanmean(v.flatten())
            row[f"reward/{name}/std"] = nanstd(v.flatten())
        return row

    def quick_eval(self) -> dict:
        from r1lab.eval import EvalConfig, evaluate, local_generator

        out = {}
        for task, name in zip(self.tasks, self.cfg.tasks):
            probs = task.problems("test", n=self.cfg.eval_problems, seed=0)
            ecfg = EvalConfig(task=name, k=1, template=self.cfg.template, max_new_tokens=self.cfg.max_new_tokens)
            s = evaluate(local_generator(self.model, self.tok, self.cfg.template), probs, ecfg)["summary"]
            out[name] = {"greedy": s["greedy"], "think_share": s["greedy_think_share"],
                         "mean_length": s["greedy_mean_length"]}
        return out


def _backbone_base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _gather_rollout(ro: Rollout, lengths: list[int], thinks: list[bool]):
    """What `metrics` reads of every process's rollout, joined: a Rollout of rewards (completions reduced to their
    finish reasons), lengths, think flags, and the number of groups."""
    G = ro.rewards.shape[1]
    mine = dict(rewards=ro.rewards.tolist(), correct=ro.correct.tolist(), lengths=lengths, thinks=thinks,
                finish=[c.finish_reason for c in ro.flat], parts={k: v.tolist() for k, v in ro.parts.items()})
    every = D.gather(mine)
    cat = lambda key: [x for part in every for x in part[key]]  # noqa: E731
    matrix = lambda rows: torch.tensor(rows, dtype=torch.float64).view(-1, G)  # noqa: E731
    names = [k for part in every for k in part["parts"]]
    parts = {k: matrix([x for part in every for x in part["parts"].get(k, [])]) for k in dict.fromkeys(names)}
    flat = [Completion(0, "", [], [], f) for f in cat("finish")]
    joined = Rollout([], [], [], matrix(cat("rewards")), parts, matrix(cat("correct")), ro.zero_variance_share,
                     ro.rounds)
    return joined, flat, cat("lengths"), cat("thinks"), len(cat("rewards"))


def grpo(cfg: GRPOConfig, resume: bool = True, progress: bool = True, model=None, tokenizer=None):
    return GRPOTrainer(cfg, model, tokenizer, resume=resume, progress=progress).train()
