"""Process-wide settings: bf16 by default only on GPUs that have it, threads."""

from __future__ import annotations

import pytest
import torch

from r1lab import runtime as RT

CPU = torch.device("cpu")


def _cpu_features(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize("avx512_bf16, amx, native", [(False, False, False), (True, False, True), (False, True, True)])
def test_cpus_default_to_float32_whatever_their_bf16(monkeypatch, capsys, avx512_bf16, amx, native):
    _cpu_features(monkeypatch, avx512_bf16, amx)
    assert RT.native_bf16(CPU) is native
    assert RT.use_bf16(None, CPU) is False  # the same numbers on every CPU
    assert RT.use_bf16(True, CPU) is True and ("no native bf16" in capsys.readouterr().err) is not native


@pytest.mark.parametrize("gpu_bf16", [True, False])
def test_gpus_default_to_bf16_where_they_have_it(monkeypatch, gpu_bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    assert RT.use_bf16(None, torch.device("cuda")) is gpu_bf16


def test_asking_for_bf16_without_native_support_is_honoured_with_a_warning(monkeypatch, capsys):
    _cpu_features(monkeypatch, False, False)
    assert RT.use_bf16(True, CPU) is True
    assert "no native bf16" in capsys.readouterr().err
    assert RT.use_bf16(False, CPU) is False
    assert capsys.readouterr().err == ""


def test_threads_are_split_between_local_processes(monkeypatch):
    monkeypatch.delenv("R1LAB_THREADS", raising=False)
    monkeypatch.setattr(RT.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert RT.default_threads() == 2
    monkeypatch.setenv("R1LAB_THREADS", "0")
    with pytest.raises(ValueError, match="R1LAB_THREADS must be >= 1"):
        RT.default_threads()
