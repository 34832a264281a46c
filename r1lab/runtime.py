"""Process-wide settings: torch threads, the memory allocator's policy, seeds, devices and dtypes."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import random
import sys

import torch


def default_threads() -> int:
    """R1LAB_THREADS if set, else the cores this process may use (torch's default ignores CPU affinity), split
    evenly between the processes torchrun started on this machine."""
    env = os.environ.get("R1LAB_THREADS")
    if env:
        if not env.strip().isdigit() or int(env) < 1:
            raise ValueError(
                f"R1LAB_THREADS must be >= 1, a whole number of threads (got {env!r}); set it to the "
                "cores to use, or unset it"
            )
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads once for the process; one per core, and never more."""
    n = default_threads() if n is None else n  # --threads 0 is an error, not "the default"
    if n < 1:
        raise ValueError(f"--threads must be >= 1 (got {n})")
    torch.set_num_threads(n)
    return n


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def settle_allocator() -> str:
    """Fix glibc malloc's heap policy for this process: freed memory stays with the process (up to 1 GiB above the
    heap's top) and blocks under 256 MiB come from the heap, so a steady loop of large tensors pays no page
    faults. glibc's default moves these thresholds as the process frees large blocks, and speed then depends on
    the process's history: sampling a transformers DeepSeek-V3 through the generic (DynamicCache) path at batch 64
    took 1.4-1.8 s per run by default and 1.13-1.18 s under this policy. Left alone where it does not apply (not
    glibc), where the user set glibc's malloc variables, or with R1LAB_MALLOC=system. Returns what was done."""
    choice = os.environ.get("R1LAB_MALLOC", "tuned")
    if choice not in ("tuned", "system"):
        raise ValueError(f"R1LAB_MALLOC must be 'tuned' (the default) or 'system' (glibc's own policy), got {choice!r}")
    if choice == "system":
        return "left as it is (R1LAB_MALLOC=system)"
    if any(v in os.environ for v in MALLOC_ENV) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "left as it is (glibc malloc variables set in the environment)"
    name = ctypes.util.find_library("c")
    if platform.libc_ver()[0] != "glibc" or not name:
        return "left as it is (not glibc)"
    libc = ctypes.CDLL(name)
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    if all(
        libc.mallopt(opt, val) == 1
        for opt, val in ((M_MMAP_THRESHOLD, 256 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))
    ):
        return "glibc: mmap threshold 256 MiB, trim threshold 1 GiB, top pad 64 MiB"
    return "left as it is (glibc refused mallopt)"


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str | None = None) -> torch.device:
    """`auto` picks CUDA when present, else CPU; an unavailable device is an error, not a fallback."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but torch sees no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s); use cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: this torch has no usable MPS (Apple GPU) device; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: r1lab runs on cpu, cuda or mps")
    return dev


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX.
    Elsewhere (AVX2-only x86, most ARM) torch emulates bf16 matmuls, about 100x slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(
            getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
            or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        )
    return False


def use_bf16(asked: bool | None, device: torch.device) -> bool:
    """The `bf16` setting of a trainer. None (the default): bf16 autocast on GPUs that do bf16, float32 on CPUs, so
    a CPU run gives the same numbers whichever CPU it is on (bf16 pays little at CPU model sizes; ask for it with
    True). True on a device without native bf16 is honoured, with a warning, since it is slow there."""
    if asked is None:
        return device.type == "cuda" and native_bf16(device)
    if asked and not native_bf16(device):
        print(
            f"warning: bf16 was asked for, but this {device.type} has no native bf16 matmuls; they will run far "
            "slower than float32 (leave --bf16 unset to choose automatically)",
            file=sys.stderr,
        )
    return bool(asked)


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None
