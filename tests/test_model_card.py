"""Model cards: every final model directory holds a README.md that huggingface_hub's own parser reads as a model card
(metadata, model-index results equal to what the run measured), whose command trains the same config again through
the real command line, and to which the pipeline adds its R1-protocol evaluation."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
from huggingface_hub import ModelCard
from tiny import TINY_MODEL as TINY

from r1lab import config as C
from r1lab import model_card as M
from r1lab.cli import build_parser
from r1lab.model.hf import HFOptions
from r1lab.model.load import load_model_and_tokenizer
from r1lab.recipes import PipelineConfig
from r1lab.recipes.settings import EvalSettings
from r1lab.recipes.stages import evaluate as pipeline_evaluate
from r1lab.train import grpo as GR
from r1lab.train import pretrain as P
from r1lab.train import sft as S
from r1lab.train.run import read_metrics

SECTIONS = ["## How it was trained", "## Train it again", "## Evaluation", "## Intended use and limits"]


def parse(model_dir):
    return ModelCard.load(model_dir / "README.md")


def reparsed(cfg):
    """`cfg` as the real command line builds it from the command a card prints."""
    argv = shlex.split(M.command_line(cfg))
    assert argv[0] == "r1lab"
    args, extra = build_parser().parse_known_args(argv[1:])
    assert not extra
    return C.resolve(type(cfg), args)


def test_a_pretrained_model_card_parses_and_the_pipeline_adds_its_evaluation(tmp_path):
    cfg = P.PretrainConfig(
        out=str(tmp_path / "run"),
        steps=6,
        rows=2,
        seq_len=192,
        warmup=2,
        eval_every=100,
        eval_problems=3,
        log_every=1,
        save_every=3,
        model=TINY,
        vocab_size=400,
        bf16=False,
        task_args={"arithmetic": {"max_digits": 2}},
    )
    _, _, run = P.pretrain(cfg, progress=False)
    card = parse(run.model_dir)
    d = card.data
    assert d.license == "apache-2.0" and d.base_model is None  # trained from scratch: no Hub base model
    assert d.tags == ["r1lab", "deepseek-v3", "pretraining", "reasoning"] and d.datasets == ["arithmetic"]
    assert d.library_name == "transformers" and d.pipeline_tag == "text-generation" and d.model_name == cfg.out
    final = read_metrics(run.metrics_path)[-1]["eval"]["arithmetic"]
    got = {r.metric_type: r.metric_value for r in d.eval_results}
    assert got == {"accuracy": round(100 * final["greedy"], 1), "think_share": round(100 * final["think_share"], 1)}
    assert all(r.dataset_type == "arithmetic" and r.dataset_split == "test" for r in d.eval_results)
    assert [line for line in card.text.splitlines() if line.startswith("## ")][:4] == SECTIONS
    assert f"{round(100 * final['greedy'], 1)}%" in card.text and "--steps 6" in card.text
    assert reparsed(cfg) == cfg  # the printed command trains this config again

    # the pipeline's R1-protocol evaluation of the model joins the card: metadata and table
    pcfg = PipelineConfig(
        out=str(tmp_path),
        task="arithmetic",
        task_args={"max_digits": 2},
        eval=EvalSettings(limit=4, k=2, max_new_tokens=8),
    )
    summary = pipeline_evaluate(run.model_dir, pcfg, tmp_path / "eval_final.json")["summary"]
    card = parse(run.model_dir)
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["pass@1"].metric_value == round(100 * summary["pass@1"], 1)
    assert results["cons@2"].metric_value == round(100 * summary["cons@k"], 1)
    assert results["pass@1"].metric_args == {
        "problems": 4,
        "k": 2,
        "temperature": 0.6,
        "top_p": 0.95,
        "max_new_tokens": 8,
    }
    assert len(card.data.eval_results) == 6  # the end-of-training check kept beside greedy, pass@1, cons@2, thinks
    table = card.text.split("## Evaluation")[1].split("## ")[0]
    assert table.count("\n| arithmetic") == 6 and f"| {round(100 * summary['pass@1'], 1)}% |" in table
    assert M.add_evaluation(run.model_dir, summary) and len(parse(run.model_dir).data.eval_results) == 6  # replaced

    other = tmp_path / "foreign"
    other.mkdir()
    (other / "README.md").write_text("---\nlicense: mit\n---\n# someone else's model\n")
    assert not M.add_evaluation(other, summary)
    assert (other / "README.md").read_text() == "---\nlicense: mit\n---\n# someone else's model\n"


def test_a_card_names_a_hub_base_model_and_copies_its_licence(tmp_path, tiny_llama_dir):
    hub = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abc"
    shutil.copytree(tiny_llama_dir, hub)
    (hub / "README.md").write_text("---\nlicense: mit\ntags: [llama]\n---\n# acme/tiny-llama\n")
    model, _ = load_model_and_tokenizer(hub)
    cfg = GR.GRPOConfig(out=str(tmp_path / "grpo"), model=str(hub), steps=7)
    card = ModelCard(M.render(cfg, model, []))
    assert card.data.base_model == "acme/tiny-llama" and card.data.license == "mit"
    assert card.data.tags == ["r1lab", "llama", "grpo", "reasoning"] and not card.data.eval_results
    assert "Not evaluated yet" in card.text
    assert "keeps the abilities, limits and biases of `acme/tiny-llama`" in card.text

    local = tmp_path / "mine"  # a local directory with no card: no base_model, licence unknown and said so
    shutil.copytree(tiny_llama_dir, local)
    card = ModelCard(M.render(GR.GRPOConfig(out=str(tmp_path / "g2"), model=str(local)), model, []))
    assert card.data.base_model is None and card.data.license == "other" and card.data.license_name == "unknown"
    assert "has no model card that states one" in card.text and f"`{local}` is a local directory" in card.text

    name = M.hub_id("Qwen/Qwen2.5-0.5B")  # given as a Hub id (no such directory here)
    assert name == "Qwen/Qwen2.5-0.5B"


def test_the_command_in_a_card_trains_the_same_config_for_every_trainer():
    configs = [
        GR.GRPOConfig(
            out="runs/g",
            model="runs/p/model",
            rewards=["accuracy", "format", "tests/r.py:share"],
            reward_weights=[1.0, 0.1, 0.5],
            task_args={"arithmetic": {"max_digits": 1, "ops": "+-"}},
            bf16=False,
            max_seconds=12.5,
            hf=HFOptions(lora_rank=4, lora_target_modules=["q_proj", "v_proj"]),
            report_to=["tensorboard"],
        ),
        S.SFTConfig(
            out="runs/s",
            model="m",
            data="d.jsonl",
            eval_data=None,
            template="r1",
            epochs=3,
            lr=1e-4,
            hf=HFOptions(gradient_checkpointing=True, dtype="bfloat16"),
        ),
        P.PretrainConfig(tasks=["arithmetic", "countdown"], model={"num_hidden_layers": 3}, bf16=True),
    ]
    for cfg in configs:
        back = reparsed(cfg)
        cfg.report_to = []  # the trackers are left out of the command: they do not change the model
        assert back == cfg, type(cfg).__name__


def test_every_trainer_writes_a_card_with_what_it_did(tmp_path, tiny_native_dir):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(json.dumps({"prompt": f"What is {a} + 1?", "completion": f" {a + 1}"}) + "\n" for a in range(20))
    )
    cfg = S.SFTConfig(
        out=str(tmp_path / "sft"),
        model=str(tiny_native_dir),
        data=str(chats),
        template="r1zero",
        epochs=1,
        seq_len=64,
        rows=4,
        eval_fraction=0.2,
        bf16=False,
        device="cpu",
        warmup=1,
    )
    _, _, run = S.sft(cfg, progress=False)
    card = parse(run.model_dir)
    rows = read_metrics(run.metrics_path)
    held = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    assert card.data.tags == ["r1lab", "deepseek-v3", "sft", "reasoning"] and card.data.license == "other"
    assert f"held-out loss {held:.3f}" in card.text and f"fine-tuned from `{tiny_native_dir}`" in card.text

    g = GR.GRPOConfig(
        out=str(tmp_path / "grpo"),
        model=str(run.model_dir),
        steps=2,
        prompts_per_step=2,
        num_generations=2,
        max_new_tokens=6,
        template="r1",
        bf16=False,
        device="cpu",
        task_args={"arithmetic": {"max_digits": 1}},
    )
    _, _, grun = GR.grpo(g, progress=False)
    card = parse(grun.model_dir)
    first = read_metrics(grun.metrics_path)[0]
    assert card.data.license == "other"  # the SFT card it started from could not state one either
    assert f"mean reward: {first['reward_mean']:.3g} at the first step" in card.text
    assert "GRPO from" in card.text and "rewards: accuracy x 1, format x 0.1" in card.text


@pytest.mark.parametrize(
    "task,hub", [("gsm8k", "openai/gsm8k"), ("math500", "HuggingFaceH4/MATH-500"), ("countdown", "countdown")]
)
def test_benchmarks_are_named_by_their_hub_dataset_ids(task, hub):
    assert M.dataset_id(task) == hub
