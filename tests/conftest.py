"""Shared test fixtures: thread count, paths to the shared benchmark data, temporary run directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The benchmark JSONL lives beside the checkout (../shared/data); R1LAB_DATA overrides. Nothing of it is copied into
# the repo: tests that read it request `shared_data`, which reports them as skipped (with why) where it is absent.
FULL_DATA = Path(os.environ.get("R1LAB_DATA") or REPO.parent / "shared" / "data")
HAVE_FULL_DATA = (FULL_DATA / "gsm8k" / "test.jsonl").is_file()
if HAVE_FULL_DATA:  # what r1lab.tasks.benchmarks reads when a test names no data_dir, whatever the working directory
    os.environ["R1LAB_DATA"] = str(FULL_DATA)

torch.set_num_threads(int(os.environ.get("R1LAB_THREADS", "2")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark files (../shared/data or R1LAB_DATA). Where they are absent a test that reads them is reported
    as skipped with this reason; with R1LAB_REQUIRE_DATA=1 (as .ci/run sets) it fails instead."""
    if not HAVE_FULL_DATA:
        why = (
            f"benchmark data not found at {FULL_DATA} (set R1LAB_DATA to the folder with gsm8k/, math500/, "
            "...): this check did not run"
        )
        if os.environ.get("R1LAB_REQUIRE_DATA") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return FULL_DATA


def tiny_texts() -> list[str]:
    """A small corpus for test tokenizers: arithmetic in the R1-Zero answer format."""
    return [
        f"What is {a} + {b}? <think> {a} plus {b} </think> <answer> {a + b} </answer>"
        for a in range(0, 60, 3)
        for b in range(0, 60, 7)
    ]


def tiny_model_config(vocab_size: int, **kw):
    from r1lab.model.config import ModelConfig

    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        initializer_range=0.3,
        max_position_embeddings=256,
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from r1lab.tokenizer import train_tokenizer

    return train_tokenizer(tiny_texts(), vocab_size=300)


@pytest.fixture(scope="session")
def tiny_native_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved native MoE checkpoint (random weights, large init so greedy choices are far from ties)."""
    from r1lab.model.checkpoint import save_model
    from r1lab.model.deepseek import DeepseekV3

    tok = tiny_tokenizer
    cfg = tiny_model_config(
        len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        num_nextn_predict_layers=1,
    )
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    return save_model(model, tmp_path_factory.mktemp("native") / "model", tokenizer=tok)


@pytest.fixture(scope="session")
def tiny_native_dir_long(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved native MoE checkpoint without MTP whose context fits R1-template prompts (512 positions)."""
    from r1lab.model.checkpoint import save_model
    from r1lab.model.deepseek import DeepseekV3

    tok = tiny_tokenizer
    cfg = tiny_model_config(
        len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return save_model(DeepseekV3(cfg), tmp_path_factory.mktemp("native_long") / "model", tokenizer=tok)


def save_hf(model, tokenizer, tmp_path_factory, name: str) -> Path:
    """A random transformers model and its tokenizer saved in a fresh temporary directory."""
    path = tmp_path_factory.mktemp(name) / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved random transformers Llama (GQA) with the tiny tokenizer: the stand-in for any HF causal LM."""
    import transformers

    tok = tiny_tokenizer
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(0)  # the tiny byte-level tokenizer makes a GSM8K prompt ~700 tokens: hence the 2048 context
    return save_hf(transformers.LlamaForCausalLM(cfg), tok, tmp_path_factory, "llama")


def grpo_interrupted_at(cfg, step: int) -> None:
    """Run GRPO with `cfg` as if the process died when step `step` began (after the steps before it, and their
    checkpoints, were done)."""
    from r1lab.train import grpo as GR

    real = GR.GRPOTrainer.rollout

    def crash(self, s):
        if s == step:
            raise KeyboardInterrupt
        return real(self, s)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GR.GRPOTrainer, "rollout", crash)
        with pytest.raises(KeyboardInterrupt):
            GR.grpo(cfg, progress=False)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer):
    """A saved random transformers GPT-2, a model outside the Llama family: the generic sampler backend and packed
    training rows."""
    import transformers

    tok = tiny_tokenizer
    cfg = transformers.GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return save_hf(transformers.GPT2LMHeadModel(cfg), tok, tmp_path_factory, "gpt2")
