"""Process-wide settings: torch threads, seeds, devices and dtypes."""

from __future__ import annotations

import os
import random

import torch


def default_threads() -> int:
    """R1LAB_THREADS if set, else the cores this process may use (torch's default ignores CPU affinity), split
    evenly between the processes torchrun started on this machine."""
    env = os.environ.get("R1LAB_THREADS")
    if env:
        n = int(env)
        if n < 1:
            raise ValueError(f"R1LAB_THREADS must be >= 1 (got {env})")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads once for the process; one per core, and never more."""
    n = n or default_threads()
    if n < 1:
        raise ValueError(f"--threads must be >= 1 (got {n})")
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str | None = None) -> torch.device:
    """`auto` picks CUDA when present, else CPU; an unavailable device is an error, not a fallback."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for CUDA, but torch sees no CUDA device; use --device cpu")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None
