"""What every training loop does around its step, as plain functions the loops call (pretrain, SFT, GRPO): open the
run directory and resume, set the learning rate, take a guarded optimiser step, log on cadence with the measured
throughput, show progress. No trainer framework: each loop still reads top to bottom like the recipe it runs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from r1lab.runtime import use_bf16
from r1lab.train import dist
from r1lab.train.run import Run, cosine_lr, set_rng_state


@dataclass
class Session:
    """An opened run: its device, whether matmuls run in bf16, the run directory, and the trainer state of the
    checkpoint it resumes from (None: from step 0). `finished`: the final model is already there."""

    device: torch.device
    bf16: bool
    run: Run
    state: dict | None
    finished: bool
    peak: float | None  # this machine's measured matmul FLOP/s in the training dtype (None when finished)

    @property
    def start(self) -> int:
        return self.state["step"] if self.state else 0


def open_run(cfg, resume: bool) -> Session:
    """Validate `cfg`, join the process group under torchrun (before anything is written), open `cfg.out` (swept,
    config written) and read its checkpoint's trainer state. The matmul peak is measured before any seeding or RNG
    restore: the measurement draws random numbers."""
    from r1lab.hardware import measure_matmul_peak

    cfg.validate()
    device = dist.setup(cfg.device)
    bf16 = use_bf16(cfg.bf16, device)
    run = Run(cfg.out, cfg, resume=resume)
    finished = run.done() and resume
    peak = None if finished else measure_matmul_peak(torch.bfloat16 if bf16 else torch.float32, device=device)
    state = None if finished else run.load()  # a finished run keeps all its metrics
    if not finished:
        start_trackers(run, cfg, fresh=not resume)
    return Session(device, bf16, run, state, finished, peak)


def start_trackers(run: Run, cfg, fresh: bool) -> None:
    """Start the `--report-to` trackers on rank 0 with the resolved config and the kept metrics rows
    (r1lab.trackers); one that cannot start stops every process with its one-line error, before training."""
    from r1lab.config import ConfigError, to_dict
    from r1lab.trackers import Trackers

    names = getattr(cfg, "report_to", [])
    if not names:
        return
    error = None
    if dist.is_main():
        try:
            run.trackers = Trackers(names, run.dir, fresh=fresh)
            run.trackers.begin(to_dict(cfg), run.metrics())
        except ConfigError as e:
            error = str(e)
    errors = [e for e in dist.gather(error) if e]
    if errors:
        raise ConfigError(errors[0])


def restore(opt: torch.optim.Optimizer, state: dict | None) -> int:
    """Put the optimiser and every RNG back as the checkpoint left them; the step to continue from."""
    if not state:
        return 0
    dist.load_optimizer_state(opt, state["optimizer"])
    set_rng_state(state["rng"])
    return state["step"]


def set_lr(opt: torch.optim.Optimizer, step: int, total: int, cfg) -> float:
    """The schedule's learning rate for `step` (warm-up, then cosine to min_lr_ratio), set on every group."""
    lr = cosine_lr(step, total, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def optimizer_step(model, opt: torch.optim.Optimizer, run: Run, step: int, loss: float, clip: float) -> float:
    """Clip the gradient, stop before the update if the loss or gradient is not finite (the last good checkpoint
    stays), step and clear. Returns the gradient norm before clipping."""
    grad_norm = dist.clip_grad_norm([p for p in model.parameters() if p.requires_grad], clip).item()
    run.check_finite(step, loss=loss, grad_norm=grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def balance_experts(model) -> float | None:
    """Aux-loss-free balancing after an optimiser step: the expert loads summed over processes nudge the MoE routing
    biases. Returns the mean load imbalance (max/mean) before the nudge, None for a model without MoE layers."""
    from r1lab.model.hf import base_model

    native = base_model(model)
    dist.sync_expert_load(native)
    imbalance = native.update_expert_bias()
    return imbalance.mean().item() if len(imbalance) else None


def due(done: int, every: int, total: int) -> bool:
    """Whether a cadence of `every` steps falls on step `done` (of `total`); the last step is always due."""
    return done % every == 0 or done == total


class Throughput:
    """Tokens trained since the last log, and what they achieved against this machine's matmul peak."""

    def __init__(self, flops_per_token: float | None, peak: float | None):
        self.fpt, self.peak = flops_per_token, peak
        self.tokens, self.t0 = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def pause_until_now(self) -> None:
        """Leave out what ran since the last step (an evaluation) from the next figure."""
        self.t0 = time.perf_counter()

    def report(self) -> dict:
        """tokens/s, FLOPs, FLOP/s and MFU since the last report (summed over processes); then start over."""
        from r1lab.cost import achieved_flops_report

        tokens = dist.all_sum(self.tokens)
        out = {}
        if self.fpt:
            out = achieved_flops_report(
                tokens, time.perf_counter() - self.t0, self.fpt, self.peak * dist.world() if self.peak else None
            )
        self.tokens, self.t0 = 0, time.perf_counter()
        return out


def progress(steps: range, total: int, desc: str, enabled: bool):
    """`steps` with a progress bar on the main process when `enabled`."""
    if not (enabled and dist.is_main()):
        return steps
    from tqdm import tqdm

    return tqdm(steps, desc=desc, initial=steps.start, total=total, dynamic_ncols=True)


def show(bar, **values) -> None:
    """Set the progress bar's figures ('-' for a value that is missing)."""
    if hasattr(bar, "set_postfix"):
        bar.set_postfix({k: "-" if v is None else v for k, v in values.items()})
