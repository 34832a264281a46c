"""The GPU table's lookups and peaks, and the measured matmul peak of this machine."""

from __future__ import annotations

import time

import pytest
import torch

from r1lab.hardware import GPUS, find_gpu, measure_matmul_peak


@pytest.mark.parametrize(
    "name, expected",
    [
        ("H800", "H800 SXM"),
        ("h100", "H100 SXM"),
        ("NVIDIA H100 SXM", "H100 SXM"),
        ("A100", "A100 80GB"),
        ("a100-40gb", "A100 40GB"),
        ("RTX 3080", "RTX 3080 (10 GB)"),
        ("rtx-3080", "RTX 3080 (10 GB)"),
        ("3080", "RTX 3080 (10 GB)"),
        ("GeForce RTX 4090", "RTX 4090"),
        ("AMD Instinct MI300X", "MI300X"),
    ],
)
def test_find_gpu_accepts_loose_names(name, expected):
    assert find_gpu(name).name == expected


def test_unknown_gpu_error_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown GPU 'H900'.*H800 SXM.*RTX 3080"):
        find_gpu("H900")


def test_h800_peaks_are_the_hopper_dense_figures():
    g = find_gpu("H800")
    assert g.peak_flops("bf16") == pytest.approx(989.4e12)
    assert g.peak_flops("fp8") == pytest.approx(2 * g.peak_flops("bf16"), rel=1e-3)
    assert g.memory_bytes == 80 * 1024**3


def test_every_gpu_has_memory_and_a_bf16_or_fp16_peak():
    for g in GPUS.values():
        assert g.memory_gib > 0
        assert g.peak_tflops.get("bf16", g.peak_tflops.get("fp16", 0)) > g.peak_tflops["fp32"] > 0


def test_missing_dtype_peak_names_the_available_ones():
    with pytest.raises(ValueError, match=r"T4 has no bf16 peak.*fp32, fp16, int8"):
        find_gpu("T4").peak_flops("bf16")


def test_matmul_peak_is_plausible_cached_and_restores_threads():
    before = torch.get_num_threads()
    peak = measure_matmul_peak(torch.float32, "cpu", threads=1, seconds=0.1)
    assert 1e9 < peak < 1e13  # 1 GFLOP/s .. 10 TFLOP/s on one CPU core
    assert torch.get_num_threads() == before
    t0 = time.perf_counter()
    assert measure_matmul_peak(torch.float32, "cpu", threads=1) == peak  # cached: same value, no timing
    assert measure_matmul_peak("fp32", "cpu", threads=1) == peak  # dtype by name
    assert time.perf_counter() - t0 < 0.05


def test_matmul_peak_rejects_zero_threads():
    with pytest.raises(ValueError, match=r"threads must be >= 1 \(got 0\)"):
        measure_matmul_peak(torch.float32, "cpu", threads=0)
