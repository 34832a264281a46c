"""Process-wide settings: bf16 by default only on GPUs that have it, threads, the allocator's policy."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

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


ALLOC_PROBE = """
import sys
from r1lab.runtime import settle_allocator
if sys.argv[1] == "settle":
    print(settle_allocator())
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
block = bytearray(64 << 20)   # malloc'd and touched: 64 MiB resident
before = rss()
del block
print(round((before - rss()) / 2**20))  # MiB handed back to the OS by the free
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/statm"), reason="glibc's malloc on Linux only"
)
def test_the_settled_allocator_keeps_freed_memory_instead_of_handing_it_back(tmp_path):
    def freed(mode):
        out = subprocess.run(
            [sys.executable, "-c", ALLOC_PROBE, mode],
            capture_output=True,
            text=True,
            check=True,
            env={k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "R1LAB_MALLOC"))},
        )
        return out.stdout.split()[-1], out.stdout

    released, _ = freed("default")
    kept, text = freed("settle")
    assert int(released) >= 60  # glibc's default: a 64 MiB block is mmapped, and unmapped when freed
    assert int(kept) <= 4 and "glibc: mmap threshold 256 MiB" in text  # settled: it stays for the next one


def test_the_allocator_is_left_alone_where_the_user_chose(monkeypatch):
    monkeypatch.setenv("R1LAB_MALLOC", "system")
    assert RT.settle_allocator() == "left as it is (R1LAB_MALLOC=system)"
    monkeypatch.delenv("R1LAB_MALLOC")
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert "environment" in RT.settle_allocator()
    monkeypatch.setenv("R1LAB_MALLOC", "sytem")
    with pytest.raises(ValueError, match="R1LAB_MALLOC must be 'tuned'.*'system'.*got 'sytem'"):
        RT.settle_allocator()
