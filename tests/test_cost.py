"""Parameter counts against models actually built, DeepSeek-V3's published figures, the $5.576M check,
KV cache, the RTX 3080 fit, and the `r1lab cost` command end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers as T
from conftest import tiny_model_config

from r1lab import cost, cost_report
from r1lab.cli import main

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)


def _hf_configs():
    ds = dict(
        SMALL,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=12,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        num_key_value_heads=4,
    )
    return {
        "llama-gqa": T.LlamaConfig(**SMALL, num_key_value_heads=2),
        "llama-bias-tied-headdim": T.LlamaConfig(
            **SMALL, num_key_value_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, head_dim=6
        ),
        "mistral": T.MistralConfig(**SMALL, num_key_value_heads=2),
        "qwen2-untied": T.Qwen2Config(**SMALL, num_key_value_heads=2),
        "qwen2-tied": T.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen3": T.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16),
        "gemma": T.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=8),
        "gemma2": T.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8),
        "gemma3_text": T.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=8),
        "mixtral": T.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": T.Qwen2MoeConfig(
            **SMALL,
            num_key_value_heads=2,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=20,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        ),
        "qwen3_moe": T.Qwen3MoeConfig(
            **{**SMALL, "num_hidden_layers": 4},
            num_key_value_heads=2,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=12,
            decoder_sparse_step=2,
            head_dim=8,
        ),
        "deepseek_v3-q_lora": T.DeepseekV3Config(**ds, q_lora_rank=24),
        "deepseek_v3-2-shared": T.DeepseekV3Config(**ds, q_lora_rank=24, n_shared_experts=2),
        "deepseek_v3-no-q_lora-bias": T.DeepseekV3Config(**ds, q_lora_rank=None, attention_bias=True),
    }


def _built_count(model: torch.nn.Module) -> int:
    """Parameters (tied ones once) plus DeepSeek's router bias, a buffer that the checkpoint stores."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))


@pytest.mark.parametrize("name", list(_hf_configs()))
def test_total_parameters_match_the_built_transformers_model(name):
    config = _hf_configs()[name]
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)
    # transformers builds no MTP module, so the main-model count is the one to compare
    assert cost.parameter_counts(config)["params_total"] == _built_count(model)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3-q_lora"])
def test_active_parameters_drop_the_unchosen_experts_of_the_built_model(name):
    config = _hf_configs()[name]
    model = T.AutoModelForCausalLM.from_config(config)
    d = config.to_dict()
    experts = d.get("num_local_experts") or d.get("num_experts") or d.get("n_routed_experts")
    k = d["num_experts_per_tok"]
    unchosen = sum(p.numel() * (experts - k) // experts for n, p in model.named_parameters() if ".experts." in n)
    assert cost.parameter_counts(config)["params_active"] == _built_count(model) - unchosen


def test_counts_read_from_a_saved_config_json_directory(tmp_path):
    config = _hf_configs()["qwen2_moe"]
    config.save_pretrained(tmp_path)
    assert cost.parameter_counts(str(tmp_path)) == cost.parameter_counts(config)
    assert cost.parameter_counts(str(tmp_path / "config.json")) == cost.parameter_counts(config)


@pytest.mark.parametrize("tied", [False, True])
def test_native_model_with_mtp_has_total_plus_mtp_parameters(tied, tmp_path):
    from r1lab.model.deepseek import DeepseekV3

    cfg = tiny_model_config(50, num_nextn_predict_layers=2, tie_word_embeddings=tied)
    model = DeepseekV3(cfg)
    n = cost.parameter_counts(cfg)
    assert n["params_total"] + n["params_mtp"] == _built_count(model)
    cfg.save(tmp_path / "config.json")  # the checkpoint's config.json reads the same
    assert cost.parameter_counts(str(tmp_path)) == n


def test_native_dense_model_counts_match():
    from r1lab.model.deepseek import DeepseekV3

    cfg = tiny_model_config(50, n_routed_experts=0, q_lora_rank=None)
    assert cost.parameter_counts(cfg)["params_total"] == _built_count(DeepseekV3(cfg))


# ----------------------------------------------------------------------------- DeepSeek-V3 as published


@pytest.mark.parametrize("source", ["deepseek-v3-671b", "deepseek-r1", T.DeepseekV3Config()])
def test_deepseek_v3_has_671b_total_and_37b_activated(source):
    n = cost.parameter_counts(source)
    assert n["params_total"] == pytest.approx(671e9, rel=0.02)
    assert n["params_active"] == pytest.approx(37e9, rel=0.02)
    assert n["params_checkpoint"] == pytest.approx(685e9, rel=0.01)  # HF checkpoint: + 14B MTP module
    assert n["params_checkpoint"] - n["params_total"] == pytest.approx(14e9, rel=0.05)


def test_breakdown_adds_up_to_the_total():
    b = cost.parameter_breakdown("deepseek-v3-671b")
    assert sum(v for k, v in b.items() if k not in ("total", "mtp")) == b["total"]
    assert b["embedding"] == b["lm_head"] == 129280 * 7168


def test_mla_caches_latent_plus_rope_key_per_layer():
    kv = cost.kv_cache_bytes_per_token("deepseek-v3-671b", bytes_per_value=2)
    assert kv["kv_cache_bytes_per_token"] == (512 + 64) * 61 * 2
    assert kv["kv_cache_bytes_per_token_mha"] == 61 * 128 * ((128 + 64) + 128) * 2


def test_gqa_caches_k_and_v_per_kv_head():
    kv = cost.kv_cache_bytes_per_token("deepseek-r1-distill-qwen-7b", bytes_per_value=2)
    assert kv["kv_cache_bytes_per_token"] == 28 * 2 * 4 * 128 * 2
    assert kv["kv_cache_bytes_per_token_mha"] == 28 * 2 * 28 * 128 * 2


@pytest.mark.parametrize(
    "preset, published",
    [
        # parameter counts shown on the Hugging Face model pages
        ("deepseek-r1-distill-qwen-1.5b", 1.78e9),
        ("deepseek-r1-distill-qwen-7b", 7.62e9),
        ("deepseek-r1-distill-qwen-14b", 14.8e9),
        ("deepseek-r1-distill-qwen-32b", 32.8e9),
        ("deepseek-r1-distill-llama-8b", 8.03e9),
        ("deepseek-r1-distill-llama-70b", 70.6e9),
        ("smollm2-135m", 135e6),
    ],
)
def test_distill_presets_match_their_published_sizes(preset, published):
    assert cost.parameter_counts(preset)["params_total"] == pytest.approx(published, rel=0.01)


# ----------------------------------------------------------------------------- FLOPs


def test_dense_flops_are_twice_the_matmul_weights_plus_attention():
    h, f, L, nh, nkv, V, S = 32, 48, 3, 4, 2, 97, 64
    config = T.LlamaConfig(**SMALL, num_key_value_heads=nkv)
    hd = h // nh
    matmul = L * (h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * f) + V * h  # lm_head, no embedding lookup
    attention = 2 * L * nh * (hd + hd) * S
    assert cost.flops_per_token(config, S, causal=False) == 2 * matmul + attention
    assert cost.flops_per_token(config, S) == 2 * matmul + attention / 2
    assert cost.training_flops_per_token(config, S) == 3 * cost.flops_per_token(config, S)


def test_tied_lm_head_still_costs_its_matmul():
    tied = T.Qwen2Config(**SMALL, tie_word_embeddings=True)
    untied = T.Qwen2Config(**SMALL, tie_word_embeddings=False)
    assert cost.flops_per_token(tied) == cost.flops_per_token(untied)
    assert cost.parameter_counts(untied)["params_total"] - cost.parameter_counts(tied)["params_total"] == 97 * 32


def test_achieved_flops_report():
    r = cost.achieved_flops_report(tokens=1000, seconds=2.0, flops_per_token=6e6, peak=1e10)
    assert r == {"tokens_per_s": 500.0, "flops": 6e9, "flops_per_s": 3e9, "mfu": 0.3}
    assert cost.achieved_flops_report(10, 1.0, 1.0, None)["mfu"] is None
    with pytest.raises(ValueError, match=r"seconds must be > 0 \(got 0\)"):
        cost.achieved_flops_report(10, 0, 1.0, 1.0)


# ----------------------------------------------------------------------------- the $5.6M check


def _deepseek_v3_training_flops_per_token_by_hand(seq_len=4096):
    """The same formula written out with DeepSeek-V3's numbers, independently of r1lab.cost."""
    h, V = 7168, 129280
    attn_w = h * 1536 + 1536 * 128 * 192 + h * (512 + 64) + 512 * 128 * (128 + 128) + 128 * 128 * h
    dense = 3 * h * 18432
    moe_active = (8 + 1) * 3 * h * 2048 + 256 * h  # 8 routed + 1 shared expert, router
    matmul = 61 * attn_w + 3 * dense + 58 * moe_active + V * h
    attention = 2 * 61 * 128 * (192 + 128) * seq_len / 2  # causal: half the keys on average
    mtp = 2 * (attn_w + moe_active + 2 * h * h + V * h) + 2 * 128 * (192 + 128) * seq_len / 2
    return 3 * (2 * matmul + attention + mtp)


def _run_json(capsys, *argv) -> dict:
    assert main(["cost", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_deepseek_v3_costs_5_576m_and_reports_the_implied_mfu(capsys):
    r = _run_json(
        capsys, "deepseek-v3-671b", "--tokens", "14.8T", "--gpu", "H800", "--gpu-hours", "2.788M", "--price", "2"
    )
    assert r["cost_usd"] == pytest.approx(5.576e6)
    per_token = _deepseek_v3_training_flops_per_token_by_hand()
    mfu = per_token * 14.8e12 / (2.788e6 * 3600 * 989.4e12)
    assert r["training_flops_per_token"] == pytest.approx(per_token, rel=1e-12)
    assert r["mfu"] == pytest.approx(mfu, rel=1e-9)
    assert r["mfu_by_peak"]["fp8"] == pytest.approx(mfu / 2, rel=1e-3)
    assert 0.3 < r["mfu"] < 0.45
    assert r["params_total"] == pytest.approx(671e9, rel=0.02)
    assert r["kv_cache_bytes_per_token"] == (512 + 64) * 61 * 2


def test_cli_mfu_gives_back_the_gpu_hours(capsys):
    first = _run_json(capsys, "deepseek-v3-671b", "--tokens", "14.8T", "--gpu", "H800", "--gpu-hours", "2.788M")
    again = _run_json(
        capsys, "deepseek-v3-671b", "--tokens", "14.8T", "--gpu", "H800", "--mfu", str(first["mfu"]), "--price", "2"
    )
    assert again["gpu_hours"] == pytest.approx(2.788e6, rel=1e-9)
    assert again["cost_usd"] == pytest.approx(5.576e6, rel=1e-9)


def test_cli_text_output_shows_the_cost_and_both_mfus(capsys):
    assert (
        main(
            ["cost", "deepseek-v3-671b", "--tokens", "14.8T", "--gpu", "H800", "--gpu-hours", "2.788M", "--price", "2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "$5.576M" in out and "of the bf16 dense peak" in out and "of the fp8 dense peak" in out
    assert "70,272 bytes" in out


# ----------------------------------------------------------------------------- fitting a consumer GPU


def test_cli_fits_rtx_3080_at_8k_context(capsys):
    r = _run_json(capsys, "--fits", "RTX 3080", "--context", "8192")["fits"]
    fits = {row["model"]: row["fits"] for row in r["models"]}
    assert r["gpu_memory_bytes"] == 10 * 1024**3 and r["seq_len"] == 8192
    assert fits["deepseek-r1-distill-qwen-1.5b"]["bf16"]
    assert fits["deepseek-r1-distill-qwen-7b"]["int4"] and not fits["deepseek-r1-distill-qwen-7b"]["bf16"]
    assert not any(fits["deepseek-r1-distill-qwen-32b"].values())
    assert not any(fits["deepseek-v3-671b"].values())


def test_inference_memory_is_weights_plus_kv_cache_plus_overhead():
    m = cost.inference_memory("deepseek-r1-distill-qwen-1.5b", seq_len=1000, batch=2)
    n = cost.parameter_counts("deepseek-r1-distill-qwen-1.5b")["params_total"]
    kv = 28 * 2 * 2 * 128 * 2 * 1000 * 2
    assert m["bf16"]["total"] == 2 * n + kv + cost.RUNTIME_OVERHEAD_BYTES
    assert m["int4"]["weights"] == n * 4.25 / 8


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["deepseek-v3-671b", "--tokens", "1T", "--gpu", "H900", "--gpu-hours", "1M"],
            r"--gpu: unknown GPU 'H900'; choose one of: .*H800",
        ),
        (
            ["deepseek-v3-671b", "--tokens", "1T", "--gpu", "H800", "--gpu-hours", "1M", "--mfu", "0.4"],
            r"either --gpu-hours .* or --mfu .*not both",
        ),
        (["deepseek-v3-671b", "--tokens", "-5"], r"--tokens must be > 0 \(got -5"),
        (["deepseek-v3-671b", "--tokens", "lots"], r"--tokens must be a number such as 14.8T"),
        (
            ["/nonexistent/model"],
            r"no model config at '/nonexistent/model': give a model directory, a config.json, or a preset",
        ),
        (["deepseek-v9"], r"no model config at 'deepseek-v9'.*deepseek-v3-671b.*smollm2-135m"),
        ([], r"give a model .* or --fits GPU"),
        (
            ["deepseek-v3-671b", "--tokens", "1T", "--gpu", "H800", "--mfu", "40"],
            r"--mfu must be in \(0, 1\] \(got 40\)",
        ),
        (["deepseek-v3-671b", "--tokens", "1T", "--gpu-hours", "1M"], r"--gpu-hours needs --gpu"),
        (["deepseek-v3-671b", "--gpu", "H800", "--mfu", "0.4"], r"--mfu needs --tokens"),
        (["deepseek-v3-671b", "--fits", "H900"], r"--fits: unknown GPU 'H900'"),
        (["deepseek-v3-671b", "--seq-len", "0"], r"--seq-len must be > 0 \(got 0\)"),
    ],
)
def test_cli_errors_name_the_problem_and_the_fix(capsys, argv, message):
    assert main(["cost", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1lab cost: ")
    assert re.search(message, err), err


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported.*llama"):
        cost.parameter_counts(str(tmp_path))


def test_parse_quantity_suffixes():
    assert [cost_report.parse_quantity(x) for x in ("14.8T", "2.788M", "671B", "3k", "1e9", "0.5")] == [
        14.8e12,
        2.788e6,
        671e9,
        3e3,
        1e9,
        0.5,
    ]
