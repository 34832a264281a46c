"""R1-Zero on code end to end, on tiny settings: the shipped config (examples/pipeline-code.yaml) runs every stage on
the pyfunc family with the execution reward, `r1lab eval RUN_DIR` re-measures the final model with the run's own
settings, and the model serves chats whose thinking comes apart from the program."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from r1lab import sandbox
from r1lab.cli import main

CONFIG = Path(__file__).parents[1] / "examples" / "pipeline-code.yaml"
TINY_MODEL = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=4,
    n_group=2,
    topk_group=1,
)


@pytest.mark.slow  # ~1 min on two busy cores: 40 pretraining steps, 2 GRPO steps, three small evaluations
@pytest.mark.skipif(sandbox.unavailable() is not None, reason=f"{sandbox.unavailable()}")
def test_code_pipeline_trains_evaluates_and_serves_a_code_reasoning_model(tmp_path, capsys):
    import openai

    from r1lab.serve.app import BackgroundServer, create_app

    run = tmp_path / "run"
    assert (
        main(
            [
                "pipeline",
                "--config",
                str(CONFIG),
                "--out",
                str(run),
                "--pretrain.steps",
                "40",
                "--pretrain.rows",
                "4",
                "--pretrain.eval-problems",
                "4",
                "--pretrain.model",
                json.dumps(TINY_MODEL),
                "--pretrain.vocab-size",
                "400",
                "--grpo.steps",
                "2",
                "--grpo.prompts-per-step",
                "2",
                "--grpo.num-generations",
                "3",
                "--grpo.max-new-tokens",
                "24",
                "--eval.limit",
                "6",
                "--eval.k",
                "2",
                "--eval.max-new-tokens",
                "24",
            ]
        )
        == 0
    )
    assert "R1-Zero in miniature (pyfunc" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "pyfunc" and summary["task_args"] == yaml.safe_load(CONFIG.read_text())["task_args"]
    for f in ("report.html", "report.md", "eval_base.json", "eval_final.json", "grpo/model/config.json"):
        assert (run / f).exists(), f
    rewards = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/code/mean" in r for r in rewards if "reward_mean" in r)  # the execution reward trained it

    # `r1lab eval RUN_DIR`: the final model on the run's task, knobs and eval settings gives the run's own numbers
    assert main(["eval", str(run), "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["summary"]
    final = json.loads((run / "eval_final.json").read_text())["summary"]
    assert again["n"] == final["n"] == 6
    assert (again["pass@1"], again["greedy"], again["task"]) == (final["pass@1"], final["greedy"], "pyfunc")

    # served: an OpenAI client's chat comes back with the thinking apart from the content
    problem = json.loads((run / "eval_final.json").read_text())["records"][0]
    with BackgroundServer(create_app(run / "grpo" / "model", model_name="code", max_batch=4)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="code", messages=[{"role": "user", "content": problem["prompt"]}], max_tokens=24, temperature=0
        )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason in ("stop", "length") and isinstance(message.content, str)
    assert "reasoning_content" in message.model_dump() and "<think>" not in message.content
