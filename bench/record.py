"""What every benchmark does around its figures: fix the memory allocator's policy before timing, and write the
versions it ran with and the JSON file itself."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import json
import platform
from pathlib import Path


def settle_allocator() -> str:
    """Fix glibc malloc's heap policy for the whole process: freed memory stays with the process and large blocks
    come from the heap, so steady-state steps pay no page faults. By default glibc moves these thresholds as the
    process frees large blocks, and the same engine then ran at very different speeds depending on what the process
    had done before: transformers' `generate` at batch 64 gave 2,100 to 3,400 tok/s from run to run (its KV cache
    grows by concatenation, a fresh large block at every step), r1lab's sampler 6,000 to 7,500. Both systems in a
    benchmark run under the same fixed policy. Returns what was done, for the JSON."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or platform.libc_ver()[0] != "glibc":
        return "left as it is (not glibc)"
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = all(libc.mallopt(opt, val) == 1 for opt, val in (
        (M_MMAP_THRESHOLD, 256 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))
    return "glibc: mmap threshold 256 MiB, trim threshold 1 GiB, top pad 64 MiB" if ok else "glibc: mallopt refused"


def versions(*packages: str) -> dict[str, str]:
    """Python's version and each named package's installed version."""
    return {"python": platform.python_version(), **{p: importlib.metadata.version(p) for p in packages}}


def write_json(out: str | Path, result: dict) -> Path:
    """Write `result` to `out` (creating its folder) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return out
