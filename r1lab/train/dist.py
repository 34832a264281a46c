"""Data parallelism for pretrain, SFT and GRPO: one process per device under torchrun, gloo on CPU, NCCL on CUDA.

Without torchrun (WORLD_SIZE unset or 1) every helper here is a no-op and a run is the single-process run, byte for
byte. Under `torchrun --nproc-per-node N` (or a multi-node rendezvous):
- batch sizes in the configs stay global: each process takes a contiguous `share` of the step's rows or prompts,
  and every loss is divided by the GLOBAL count of its tokens or sequences (`all_sum`); `backward` multiplies by the
  number of processes because DDP and FSDP average gradients over them. N processes therefore take the step one
  process takes at the same global batch;
- the training forward runs through `wrap`: DDP (a replica per process, gradients all-reduced during the backward)
  or FSDP2 (`fully_shard` on each transformer block: parameters, gradients and optimiser state sharded, gathered
  block by block). Both communicate inside the forward or backward, so every process runs as many micro-batches
  per step as the busiest one (`even_out`; the extra passes count zero);
- sampling, evaluation and saving use the plain model; under FSDP inside `full_weights`, which first gathers every
  parameter on every process (as TRL does with DeepSpeed ZeRO-3 for generation);
- only rank 0 writes files; a checkpoint holds whole weights and optimiser state, so a run resumes on any number
  of processes (`r1lab.train.run`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

PARALLEL = ("ddp", "fsdp")


# ----------------------------------------------------------------------------- process group


def launched() -> bool:
    """Started by torchrun (or a launcher that sets the same variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: str | None = "auto") -> torch.device:
    """This process's device (`cuda:LOCAL_RANK` for CUDA under torchrun); under torchrun also join the process group
    once: gloo for CPU tensors, NCCL for CUDA ones."""
    from r1lab.runtime import pick_device

    dev = pick_device(device)
    if not launched():
        return dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        minutes = float(os.environ.get("R1LAB_DIST_TIMEOUT_MINUTES", "60"))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
    return dev


def check_parallel(parallel: str, lora: bool = False) -> None:
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL)} (got {parallel!r})")
    if parallel == "fsdp" and lora:
        raise ValueError(
            "parallel fsdp does not work with LoRA here (adapters are merged on a whole model); use "
            "--parallel ddp: the frozen base is small next to full fine-tuning's optimiser state"
        )


# ----------------------------------------------------------------------------- collectives (no-ops in one process)


def share(n: int) -> slice:
    """This process's contiguous share of n items; shares differ in size by at most one."""
    r, w = rank(), world()
    return slice(n * r // w, n * (r + 1) // w)


def all_sum(values):
    """The sum over processes of a number or a list of numbers (exact for counts below 2**53)."""
    if not active():
        return values
    many = isinstance(values, (list, tuple))
    t = torch.tensor(list(values) if many else [values], dtype=torch.float64)
    dist.all_reduce(t)
    out = t.tolist()
    return out if many else out[0]


def all_max(n: int) -> int:
    if not active():
        return n
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def gather(obj) -> list:
    """`obj` of every process, in rank order (picklable objects)."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


# ----------------------------------------------------------------------------- the training forward


class _Forward(nn.Module):
    """`fn(model, *args)` as a module's forward, so that DDP and FSDP see, and synchronise, the training forward."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)


def wrap(model: nn.Module, fn, parallel: str = "ddp"):
    """A callable f(*args) = fn(model, *args) for the training forward: the plain call in one process, else the same
    call inside DDP or FSDP2. Under FSDP the model's parameters become shards: build the optimiser after this."""
    check_parallel(parallel)
    if not active():
        return functools.partial(fn, model)
    module = _Forward(model, fn)
    if parallel == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # unused parameters exist (MTP layers outside pretraining, experts no token chose); MoE load counters are
        # per-process buffers that `sync_expert_load` sums, so buffers are not broadcast at each forward
        params = inspect.signature(DDP).parameters
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        flags: dict[str, Any] = {no_sync: False}  # the keyword this torch version has
        return DDP(module, find_unused_parameters=True, **flags)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # our callers never modify a block's output in place, the case this warning is about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(next(model.parameters()).device.type, (world(),))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
        if hasattr(block, "forward_grouped"):  # GRPO's grouped layout calls the native blocks through this
            register_fsdp_forward_method(block, "forward_grouped")
    root = fully_shard(module, mesh=mesh)  # `module` itself, now also an FSDPModule
    root._get_fsdp_state()._lazy_init()  # the wrapper is the root even if a block runs first (in sampling)
    return module


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one by one: r1lab's `Block`s, or the layer classes a transformers model names in
    `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, ...)."""
    from r1lab.model.deepseek import Block

    get_base = getattr(model, "get_base_model", None)  # a peft model's base
    base = get_base() if get_base is not None else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if isinstance(m, Block) or type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"parallel fsdp found no transformer blocks in {type(base).__name__} to shard; use --parallel ddp"
        )
    return blocks


def is_fsdp(wrapped) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(wrapped, FSDPModule)


@contextlib.contextmanager
def accumulate(wrapped, sync: bool):
    """Backward passes inside add gradients locally; only the step's last (`sync`) communicates them."""
    if sync or not active():
        yield
    elif is_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        with wrapped.no_sync():
            yield


def even_out(micro_batches: list) -> list:
    """The list padded with None to the longest over processes: every process runs as many forward/backward passes
    (DDP's all-reduce and FSDP's all-gathers are collective); a None pass must add nothing to the gradient."""
    n = all_max(len(micro_batches))
    return list(micro_batches) + [None] * (n - len(micro_batches))


@contextlib.contextmanager
def uncounted(model):
    """The native MoE's expert-load counters as they were before the block: a pass that adds nothing to the
    gradient must not count toward balancing either."""
    from r1lab.model.deepseek import MoE

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    saved = [m.load.clone() for m in moes]
    try:
        yield
    finally:
        for m, load in zip(moes, saved):
            m.load.copy_(load)


def backward(loss: torch.Tensor) -> None:
    """loss.backward(), times the number of processes: DDP and FSDP average gradients over processes, and our losses
    are already each process's share of the global mean."""
    (loss * world() if active() else loss).backward()


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_, with the norm of sharded (FSDP) gradients returned whole."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@contextlib.contextmanager
def full_weights(wrapped):
    """Under FSDP, every parameter gathered whole on every process until the block ends (sampling, evaluation and
    saving call the plain model); a no-op otherwise. Every process must enter it together."""
    if not (active() and is_fsdp(wrapped)):
        yield
        return
    units = [m for m in wrapped.modules() if hasattr(m, "unshard")]
    blocks = [m for m in units if m is not wrapped]
    for m in blocks:
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
        for m in blocks:
            m.set_reshard_after_forward(True, recurse=False)


def sync_expert_load(model) -> None:
    """Sum the native MoE's per-expert token counts over processes before the balancing step, so every process
    nudges its routing biases by the same global load (and the biases stay equal)."""
    if not active():
        return
    moes = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "load")]
    if moes:
        loads = torch.stack([m.load for m in moes])
        flat = loads.to(torch.float64).cpu()
        dist.all_reduce(flat)
        for m, row in zip(moes, flat.to(loads.dtype).to(loads.device)):
            m.load.copy_(row)


# ----------------------------------------------------------------------------- whole state for checkpoints


def _sharded(t) -> bool:
    return hasattr(t, "full_tensor")


def model_state(model) -> dict | None:
    """Under FSDP, the model's state dict gathered whole (on rank 0; other processes get None); else None, and the
    model saves its own. Every process must call it."""
    if not active():
        return None
    state = model.state_dict()
    if not any(_sharded(v) for v in state.values()):
        return None
    out = {}
    for k, v in state.items():
        v = v.full_tensor() if _sharded(v) else v
        if is_main():
            out[k] = v.detach().cpu()
    return out if is_main() else None


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """The optimiser's state dict as one process holds it: sharded (FSDP) moments gathered whole."""
    sd = opt.state_dict()
    if not active() or not any(_sharded(v) for s in sd["state"].values() for v in s.values()):
        return sd
    state = {}
    for i, s in sd["state"].items():
        state[i] = {k: (v.full_tensor().cpu() if _sharded(v) else v) for k, v in s.items()}
    return {**sd, "state": state}


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load a checkpoint's optimiser state (whole tensors), sharded like the parameters under FSDP."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if any(_sharded(p) for p in params):
        from torch.distributed.tensor import distribute_tensor

        state = {}
        for i, s in sd["state"].items():
            p = params[int(i)]
            state[i] = {
                k: (
                    distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                    if torch.is_tensor(v) and _sharded(p) and v.shape == p.shape
                    else v
                )
                for k, v in s.items()
            }
        sd = {**sd, "state": state}
    opt.load_state_dict(sd)
