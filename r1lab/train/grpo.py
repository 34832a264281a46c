"""GRPO with verifiable rewards (DeepSeekMath; the RL of DeepSeek-R1-Zero) and its known variants.

One step: draw prompts, sample G completions each with the shared sampler, reward them, turn rewards into
group-relative advantages, and take `mu` optimiser steps on the clipped surrogate (minus beta * KL to a frozen
reference when beta > 0). Variants are settings: Dr. GRPO (advantage_scale=False, loss_agg="drgrpo"), DAPO
(epsilon_high > epsilon_low, dynamic_sampling, loss_agg="token-mean", mask_truncated or the overlong reward).

Every objective is a registry entry (r1lab.train.losses): the clipped surrogate, GSPO (sequence-level ratio, and its
token variant), CISPO, with an optional rollout correction (truncated or masked importance sampling against the
sampling engine's own log-probs), and the mismatch between engine and trainer logged at every step.

Engineering that keeps a step cheap:
- the trainer's old-policy log-probs are those of the first training pass (taken before any optimiser step), so
  they cost no extra forward; the sampler's come with the completions;
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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from r1lab import config, trackers
from r1lab.config import opt
from r1lab.model.hf import HFOptions, base_model
from r1lab.reasoning import split_reasoning
from r1lab.rewards import get_reward, list_rewards
from r1lab.sampler import Sampler
from r1lab.tasks import get_task
from r1lab.tokenizer import carry_template, check_template
from r1lab.tools import TOOLS, ToolLimits, make_tool
from r1lab.train import dist, loop, losses
from r1lab.train.advantages import ADVANTAGES, get_advantage
from r1lab.train.logprobs import grouped_batches, grouped_model, packed_rows, to_matrix, token_logprobs
from r1lab.train.rollout import Rollout, Rollouts, gather_rollout, tool_columns, tool_metrics
from r1lab.train.run import adamw, check_optimizer, cosine_lr
from r1lab.train.teacher import load_teacher, reverse_kl_advantage, teacher_logprobs

if TYPE_CHECKING:
    from r1lab.train.vllm_rollout import VLLMRollout


@dataclass
class GRPOConfig:
    out: str = opt("runs/grpo", "run directory; re-running with the same one resumes")
    model: str = opt("", "the policy: a model directory (r1lab's DeepSeek-V3 or any transformers causal LM)")
    tasks: list[str] = opt(factory=lambda: ["arithmetic"], help="tasks whose train splits give the prompts")
    task_args: dict[str, dict] = opt(factory=dict, help="knobs per task as JSON")
    template: str = opt("r1zero", "prompt format: r1zero, r1, or model (the tokenizer's own chat template)")
    rewards: list[str] = opt(
        factory=lambda: ["accuracy", "format"],
        help="reward names (" + ", ".join(list_rewards()) + ") or path.py:function",
    )
    reward_weights: list[float] = opt(factory=lambda: [1.0, 0.1], help="one weight per reward")
    steps: int = opt(40, "GRPO steps (rollout + update)")
    max_seconds: float = opt(0.0, "stop after the step that reaches this much training time (0: no limit)")
    prompts_per_step: int = opt(16, "prompts drawn per step")
    num_generations: int = opt(8, "G, completions sampled per prompt")
    max_new_tokens: int = opt(96, "most tokens per completion")
    temperature: float = opt(1.0, "sampling temperature of the rollouts (and of the log-probs trained on)")
    top_p: float = opt(1.0, "nucleus sampling of the rollouts")
    tools: str = opt(
        "none",
        "a tool the policy may call while it thinks: none or python (its programs run in the "
        "sandbox; the tool's output is context, never trained on; r1lab.tools)",
    )
    tool_limits: ToolLimits = opt(factory=ToolLimits, help="")
    lr: float = opt(5e-5, "peak learning rate")
    warmup: int = opt(5, "linear warm-up steps")
    min_lr_ratio: float = opt(1.0, "the cosine schedule ends at lr x this (1.0: constant after warm-up)")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    beta: float = opt(0.0, "weight of the KL to a frozen reference policy; 0 keeps no reference model")
    kl_estimator: str = opt("k3", "KL estimator: " + ", ".join(losses.KL_ESTIMATORS))
    policy_loss: str = opt("clip", "objective: " + ", ".join(losses.POLICY_LOSSES) + " (r1lab.train.losses)")
    epsilon_low: float = opt(0.2, "lower clip range (CISPO: of its importance weight)")
    epsilon_high: float = opt(0.2, "upper clip range: 0.28 is DAPO's clip-higher; GSPO wants about 4e-4")
    rollout_correction: str = opt(
        "none", "importance sampling against the engine's log-probs: " + ", ".join(losses.ROLLOUT_CORRECTIONS)
    )
    correction_low: float = opt(0.5, "masked IS: tokens or sequences whose pi_old/mu is below this get no loss")
    correction_high: float = opt(2.0, "truncated IS: the weight's cap; masked IS: above this, no loss")
    teacher: str = opt(
        "",
        "on-policy distillation: a model directory with the same tokenizer whose per-token reverse "
        "KL to the student joins the advantages",
    )
    teacher_weight: float = opt(1.0, "scale of the teacher's per-token advantage")
    advantage: str = opt("grpo", "advantage estimator: " + ", ".join(ADVANTAGES))
    advantage_scale: bool = opt(True, "divide by the group's std (false: Dr. GRPO)")
    loss_agg: str = opt(
        "seq-mean",
        "loss aggregation: " + ", ".join(losses.AGGREGATIONS) + " (seq-mean: GRPO; token-mean: DAPO; drgrpo: Dr. GRPO)",
    )
    dynamic_sampling: bool = opt(False, "DAPO: drop groups whose rewards are all equal and draw more prompts")
    max_resample_rounds: int = opt(3, "dynamic sampling's extra draws per step")
    mask_truncated: bool = opt(False, "DAPO overlong filtering: no loss on completions cut at max_new_tokens")
    mu: int = opt(1, "optimiser steps per rollout batch")
    balance_experts: bool = opt(
        False,
        "keep nudging the MoE routing biases during RL (off: routing stays as "
        "pretrained, so the policy changes only through the rewards' gradient)",
    )
    micro_batch_tokens: int = opt(16384, "training tokens per forward (gradient accumulation above that)")
    row_tokens: int = opt(
        256, "packed row length for models without the grouped layout (a longer group gets a row alone)"
    )
    bf16: bool | None = opt(None, "bf16 autocast; none: on GPUs with bf16, float32 on CPUs")
    hf: HFOptions = opt(factory=HFOptions, help="")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (CUDA when present)")
    parallel: str = opt("ddp", "under torchrun: ddp (a replica per process) or fsdp (weights sharded)")
    rollout: str = opt("r1lab", "rollout engine: r1lab (its own sampler) or vllm (transformers models on GPUs)")
    vllm_gpu_memory: float = opt(0.3, "--rollout vllm: share of the GPU for vLLM's weights and KV cache")
    eval_every: int = opt(0, "steps between held-out greedy evaluations (0: none during the run)")
    eval_problems: int = opt(200, "held-out problems per evaluation")
    log_every: int = opt(1, "steps between metrics rows")
    save_every: int = opt(20, "steps between checkpoints")
    seed: int = opt(0, "seed of the prompts drawn and of the samples")
    report_to: list[str] = opt(
        factory=list,
        help="experiment trackers that also get the metrics, config and "
        "samples: tensorboard, wandb, mlflow (comma-separated; each an "
        "extra: pip install 'r1lab[wandb]')",
    )
    report_samples: int = opt(
        4, "completions (prompt, reply, reward) sent to the --report-to trackers as a table each logged step; 0: none"
    )

    def validate(self) -> GRPOConfig:
        config.require_finite(self)
        check_optimizer(self)
        if not self.tasks:
            raise ValueError("tasks is empty: name at least one task to draw prompts from (e.g. --tasks arithmetic)")
        if self.max_resample_rounds < 0:
            raise ValueError(f"max_resample_rounds must be >= 0 (got {self.max_resample_rounds})")
        if not self.model:
            raise ValueError("--model is required: a model directory to train")
        check_template(self.template)
        if not self.rewards and not self.teacher:
            raise ValueError("give at least one reward (--rewards), or a --teacher to distil from on-policy")
        if self.teacher and self.dynamic_sampling and not self.rewards:
            raise ValueError(
                "dynamic_sampling drops groups whose rewards are equal: with a teacher and no rewards "
                "every group would be dropped; turn it off"
            )
        if self.teacher_weight < 0:
            raise ValueError(f"teacher_weight must be >= 0 (got {self.teacher_weight})")
        if len(self.rewards) != len(self.reward_weights):
            raise ValueError(
                f"rewards ({len(self.rewards)}) and reward_weights ({len(self.reward_weights)}) "
                "must have the same length"
            )
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 for group-relative advantages (got {self.num_generations})")
        for name in (
            "steps",
            "prompts_per_step",
            "max_new_tokens",
            "mu",
            "micro_batch_tokens",
            "row_tokens",
            "log_every",
            "save_every",
            "eval_problems",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for RL sampling (got {self.temperature})")
        if self.beta < 0 or self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError("beta, epsilon_low and epsilon_high must be >= 0")
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0 (got {self.max_seconds}); 0 runs every step")
        self.hf.validate()
        dist.check_parallel(self.parallel, self.hf.lora)
        if self.rollout not in ("r1lab", "vllm"):
            raise ValueError(f"rollout must be r1lab or vllm (got {self.rollout!r})")
        if self.tools not in ("none",) + TOOLS:
            raise ValueError(f"tools must be none or one of {', '.join(TOOLS)} (got {self.tools!r})")
        if self.tools != "none":
            if self.rollout == "vllm":
                raise ValueError("--tools runs with r1lab's own sampler; use --rollout r1lab")
            from r1lab.sandbox import require

            self.tool_limits.validate()
            require()  # the programs need a sandbox: refused now, with the fix, rather than at the first call
        if self.rollout == "vllm":
            from r1lab.train.vllm_rollout import check_available

            if not 0 < self.vllm_gpu_memory < 1:
                raise ValueError(f"vllm_gpu_memory must be in (0, 1) (got {self.vllm_gpu_memory})")
            check_available()
        get_advantage(self.advantage), losses.get_aggregation(self.loss_agg), losses.get_kl(self.kl_estimator)
        losses.get_policy_loss(self.policy_loss), losses.get_rollout_correction(self.rollout_correction)
        if not 0 < self.correction_low <= 1 <= self.correction_high:
            raise ValueError(
                f"need 0 < correction_low <= 1 <= correction_high (got {self.correction_low}, {self.correction_high})"
            )
        for t in self.tasks:
            get_task(t, **self.task_args.get(t, {}))
        for spec in self.rewards:
            get_reward(spec)
        if self.report_samples < 0:
            raise ValueError(f"report_samples must be >= 0 (got {self.report_samples})")
        trackers.check(self.report_to)
        return self


# ----------------------------------------------------------------------------- the trainer


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig, model=None, tokenizer=None, resume: bool = True, progress: bool = True):
        from r1lab.model.hf import load_trainable
        from r1lab.model.load import load_model_and_tokenizer

        session = loop.open_run(cfg, resume)
        self.cfg, self.run, self.bf16, self.peak, self.state = (
            cfg,
            session.run,
            session.bf16,
            session.peak,
            session.state,
        )
        device, finished = session.device, session.finished
        self.progress = progress
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
        self.native = type(base_model(model)).__name__ == "DeepseekV3"
        # prompts once per group in training: native models, and Llama-family ones unless FSDP shards their layers
        # (FastDecoder calls a layer's modules, not its forward, where FSDP gathers the shards)
        self.grouped = self.native or (
            grouped_model(model) is not None and not (dist.active() and cfg.parallel == "fsdp")
        )
        self.ref = None
        if cfg.beta > 0:  # the initial policy, frozen (a resumed run rebuilds it from the starting model)
            self.ref = (
                load_model_and_tokenizer(cfg.model, device=self.device)[0] if self.state else copy.deepcopy(model)
            )
            self.ref.eval().requires_grad_(False)
        self.teacher = load_teacher(cfg.teacher, tokenizer, self.device) if cfg.teacher and not finished else None
        # the training forward: plain, or inside DDP / FSDP under torchrun (before the optimiser: FSDP shards)
        self.policy = dist.wrap(model, token_logprobs, cfg.parallel)
        self.opt = adamw(model, cfg.lr, cfg.weight_decay)
        self.start = loop.restore(self.opt, self.state)
        self.step = self.start  # the step being taken (named in errors)
        self.seconds = self.state["extra"].get("seconds", 0.0) if self.state else 0.0  # training time so far
        self.sampler: Sampler | VLLMRollout
        if cfg.rollout == "vllm":
            if self.native:
                raise ValueError(
                    "--rollout vllm samples transformers models; r1lab's native DeepSeek-V3 samples with "
                    "--rollout r1lab"
                )
            from r1lab.train.vllm_rollout import VLLMRollout

            dtype = cfg.hf.dtype if cfg.hf.dtype in ("bfloat16", "float16") else "bfloat16"
            with dist.full_weights(self.policy):
                self.sampler = VLLMRollout(cfg.model, model, tokenizer, cfg.vllm_gpu_memory, dtype, cfg.seed)
        else:
            self.sampler = Sampler(model, tokenizer, tools=make_tool(cfg.tools, tokenizer, cfg.tool_limits))
        self.tasks = [get_task(t, **cfg.task_args.get(t, {})) for t in cfg.tasks]
        self.rollouts = Rollouts(
            cfg,
            self.sampler,
            tokenizer,
            self.tasks,
            {spec: get_reward(spec) for spec in cfg.rewards},
            get_reward("accuracy"),
        )

    def rollout(self, step: int) -> Rollout:
        """This step's scored groups (r1lab.train.rollout)."""
        return self.rollouts.collect(step)

    # -------------------------------------------------------------- update
    def update(self, ro: Rollout, lr: float) -> dict:
        """`mu` optimiser steps on the step's groups. The trainer's own log-probs of the policy that sampled
        (pi_old) are those of the first pass, taken before any optimiser step; the sampling engine's (mu) come with
        the completions. The policy loss, the rollout correction and the aggregation are registry entries."""
        cfg = self.cfg
        dev = self.device
        P, G = ro.rewards.shape
        N, T = P * G, cfg.max_new_tokens
        adv = get_advantage(cfg.advantage)(ro.rewards, scale=cfg.advantage_scale).float().flatten().to(dev)  # [N]
        completion_ids = [[c.token_ids for c in g] for g in ro.completions]
        rollout_lp = torch.zeros(N, T)
        mask = torch.zeros(N, T)
        for n, c in enumerate(ro.flat):
            rollout_lp[n, : len(c.logprobs)] = torch.tensor(c.logprobs)
            if not (cfg.mask_truncated and c.finish_reason == "length"):  # a tool's tokens are context only
                mask[n, : len(c.token_ids)] = 1 if c.token_mask is None else torch.tensor(c.token_mask)
        layouts = self.layouts(ro.prompt_ids, completion_ids) if P else []
        n_tokens = mask.sum().clamp(min=1)
        n_seqs = N
        if dist.active():  # the step's counts over all processes: each process's loss is its share of the mean
            total_tokens, n_seqs = dist.all_sum([float(mask.sum()), N])
            n_tokens = torch.tensor(total_tokens).clamp(min=1)
        rollout_lp, mask, n_tokens = rollout_lp.to(dev), mask.to(dev), n_tokens.to(dev)
        stats: dict = dict(loss=0.0, kl=0.0, clip_frac=0.0, entropy=0.0)
        if self.teacher is not None:  # on-policy distillation: the teacher judges every sampled token
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            t_lp = teacher_logprobs(
                self.teacher,
                layouts,
                ro.prompt_ids,
                completion_ids,
                (N, T),
                cfg.temperature,
                pad,
                cfg.micro_batch_tokens,
            ).to(dev)
            adv = adv[:, None] + cfg.teacher_weight * reverse_kl_advantage(t_lp, rollout_lp, mask)
            stats["teacher_reverse_kl"] = (((rollout_lp - t_lp) * mask).sum() / n_tokens).item()
        policy_loss = losses.get_policy_loss(cfg.policy_loss)
        correction = losses.get_rollout_correction(cfg.rollout_correction)
        agg = losses.get_aggregation(cfg.loss_agg)
        ref = None
        if self.ref is not None:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                ref = torch.zeros(N, T, device=dev)
                for lay in layouts:
                    lp, _ = token_logprobs(self.ref, lay, cfg.temperature)
                    ref += to_matrix(lp.float(), lay, (N, T))
        for g in self.opt.param_groups:
            g["lr"] = lr
        old = torch.zeros(N, T, device=dev)  # pi_old, filled by the first pass
        batches = dist.even_out(layouts)  # as many passes on every process (None: this one has run out)
        for epoch in range(cfg.mu):
            for i, lay in enumerate(batches):
                with dist.accumulate(self.policy, sync=i == len(batches) - 1):
                    if lay is None:
                        self._idle_pass()
                        continue
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                        lp, ent = self.policy(lay, cfg.temperature, entropy=epoch == 0)
                    logp = to_matrix(lp.float(), lay, (N, T))
                    m = to_matrix(torch.ones_like(lp, dtype=torch.float), lay, (N, T)) * mask
                    if epoch == 0:  # no optimiser step yet: these are the sampling policy's own log-probs
                        old = old + logp.detach()
                    loss_tok, found = policy_loss(logp, old, rollout_lp, adv, m, cfg)
                    weight = correction(old, rollout_lp, m, cfg)
                    loss_tok = loss_tok * weight
                    found["correction_weight"] = weight
                    if ref is not None:
                        kl_tok = losses.get_kl(cfg.kl_estimator)(logp, ref)
                        loss_tok = loss_tok + cfg.beta * kl_tok
                        found["kl"] = kl_tok.detach()
                    loss = agg(loss_tok, m, n_tokens, n_seqs, T)
                    dist.backward(loss)
                stats["loss"] += loss.item() / cfg.mu
                for k, v in found.items():  # per-token metrics, as means over the step's tokens
                    stats[k] = stats.get(k, 0.0) + ((v.detach() * m).sum() / n_tokens).item() / cfg.mu
                if ent is not None:
                    stats["entropy"] += ((to_matrix(ent.float(), lay, (N, T)) * m).sum() / n_tokens).item()
            stats["grad_norm"] = loop.optimizer_step(
                self.model, self.opt, self.run, self.step + 1, stats["loss"], cfg.grad_clip
            )
            if self.native and cfg.balance_experts:
                loop.balance_experts(self.model)
        stats["trained_tokens"] = sum(lay.n_tokens for lay in layouts)
        stats.update(self._mismatch(old, rollout_lp, mask))
        if dist.active():  # each process summed its shares of the step's means (an idle process may lack a metric)
            keys = sorted(
                {
                    k
                    for names in dist.gather(list(stats))
                    for k in names
                    if k != "grad_norm" and not k.startswith("mismatch/")
                }
            )
            stats.update(zip(keys, dist.all_sum([stats.get(k, 0.0) for k in keys])))
        return stats

    def _mismatch(self, old: torch.Tensor, rollout_lp: torch.Tensor, mask: torch.Tensor) -> dict:
        """The rollout engine's log-probs against the trainer's on the step's sampled tokens, over all processes."""
        if not dist.active():
            return losses.mismatch(old, rollout_lp, mask)
        d = (old - rollout_lp)[mask.bool()].double()
        parts = dist.gather(
            [d.abs().sum().item(), d.abs().max().item() if len(d) else 0.0, (torch.exp(d) - d - 1).sum().item(), len(d)]
        )
        n = max(1, sum(x[3] for x in parts))
        return {
            "mismatch/logp_abs_diff_mean": sum(x[0] for x in parts) / n,
            "mismatch/logp_abs_diff_max": max(x[1] for x in parts),
            "mismatch/kl": sum(x[2] for x in parts) / n,
        }

    def layouts(self, prompt_ids: list[list[int]], completion_ids: list[list[list[int]]]) -> list:
        """Training micro-batches: native and Llama-family models keep prompts and completions apart (prompts run
        once, no attention across completions); other transformers models pack [prompt | c1 | ... | cG] rows with a
        4D mask."""
        cfg = self.cfg
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        if self.grouped:
            return grouped_batches(prompt_ids, completion_ids, cfg.micro_batch_tokens, pad)
        return packed_rows(prompt_ids, completion_ids, cfg.micro_batch_tokens, pad, cfg.row_tokens)

    def _idle_pass(self) -> None:
        """A forward and backward that add nothing, for a process with fewer micro-batches than another."""
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        with dist.uncounted(self.model), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            lp, _ = self.policy(self.layouts([[pad]], [[[pad]]])[0], self.cfg.temperature)
        dist.backward(lp.sum() * 0.0)

    # -------------------------------------------------------------- loop
    def train(self):
        """The loop: roll out, update, log, evaluate and save on cadence, until `steps` or `max_seconds`."""
        from r1lab.cost import achieved_flops_report, training_flops_per_token

        cfg = self.cfg
        if self.run.done() and self.run.resume:
            return self.model, self.tok, self.run
        try:  # counted as full training (3 x forward), the usual convention for MFU, even when LoRA freezes the base
            fpt = training_flops_per_token(base_model(self.model).config, 512, include_mtp=False)
        except (ValueError, KeyError):  # an architecture the cost model does not know
            fpt = None
        bar = loop.progress(range(self.start, cfg.steps), cfg.steps, "grpo", self.progress)
        for step in bar:
            self.step = step
            t0 = time.perf_counter()
            self.model.eval()
            with dist.full_weights(self.policy):  # FSDP: the sampler needs whole weights
                ro = self.rollout(step)
            t1 = time.perf_counter()
            self.model.train()
            lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
            stats = self.update(ro, lr) if dist.all_sum(len(ro.problems)) else {"skipped_update": True}
            if cfg.rollout == "vllm" and "skipped_update" not in stats:
                with dist.full_weights(self.policy):
                    self.sampler.push(self.model)
            t2 = time.perf_counter()
            self.seconds += t2 - t0
            out_of_time = bool(cfg.max_seconds) and self.seconds >= cfg.max_seconds
            if cfg.max_seconds:  # every process stops after the same step
                out_of_time = bool(dist.all_sum(int(out_of_time)))
            row = self.metrics(ro, stats, lr, t1 - t0, t2 - t1)
            if "trained_tokens" in stats and fpt:  # the update's own throughput (sampling not counted)
                row.update(
                    {
                        f"train_{k}": v
                        for k, v in achieved_flops_report(
                            stats["trained_tokens"], t2 - t1, fpt, self.peak * dist.world() if self.peak else None
                        ).items()
                    }
                )
            done = step + 1
            if loop.due(done, cfg.log_every, cfg.steps) or out_of_time:
                self.run.log(done, **row, total_seconds=self.seconds)
                if self.run.trackers:
                    self.run.log_samples(done, self.sample_table(ro))
            loop.show(
                bar,
                **{
                    k: None if row[key] is None else f"{row[key]:{fmt}}"
                    for k, key, fmt in (
                        ("reward", "reward_mean", ".2f"),
                        ("acc", "accuracy", ".2f"),
                        ("len", "mean_length", ".0f"),
                        ("think", "think_share", ".2f"),
                    )
                },
            )
            if out_of_time:  # max_seconds reached: this step is the last
                break
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                self.model.eval()
                with dist.full_weights(self.policy):  # every process evaluates (the same problems and seeds)
                    self.run.log(done, eval=self.quick_eval())
            if done % cfg.save_every == 0 and done < cfg.steps:
                self.run.save(self.model, self.tok, done, self.opt, extra={"seconds": self.seconds})
        self.model.eval()
        self.run.finish(self.model, self.tok)  # a LoRA model is merged into its base here
        return base_model(self.model), self.tok, self.run

    def metrics(self, ro: Rollout, stats: dict, lr: float, sample_s: float, train_s: float) -> dict:
        """The step's row: rollout statistics over every process's groups, and the update's."""
        flat = ro.flat
        lengths = [c.model_tokens for c in flat]
        thinks = [bool((split_reasoning(c.text)[0] or "").strip()) for c in flat]
        tools = tool_columns(flat) if self.cfg.tools != "none" else None
        groups = len(ro.problems)
        if dist.active():
            ro, flat, lengths, thinks, groups, tools = gather_rollout(ro, lengths, thinks, tools)

        def nanmean(t):
            t = t[~torch.isnan(t)]
            return t.mean().item() if len(t) else None

        def nanstd(t):
            t = t[~torch.isnan(t)]
            return t.std().item() if len(t) > 1 else None

        row = dict(
            reward_mean=nanmean(ro.rewards.flatten()) if flat else float("nan"),
            reward_std=nanstd(ro.rewards.flatten()) if flat else None,
            accuracy=nanmean(ro.correct.flatten()) if flat else float("nan"),
            mean_length=sum(lengths) / len(lengths) if lengths else float("nan"),
            think_share=sum(thinks) / len(thinks) if thinks else float("nan"),
            truncated_share=sum(c.finish_reason == "length" for c in flat) / max(1, len(flat)),
            zero_variance_share=ro.zero_variance_share,
            sample_rounds=ro.rounds,
            groups=groups,
            lr=lr,
            sample_seconds=sample_s,
            train_seconds=train_s,
            sample_tokens_per_s=sum(lengths) / sample_s if sample_s > 0 else None,
            **stats,
        )
        for name, v in ro.parts.items():
            row[f"reward/{name}/mean"] = nanmean(v.flatten())
            row[f"reward/{name}/std"] = nanstd(v.flatten())
        if tools is not None:
            row.update(tool_metrics(tools), tool_wait_seconds=self.sampler.tool_wait)
        return row

    def sample_table(self, ro: Rollout) -> list[dict]:
        """The first completion of this process's first `report_samples` groups, for the trackers' tables."""

        def number(x):
            return None if torch.isnan(x) else round(x.item(), 4)

        return [
            {
                "prompt": p.prompt,
                "completion": g[0].text,
                "answer": p.answer,
                "reward": number(ro.rewards[i, 0]),
                "correct": number(ro.correct[i, 0]),
            }
            for i, (p, g) in enumerate(zip(ro.problems[: self.cfg.report_samples], ro.completions))
        ]

    def quick_eval(self) -> dict:
        """Held-out greedy figures per task (`r1lab.eval.greedy_check`), with the rollouts' tool."""
        from r1lab.eval import greedy_check

        tasks = dict(zip(self.cfg.tasks, self.tasks))
        return greedy_check(
            self.model,
            self.tok,
            tasks,
            self.cfg.template,
            self.cfg.eval_problems,
            self.cfg.max_new_tokens,
            self.sampler.tools,
        )


def grpo(cfg: GRPOConfig, resume: bool = True, progress: bool = True, model=None, tokenizer=None):
    return GRPOTrainer(cfg, model, tokenizer, resume=resume, progress=progress).train()
