"""Shared test fixtures: thread count, paths to the shared benchmark data, temporary run directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Benchmark JSONL lives beside the checkout (../shared/data); R1LAB_DATA overrides.
SHARED_DATA = Path(os.environ.get("R1LAB_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(int(os.environ.get("R1LAB_THREADS", "2")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"benchmark data not found at {SHARED_DATA}; set R1LAB_DATA to the folder with gsm8k/, math500/, ...")
    return SHARED_DATA
