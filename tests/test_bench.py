"""The benchmark scripts run: bench/gpu.sh's scripts at tiny sizes on the CPU (what a machine without a GPU can
check of them)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 2 minutes: both sampler comparisons and one GRPO step of each system for both models
def test_gpu_script_runs_its_comparisons_at_tiny_size_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu.sh", "--smoke"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = REPO / "bench" / "results" / "gpu-smoke"
    for name in ("sampler-qwen2", "sampler-native"):
        res = json.loads((out / f"{name}.json").read_text())
        assert res["device"] == "cpu" and {r["batch"] for r in res["results"]} == {4, 8}
        assert all(r["r1lab_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0 for r in res["results"])
    grpo = json.loads((out / "grpo_vs_trl.json").read_text())
    assert set(grpo["results"]) == {"qwen2", "native"} and all(r["ratio_best"] > 0 for r in grpo["results"].values())
