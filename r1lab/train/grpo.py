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
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field

import torch

from r1lab.reasoning import split_reasoning
from r1lab.rewards import get_reward
from r1lab.sampler import Completion, Sampler, SamplingParams
from r1lab.tasks import Problem, get_task
from r1lab.tokenizer import render_prompt
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
    steps: int = 80
    prompts_per_step: int = 16
    num_generations: int = 8          # G, completions per prompt
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-4
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
    row_tokens: int = 1024            # packed row length; masked attention costs grow with its square
    bf16: bool = True
    eval_every: int = 0               # 0: only at the end
    eval_problems: int = 200
    log_every: int = 1
    save_every: int = 20
    seed: int = 0

    def validate(self) -> "GRPOConfig":
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


def build_layouts(prompt_ids: list[list[int]], completion_ids: list[list[list[int]]], max_tokens: int,
                  pad_id: int, row_tokens: int = 1024) -> list[Layout]:
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


def token_logprobs(model, lay: Layout, temperature: float, entropy: bool = False):
    """log pi(token) at the sampling temperature for every completion token of the layout [M] (and entropy)."""
    hidden_fn, head, cap, native = _backbone(model)
    mask = lay.packed.mask()
    if not native:  # transformers adds 4D masks to the scores in eager attention: make it additive
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    dev = head.weight.device
    h = hidden_fn(lay.packed.input_ids.to(dev), mask.to(dev), lay.packed.position_ids.to(dev),
                  lay.packed.attention_mask.to(dev))
    h = h.reshape(-1, h.shape[-1])[lay.pred_index.to(dev)]
    logits = head(h).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp_all = (logits / temperature).log_softmax(-1)
    logp = logp_all.gather(1, lay.target.to(dev)[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1).detach() if entropy else None
    return logp, ent


def to_matrix(values: torch.Tensor, lay: Layout, shape) -> torch.Tensor:
    out = values.new_zeros(shape)
    out[lay.seq.to(values.device), lay.pos.to(values.device)] = values
    return out


# ----------------------------------------------------------------------------- the trainer


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig, model=None, tokenizer=None, resume: bool = True, progress: bool = True):
        from r1lab.model.load import load_model_and_tokenizer

        self.cfg = cfg.validate()
        self.run = Run(cfg.out, cfg, resume=resume)
        self.progress = progress
        self.state = self.run.load()
        if self.state:
            model, tokenizer = load_model_and_tokenizer(self.run.checkpoint_dir)
        elif model is None:
            model, tokenizer = load_model_and_tokenizer(cfg.model)
        self.model, self.tok = model, tokenizer
        self.native = type(_backbone_base(model)).__name__ == "DeepseekV3"
        self.ref = None
        if cfg.beta > 0:  # the initial policy, frozen (a resumed run rebuilds it from the starting model)
            self.ref = load_model_and_tokenizer(cfg.model)[0] if self.state else copy.deepcopy(model)
            self.ref.eval().requires_grad_(False)
        self.opt = adamw(model, cfg.lr, cfg.weight_decay)
        self.start = 0
        if self.state:
            self.opt.load_state_dict(self.state["optimizer"])
            set_rng_state(self.state["rng"])
            self.start = self.state["step"]
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
        cfg = self.cfg
        keep_p, keep_ids, keep_c, keep_r, keep_parts, keep_acc = [], [], [], [], [], []
        zero_var_total = groups_total = 0
        rounds = 0
        while len(keep_p) < cfg.prompts_per_step and rounds <= (cfg.max_resample_rounds if cfg.dynamic_sampling else 0):
            need = cfg.prompts_per_step - len(keep_p)
            problems = self.draw(step, rounds, need)
            prompts = [render_prompt(self.tok, p.prompt, cfg.template) for p in problems]
            ids = [self.sampler.encode(p) for p in prompts]
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                    n=cfg.num_generations, seed=(cfg.seed * 1_000_003 + step) * 31 + rounds)
            outs = self.sampler.generate(ids, params)
            groups = [outs[i * cfg.num_generations:(i + 1) * cfg.num_generations] for i in range(len(problems))]
            rewards, parts, acc = score(groups, problems, self.reward_fns, cfg.reward_weights, self.accuracy_fn)
            zero = zero_variance_groups(rewards)
            zero_var_total += int(zero.sum())
            groups_total += len(problems)
            for i in range(len(problems)):
                if cfg.dynamic_sampling and zero[i]:
                    continue
                keep_p.append(problems[i]); keep_ids.append(ids[i]); keep_c.append(groups[i])
                keep_r.append(rewards[i]); keep_acc.append(acc[i])
                keep_parts.append({k: v[i] for k, v in parts.items()})
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
        P, G = ro.rewards.shape
        N, T = P * G, cfg.max_new_tokens
        adv = get_advantage(cfg.advantage)(ro.rewards, scale=cfg.advantage_scale).float().flatten()  # [N]
        completion_ids = [[c.token_ids for c in g] for g in ro.completions]
        old = torch.zeros(N, T)
        mask = torch.zeros(N, T)
        for n, c in enumerate(ro.flat):
            old[n, : len(c.logprobs)] = torch.tensor(c.logprobs)
            if not (cfg.mask_truncated and c.finish_reason == "length"):
                mask[n, : len(c.token_ids)] = 1
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        layouts = build_layouts(ro.prompt_ids, completion_ids, cfg.micro_batch_tokens, pad, cfg.row_tokens)
        n_tokens = mask.sum().clamp(min=1)
        agg = L.get_aggregation(cfg.loss_agg)
        ref = None
        if self.ref is not None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                ref = torch.zeros(N, T)
                for lay in layouts:
                    lp, _ = token_logprobs(self.ref, lay, cfg.temperature)
                    ref += to_matrix(lp.float(), lay, (N, T))
        for g in self.opt.param_groups:
            g["lr"] = lr
        stats = dict(loss=0.0, kl=0.0, clip_frac=0.0, entropy=0.0)
        for epoch in range(cfg.mu):
            for lay in layouts:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    lp, ent = token_logprobs(self.model, lay, cfg.temperature, entropy=epoch == 0)
                logp = to_matrix(lp.float(), lay, (N, T))
                m = to_matrix(torch.ones_like(lp, dtype=torch.float), lay, (N, T)) * mask
                loss_tok, clipped = L.get_policy_loss("clip")(logp, old, adv, cfg.epsilon_low, cfg.epsilon_high)
                if ref is not None:
                    kl_tok = L.get_kl(cfg.kl_estimator)(logp, ref)
                    loss_tok = loss_tok + cfg.beta * kl_tok
                    stats["kl"] += ((kl_tok.detach() * m).sum() / n_tokens).item() / cfg.mu
                loss = agg(loss_tok, m, n_tokens, N, T)
                loss.backward()
                stats["loss"] += loss.item() / cfg.mu
                stats["clip_frac"] += ((clipped * m).sum() / n_tokens).item() / cfg.mu
                if ent is not None:
                    stats["entropy"] += ((to_matrix(ent.float(), lay, (N, T)) * m).sum() / n_tokens).item()
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.native and cfg.balance_experts:
                _backbone_base(self.model).update_expert_bias()
        stats["trained_tokens"] = sum(lay.packed.n_tokens for lay in layouts)
        return stats

    # -------------------------------------------------------------- loop
    def train(self):
        from r1lab.cost import achieved_flops_report, training_flops_per_token
        from r1lab.hardware import measure_matmul_peak

        cfg = self.cfg
        if self.run.done() and self.run.resume:
            return self.model, self.tok, self.run
        fpt = training_flops_per_token(_backbone_base(self.model).config, 512, include_mtp=False)
        peak = measure_matmul_peak(torch.bfloat16 if cfg.bf16 else torch.float32)
        steps = range(self.start, cfg.steps)
        bar = steps
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(steps, desc="grpo", initial=self.start, total=cfg.steps, dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            self.model.eval()
            ro = self.rollout(step)
            t1 = time.perf_counter()
            self.model.train()
            lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
            stats = self.update(ro, lr) if ro.problems else {"skipped_update": True}
            t2 = time.perf_counter()
            row = self.metrics(ro, stats, lr, t1 - t0, t2 - t1)
            if "trained_tokens" in stats:
                row.update({f"train_{k}": v for k, v in
                            achieved_flops_report(stats["trained_tokens"], t2 - t1, fpt, peak).items()})
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                self.run.log(step + 1, **row)
            if self.progress:
                bar.set_postfix(reward=f"{row['reward_mean']:.2f}", acc=f"{row['accuracy']:.2f}",
                                len=f"{row['mean_length']:.0f}", think=f"{row['think_share']:.2f}")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                self.model.eval()
                self.run.log(step + 1, eval=self.quick_eval())
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                self.run.save(self.model, self.tok, step + 1, self.opt)
        self.model.eval()
        self.run.finish(self.model, self.tok)
        return self.model, self.tok, self.run

    def metrics(self, ro: Rollout, stats: dict, lr: float, sample_s: float, train_s: float) -> dict:
        flat = ro.flat
        lengths = [len(c.token_ids) for c in flat]
        thinks = [bool((split_reasoning(c.text)[0] or "").strip()) for c in flat]

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
                   zero_variance_share=ro.zero_variance_share, sample_rounds=ro.rounds, groups=len(ro.problems),
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


def grpo(cfg: GRPOConfig, resume: bool = True, progress: bool = True, model=None, tokenizer=None):
    return GRPOTrainer(cfg, model, tokenizer, resume=resume, progress=progress).train()
