"""The random models the comparison benchmarks build, at two sizes: `tiny` (the main job's size, for CPUs) and
`0.5b` (about 0.5B parameters, or 0.5B activated for the MoE, for GPUs). Speed does not depend on the weights.
The vocabulary is the tiny arithmetic tokenizer's (512 tokens) at both sizes, so the output head is small in both."""

from __future__ import annotations

from pathlib import Path

import torch

SIZES = ("tiny", "0.5b")


def build_tokenizer():
    from r1lab.tasks import get_task
    from r1lab.tokenizer import train_tokenizer

    problems = get_task("arithmetic").problems("train", n=400, seed=0)
    return train_tokenizer(
        [f"What is {p.prompt} <think> {p.reasoning} </think> <answer> {p.answer} </answer>" for p in problems],
        vocab_size=512,
    )


def qwen2(tok, size: str = "tiny"):
    """A random Qwen2ForCausalLM: tiny (4 x 128) or Qwen2-0.5B's shape (24 x 896, 14 heads, 2 KV heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dims = (
        dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384)
        if size == "tiny"
        else dict(
            hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864
        )
    )
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **dims,
    )
    return Qwen2ForCausalLM(cfg).eval()


def native(tok, size: str = "tiny"):
    """r1lab's DeepSeek-V3: the main job's tiny_config, or a 16-layer MLA + MoE with about 0.5B activated."""
    from r1lab.model.config import tiny_config
    from r1lab.model.deepseek import DeepseekV3

    dims = (
        {}
        if size == "tiny"
        else dict(
            hidden_size=1024,
            num_hidden_layers=16,
            first_k_dense_replace=1,
            intermediate_size=4096,
            num_attention_heads=16,
            q_lora_rank=384,
            kv_lora_rank=256,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            n_routed_experts=32,
            num_experts_per_tok=6,
            moe_intermediate_size=1024,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            tie_word_embeddings=False,
            max_position_embeddings=2048,
        )
    )
    torch.manual_seed(0)
    return DeepseekV3(
        tiny_config(
            len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **dims,
        )
    ).eval()


def save(model, tok, path: Path) -> Path:
    from r1lab.model.checkpoint import save_model
    from r1lab.model.deepseek import DeepseekV3

    if isinstance(model, DeepseekV3):
        return save_model(model, path, tokenizer=tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def describe(model) -> dict:
    """Parameters stored and activated per token (MoE: the routed experts a token uses, plus the rest)."""
    from r1lab.cost import parameter_counts

    cfg = model.config.to_hf_dict() if hasattr(model.config, "to_hf_dict") else model.config.to_dict()
    counts = parameter_counts(cfg)
    return {
        "arch": type(model).__name__,
        "params_total": counts["params_total"],
        "params_active": counts["params_active"],
    }
