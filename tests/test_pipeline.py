"""The pipeline end to end on tiny settings: stages, summary.json keys, report files, resume, config errors."""

from __future__ import annotations

import json

import pytest
from tiny import TINY_MODEL

from r1lab.cli import main
from r1lab.recipes import PipelineConfig, run_pipeline


def _argv(out):
    return [
        "pipeline",
        "--out",
        str(out),
        "--pretrain.steps",
        "4",
        "--pretrain.rows",
        "2",
        "--pretrain.eval-problems",
        "4",
        "--pretrain.model",
        json.dumps(TINY_MODEL),
        "--pretrain.vocab-size",
        "400",
        "--pretrain.bf16",
        "false",
        "--task-args",
        '{"min_digits": 1, "max_digits": 1}',
        "--grpo.steps",
        "2",
        "--grpo.prompts-per-step",
        "2",
        "--grpo.num-generations",
        "3",
        "--grpo.max-new-tokens",
        "8",
        "--grpo.bf16",
        "false",
        "--eval.limit",
        "4",
        "--eval.k",
        "2",
        "--eval.max-new-tokens",
        "8",
    ]


def test_pipeline_runs_every_stage_and_writes_summary_and_report(tmp_path, capsys):
    assert main(_argv(tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "[5/5]" in out and "after RL" in out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    for side in ("base", "final"):
        assert {"greedy", "pass@1", "think_share", "mean_length"} <= set(summary[side])
    assert summary["wall_seconds"] > 0
    for f in (
        "report.html",
        "report.md",
        "eval_base.json",
        "eval_final.json",
        "plots/before_after.png",
        "plots/grpo/reward_mean.png",
        "pretrain/model/config.json",
        "grpo/model/config.json",
        "config.yaml",
    ):
        assert (run / f).exists(), f
    assert "data:image/png;base64," in (run / "report.html").read_text()
    # the compute section: each training stage's measured throughput against this machine's measured matmul peak
    md = (run / "report.md").read_text()
    lines = [line for line in md.split("## Compute", 1)[1].splitlines() if line.startswith(("pretrain", "grpo"))]
    assert len(lines) == 2 and all("tokens/s" in line and "% of the measured matmul peak" in line for line in lines)


def test_rerunning_the_same_directory_resumes_finished_stages(tmp_path, capsys):
    main(_argv(tmp_path / "run"))
    first = (tmp_path / "run" / "summary.json").read_text()
    mtime = (tmp_path / "run" / "grpo" / "model" / "model.safetensors").stat().st_mtime
    main(_argv(tmp_path / "run"))
    assert (tmp_path / "run" / "grpo" / "model" / "model.safetensors").stat().st_mtime == mtime  # not retrained
    a, b = json.loads(first), json.loads((tmp_path / "run" / "summary.json").read_text())
    assert a["base"] == b["base"] and a["final"] == b["final"]


def test_unknown_recipe_and_bad_flags_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown recipe"):
        run_pipeline(PipelineConfig(out=str(tmp_path), recipe="r2"))
    assert main(["pipeline", "--grpo.steps", "many"]) == 2
    assert "grpo.steps expects int" in capsys.readouterr().err


def test_a_yaml_config_runs_a_transformers_model_on_a_benchmark(tmp_path, tiny_llama_dir, capsys, shared_data):
    """The shipped example config (a transformers base model, GSM8K, LoRA), sized down by flags over it."""
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "pipeline-smollm2-gsm8k.yaml"
    out = tmp_path / "run"
    assert (
        main(
            [
                "pipeline",
                "--config",
                str(example),
                "--out",
                str(out),
                "--base-model",
                str(tiny_llama_dir),
                "--grpo.template",
                "r1zero",
                "--grpo.steps",
                "1",
                "--grpo.prompts-per-step",
                "2",
                "--grpo.num-generations",
                "2",
                "--grpo.max-new-tokens",
                "8",
                "--grpo.bf16",
                "false",
                "--grpo.hf.gradient-checkpointing",
                "false",
                "--eval.limit",
                "3",
                "--eval.k",
                "2",
                "--eval.max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "gsm8k" and summary["task_args"] == {}
    base = json.loads((out / "eval_base.json").read_text())
    assert base["summary"]["n"] == 3 and all(r["gold"] and r["samples"] for r in base["records"])
    assert json.loads((out / "grpo" / "model" / "config.json").read_text())["model_type"] == "llama"  # LoRA merged
    assert not (out / "pretrain").exists()


def test_task_knobs_are_checked_before_any_stage(tmp_path, capsys):
    assert (
        main(["pipeline", "--out", str(tmp_path / "run"), "--task", "gsm8k", "--task-args", '{"max_digits": 3}']) == 2
    )
    assert "max_digits" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(_argv(out)) == 0
    return out


def test_eval_of_a_run_directory_reproduces_the_report_with_the_runs_settings(finished_run, capsys):
    """`r1lab eval RUN_DIR` evaluates the run's final model on the task, knobs, template and eval settings the run
    used (and says so), so the figures equal the report's, not some other task's."""
    capsys.readouterr()
    assert main(["eval", str(finished_run), "--out", str(finished_run / "again.json")]) == 0
    out = capsys.readouterr().out
    assert f"evaluating {finished_run / 'grpo' / 'model'}" in out and "config.yaml" in out
    assert '"max_digits": 1' in out and 'template "r1zero"' in out
    again = json.loads((finished_run / "again.json").read_text())["summary"]
    report = json.loads((finished_run / "summary.json").read_text())["final"]
    assert again["n"] == 4 and again["k"] == 2 and again["max_new_tokens"] == 8
    assert (again["pass@1"], again["greedy"]) == (report["pass@1"], report["greedy"])
    # flags still win over the run's settings
    assert main(["eval", str(finished_run), "--k", "1", "--limit", "2", "--greedy", "false"]) == 0
    assert "2 problems (0 skipped), k=1" in capsys.readouterr().out


def test_the_main_jobs_model_carries_the_template_it_was_trained_with(finished_run):
    """Serve, chat, eval and any transformers user render the R1-Zero prompt that GRPO trained on."""
    from transformers import AutoTokenizer

    from r1lab.tokenizer import render_prompt

    for stage in ("pretrain", "grpo"):
        tok = AutoTokenizer.from_pretrained(finished_run / stage / "model")
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": "What is 4 + 5?"}], tokenize=False, add_generation_prompt=True
        )
        assert rendered == render_prompt(tok, "What is 4 + 5?", "r1zero")
        assert rendered.endswith("User: What is 4 + 5?. Assistant:")


def test_eval_of_a_run_without_a_final_model_says_so(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("tasks: [arithmetic]\ntemplate: r1zero\n")
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no final model yet" in err and len(err.strip().splitlines()) == 1
