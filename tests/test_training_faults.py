"""Training runs survive what kills and bad settings do to them: stale temporaries are swept, the metrics file
matches the checkpoint after any resume, settings that cannot work are refused before training, and a step whose
loss or gradient is not finite stops the run with the last good checkpoint kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import grpo_interrupted_at

from r1lab.cli import main
from r1lab.recipes.report import curve_points
from r1lab.train import grpo as GR
from r1lab.train import losses as L
from r1lab.train.run import Run, TrainingError, read_metrics


def _cfg(tmp_path, model_dir, **kw):
    base = dict(
        out=str(tmp_path / "grpo"),
        model=str(model_dir),
        steps=4,
        prompts_per_step=2,
        num_generations=3,
        max_new_tokens=6,
        template="r1",
        bf16=False,
        save_every=2,
        eval_problems=2,
        task_args={"arithmetic": {"max_digits": 1}},
    )
    base.update(kw)
    return GR.GRPOConfig(**base)


def _steps(run_dir):
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]


def test_sigkill_during_a_checkpoint_write_leaves_no_temporary_after_the_next_start(tmp_path):
    """A process killed while it writes a checkpoint leaves a `.checkpoint.tmp-*` directory: the next run in that
    directory removes it (and the interrupted write never replaced anything)."""
    code = (
        f"import time; from pathlib import Path; from r1lab.model.checkpoint import atomic_dir\n"
        f"def fill(tmp):\n    (tmp / 'model.safetensors').write_bytes(b'x' * 1_000_000); time.sleep(60)\n"
        f"atomic_dir(Path({str(tmp_path)!r}) / 'checkpoint', fill)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".checkpoint.tmp-*/model.safetensors")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert list(tmp_path.glob(".checkpoint.tmp-*")) and not (tmp_path / "checkpoint").exists()
    Run(tmp_path)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_metrics_match_the_checkpoint_after_a_kill_before_the_first_checkpoint(tiny_native_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_native_dir, save_every=20)
    grpo_interrupted_at(cfg, step=2)  # steps 1 and 2 logged, no checkpoint written
    assert _steps(tmp_path / "grpo") == [1, 2] and not (tmp_path / "grpo" / "checkpoint").exists()
    GR.grpo(cfg, progress=False)
    assert _steps(tmp_path / "grpo") == [1, 2, 3, 4]


def test_fresh_start_replaces_the_old_metrics_and_models(tiny_native_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_native_dir, steps=2)
    GR.grpo(cfg, progress=False)
    GR.grpo(cfg, resume=False, progress=False)
    assert _steps(tmp_path / "grpo") == [1, 2]


def test_torn_last_metrics_line_does_not_block_resume(tiny_native_dir, tmp_path):
    ref, _, _ = GR.grpo(_cfg(tmp_path / "a", tiny_native_dir), progress=False)
    cfg = _cfg(tmp_path / "b", tiny_native_dir)
    grpo_interrupted_at(cfg, step=3)  # checkpoint at step 2, rows 1..3
    with open(tmp_path / "b" / "grpo" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward_me')  # the disk filled, or the power went, mid-line
    resumed, _, run = GR.grpo(cfg, progress=False)
    assert _steps(run.dir) == [1, 2, 3, 4]
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_damaged_metrics_line_before_the_last_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(Exception, match="metrics.jsonl:2 is not valid JSON"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_report_plots_each_step_once():
    rows = [
        {"step": 1, "reward_mean": 0.1},
        {"step": 2, "reward_mean": 0.2},
        {"step": 1, "reward_mean": 0.3},
        {"step": 2, "eval": {}},
        {"step": 3, "reward_mean": None},
    ]
    assert curve_points(rows, "reward_mean") == ((1, 2), (0.3, 0.2))


@pytest.mark.parametrize("seq_len", ["64", "96"])
def test_pretrain_names_the_seq_len_that_fits(tmp_path, capsys, seq_len):
    assert main(["pretrain", "--out", str(tmp_path / "p"), "--seq-len", seq_len, "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"no example fits in seq_len {seq_len}" in err and "use --seq-len" in err and "\n" not in err


def test_grpo_survives_a_step_where_no_reward_judges(tiny_native_dir, tmp_path):
    reward = tmp_path / "never.py"
    reward.write_text("def never(completions, **kw):\n    return [None] * len(completions)\n")
    cfg = _cfg(tmp_path, tiny_native_dir, steps=2, rewards=[f"{reward}:never"], reward_weights=[1.0])
    _, _, run = GR.grpo(cfg, progress=True)  # the progress bar shows '-' for what could not be judged
    rows = read_metrics(run.metrics_path)
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward_mean"] is None for r in rows)
    assert all(r["grad_norm"] == 0.0 for r in rows)  # advantages are 0: nothing to learn, nothing broken


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--reward-weights", "nan,0.1"),
        ("--epsilon-high", "-inf"),
        ("--temperature", "1e999"),
    ],
)
def test_non_finite_settings_are_refused_up_front(tiny_native_dir, tmp_path, capsys, flag, value):
    assert main(["grpo", "--model", str(tiny_native_dir), "--out", str(tmp_path / "g"), f"{flag}={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "must be a finite number" in err and "\n" not in err
    assert not (tmp_path / "g" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="lr must be a finite number"):
        GR.GRPOConfig(model="m", lr=float("inf")).validate()


def test_non_finite_loss_stops_with_the_last_good_checkpoint_kept(tiny_native_dir, tmp_path, monkeypatch):
    clip = L.POLICY_LOSSES["clip"]
    trainer_step = {}

    def poisoned(logp, old, adv, *a):
        loss, clipped = clip(logp, old, adv, *a)
        return (loss * float("nan") if trainer_step["now"] == 2 else loss), clipped

    monkeypatch.setitem(L.POLICY_LOSSES, "clip", poisoned)
    real_rollout = GR.GRPOTrainer.rollout

    def rollout(self, step):
        trainer_step["now"] = step
        return real_rollout(self, step)

    monkeypatch.setattr(GR.GRPOTrainer, "rollout", rollout)
    cfg = _cfg(tmp_path, tiny_native_dir)
    with pytest.raises(TrainingError, match=r"step 3: loss is nan.*last good checkpoint, step 2"):
        GR.grpo(cfg, progress=False)
    run_dir = tmp_path / "grpo"
    assert not (run_dir / "model").exists() and _steps(run_dir) == [1, 2]
    state = torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    weights = json.loads((run_dir / "checkpoint" / "config.json").read_text())
    assert weights["model_type"] == "deepseek_v3"


def test_a_diverging_pretrain_stops_with_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "pretrain",
                "--out",
                str(tmp_path / "p"),
                "--lr",
                "1e30",
                "--steps",
                "5",
                "--rows",
                "2",
                "--model",
                '{"num_hidden_layers": 1}',
                "--eval-problems",
                "2",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("r1lab pretrain: step ") and ("is nan" in last or "is inf" in last)
    assert "no checkpoint was written yet" in last and "Traceback" not in err
    assert not (tmp_path / "p" / "model").exists()
