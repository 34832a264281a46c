"""What every benchmark writes beside its figures: the versions it ran with, and the JSON file itself."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path


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
