"""Accelerators we price runs on (peak dense FLOP/s per dtype, memory), and this machine's measured matmul peak.

`find_gpu("RTX 3080")` -> `GPU`; `GPU.peak_flops("bf16")` -> FLOP/s. `measure_matmul_peak(dtype, device, threads)`
times large matmuls and returns the best FLOP/s seen, cached per (device, dtype, threads) within the process, so
a trainer can divide its achieved FLOP/s by it (MFU against what this machine can really do, not a datasheet).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a measurement runs
    import torch

GiB = 1024**3
T = 1e12

# Peak *dense* tensor/vector throughput in TFLOP/s (TOPS for int8): the datasheets' "with sparsity" figures
# halved. GeForce cards are listed with FP32 accumulation (what PyTorch uses for bf16/fp16 training); their
# FP16-accumulate rate is twice that. Memory is the card's physical memory in GiB (GPU "GB" are binary).
# Sources: NVIDIA H100 / H200 datasheets (H800 = H100 SXM compute with 400 GB/s NVLink, DeepSeek-V3 §3.1);
# A100, L40S, L4, A10, T4 datasheets; Ampere GA102 whitepaper (RTX 3090/3080, appendix tables) and the same
# per-SM rates for GA106 (RTX 3060); Ada AD102 whitepaper (RTX 4090) and the same per-SM rates for AD107
# (RTX 4060: 24 SMs at 2.46 GHz); AMD Instinct MI300X datasheet.


@dataclass(frozen=True)
class GPU:
    """One accelerator: peak dense FLOP/s per dtype (TFLOP/s) and memory (GiB)."""

    name: str
    memory_gib: float
    peak_tflops: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Peak dense FLOP/s at `dtype` (fp32, tf32, bf16, fp16, fp8, int8)."""
        if dtype not in self.peak_tflops:
            raise ValueError(
                f"{self.name} has no {dtype} peak in r1lab's table; choose one of {', '.join(self.peak_tflops)}"
            )
        return self.peak_tflops[dtype] * T


def _hopper(name: str, memory_gib: float, note: str = "") -> GPU:
    return GPU(name, memory_gib, dict(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9, int8=1978.9), note)


GPUS: dict[str, GPU] = {
    "h800": _hopper(
        "H800 SXM", 80, "H100 SXM compute, NVLink cut to 400 GB/s; DeepSeek-V3 was trained on 2048 of them"
    ),
    "h100sxm": _hopper("H100 SXM", 80),
    "h200": _hopper("H200 SXM", 141),
    "h100pcie": GPU("H100 PCIe", 80, dict(fp32=51.2, tf32=378.0, bf16=756.0, fp16=756.0, fp8=1513.0, int8=1513.0)),
    "a10080gb": GPU("A100 80GB", 80, dict(fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0, int8=624.0)),
    "a10040gb": GPU("A100 40GB", 40, dict(fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0, int8=624.0)),
    "mi300x": GPU("MI300X", 192, dict(fp32=163.4, tf32=653.7, bf16=1307.4, fp16=1307.4, fp8=2614.9, int8=2614.9)),
    "l40s": GPU("L40S", 48, dict(fp32=91.6, tf32=183.0, bf16=362.0, fp16=362.0, fp8=733.0, int8=733.0)),
    "l4": GPU("L4", 24, dict(fp32=30.3, tf32=60.0, bf16=121.0, fp16=121.0, fp8=242.5, int8=242.5)),
    "a10": GPU("A10", 24, dict(fp32=31.2, tf32=62.5, bf16=125.0, fp16=125.0, int8=250.0)),
    "t4": GPU("T4", 16, dict(fp32=8.1, fp16=65.0, int8=130.0), "no bf16 tensor cores (Turing)"),
    "rtx4090": GPU("RTX 4090", 24, dict(fp32=82.6, bf16=165.2, fp16=165.2, fp8=330.3, int8=660.6)),
    "rtx4060": GPU("RTX 4060", 8, dict(fp32=15.1, bf16=30.2, fp16=30.2, fp8=60.4, int8=120.9)),
    "rtx3090": GPU("RTX 3090", 24, dict(fp32=35.6, bf16=71.0, fp16=71.0, int8=284.0)),
    "rtx3080": GPU("RTX 3080 (10 GB)", 10, dict(fp32=29.8, bf16=59.5, fp16=59.5, int8=238.0)),
    "rtx3060": GPU("RTX 3060 (12 GB)", 12, dict(fp32=12.7, bf16=25.5, fp16=25.5, int8=101.9)),
}
ALIASES = {
    "h100": "h100sxm",
    "h800sxm": "h800",
    "h200sxm": "h200",
    "a100": "a10080gb",
    "a100sxm": "a10080gb",
    "rtx308010gb": "rtx3080",
    "rtx306012gb": "rtx3060",
}


def _key(name: str) -> str:
    k = re.sub(r"[^a-z0-9]", "", name.lower())
    k = re.sub(r"^(nvidia|geforce|amd|instinct)+", "", k)
    if re.fullmatch(r"[34]0[6-9]0(\d+gb)?", k):  # "3080" -> "rtx3080"
        k = "rtx" + k
    return ALIASES.get(k, k)


def find_gpu(name: str) -> GPU:
    """Look a GPU up by a loose name ("H800", "rtx-3080", "A100 80GB"); unknown names list the known ones."""
    gpu = GPUS.get(_key(name))
    if gpu is None:
        raise ValueError(f"unknown GPU {name!r}; choose one of: {', '.join(g.name for g in GPUS.values())}")
    return gpu


# ----------------------------------------------------------------------------- this machine's matmul peak

_PEAK_CACHE: dict[tuple, float] = {}


def measure_matmul_peak(
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    seconds: float = 0.4,
) -> float:
    """Best FLOP/s of square matmuls on this device after a warm-up (about `seconds` of timing per call).

    The best rep, not the mean, so a neighbour process stealing a core lowers it less. Cached per
    (device, dtype, threads) for the life of the process; `threads` (CPU) defaults to torch's current setting;
    `dtype` is a torch dtype or a name ("bf16"), float32 by default.
    """
    import torch  # lazily: the GPU table and `r1lab cost` do not need torch

    if dtype is None or isinstance(dtype, str):
        from r1lab.runtime import parse_dtype

        dtype = parse_dtype(dtype or "float32")
    dev = torch.device(device)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (got {threads})")
    n_threads = threads or torch.get_num_threads()
    key = (str(dev), dtype, n_threads if dev.type == "cpu" else 0)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    old = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(n_threads)
    try:
        n = 1024 if dev.type == "cpu" else 4096
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        for _ in range(2):  # warm-up: thread pools, kernel selection, caches
            a @ b
        sync()
        best, start = float("inf"), time.perf_counter()
        reps = 0
        while reps < 3 or (time.perf_counter() - start < seconds and reps < 200):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
            reps += 1
    finally:
        torch.set_num_threads(old)
    peak = 2 * n**3 / best
    _PEAK_CACHE[key] = peak
    return peak
