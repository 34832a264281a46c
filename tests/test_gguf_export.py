"""GGUF export: r1lab's native DeepSeek-V3 as llama.cpp's deepseek2 and Llama-family models as llama/qwen2, read
back with the `gguf` package's own reader; what llama.cpp cannot compute exactly is refused by name. The slow tests
run the files in llama.cpp itself (llama-cpp-python, built from source) against r1lab's forward."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_model_config, tiny_texts
from safetensors import safe_open
from smollm import smollm_dir  # noqa: F401  (fixture)

from r1lab.cli import main
from r1lab.model.checkpoint import save_model
from r1lab.model.config import ModelConfig, tiny_config
from r1lab.model.deepseek import DeepseekV3
from r1lab.model.gguf_export import GGUFExportError, deepseek_refusals, export_gguf, llama_refusals, tokenizer_refusals
from r1lab.tokenizer import R1_TEMPLATE, R1ZERO_TEMPLATE, train_tokenizer


def read(path):
    """{key: value} and {tensor name: (ggml type name, ggml shape, array in numpy order)} via gguf.GGUFReader."""
    import gguf

    reader = gguf.GGUFReader(path)
    keys = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        tensors[t.name] = (
            t.tensor_type.name,
            [int(d) for d in t.shape],
            gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape),
        )
    return keys, tensors


def disk(path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as stored (per-expert names), read without r1lab's loader."""
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def native_dir(tmp_path, tok, name="model", **kw):
    cfg = tiny_model_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    return save_model(model, tmp_path / name, tokenizer=tok)


# ----------------------------------------------------------------------------- native DeepSeek-V3 -> deepseek2


def test_native_model_is_written_as_llama_cpps_deepseek2(tiny_native_dir, tmp_path):
    result = export_gguf(tiny_native_dir, tmp_path / "m.gguf")
    keys, tensors = read(tmp_path / "m.gguf")
    cfg = ModelConfig.load(tiny_native_dir / "config.json")
    a = "deepseek2."
    assert keys["general.architecture"] == "deepseek2" and result.arch == "deepseek2"
    expected = {
        "block_count": 3,
        "embedding_length": 32,
        "feed_forward_length": 64,
        "attention.head_count": 4,
        "attention.head_count_kv": 1,
        "attention.q_lora_rank": 24,
        "attention.kv_lora_rank": 16,
        "attention.key_length": 16 + 8,
        "attention.value_length": 16,
        "attention.key_length_mla": 8 + 8,
        "attention.value_length_mla": 12,
        "rope.dimension_count": 8,
        "leading_dense_block_count": 1,
        "expert_count": 8,
        "expert_used_count": 2,
        "expert_shared_count": 1,
        "expert_feed_forward_length": 16,
        "expert_weights_norm": True,
        "expert_gating_func": 2,
        "expert_group_count": 2,
        "expert_group_used_count": 1,
        "vocab_size": cfg.vocab_size,
        "context_length": 256,
    }
    assert {k: keys[a + k] for k in expected} == expected
    assert keys[a + "expert_weights_scale"] == pytest.approx(2.5)
    assert keys[a + "rope.freq_base"] == pytest.approx(10000.0)
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(3):
        names |= {
            f"blk.{i}.{n}.weight"
            for n in (
                "attn_norm",
                "ffn_norm",
                "attn_q_a",
                "attn_q_a_norm",
                "attn_q_b",
                "attn_kv_a_mqa",
                "attn_kv_a_norm",
                "attn_k_b",
                "attn_v_b",
                "attn_output",
            )
        }
        names |= (
            {f"blk.{i}.ffn_{p}.weight" for p in ("gate", "up", "down")}
            if i == 0
            else {
                f"blk.{i}.{n}.weight"
                for n in (
                    "ffn_gate_inp",
                    "ffn_gate_exps",
                    "ffn_up_exps",
                    "ffn_down_exps",
                    "ffn_gate_shexp",
                    "ffn_up_shexp",
                    "ffn_down_shexp",
                )
            }
            | {f"blk.{i}.exp_probs_b.bias"}
        )
    assert set(tensors) == names  # the MTP layer (model.layers.3) is left out ...
    assert "multi-token-prediction" in result.dropped[0]  # ... and said so
    assert {kind for kind, _, _ in tensors.values()} == {"F32"}
    assert tensors["blk.1.ffn_gate_exps.weight"][1] == [32, 16, 8]  # ggml order: {n_embd, n_ff_exp, n_expert}
    assert tensors["blk.1.ffn_down_exps.weight"][1] == [16, 32, 8]
    assert tensors["blk.0.attn_k_b.weight"][1] == [8, 16, 4]  # {qk_nope, kv_lora_rank, n_head}
    assert tensors["blk.0.attn_v_b.weight"][1] == [16, 12, 4]  # {kv_lora_rank, v_head_dim, n_head}


def test_absorbed_attention_and_stacked_experts_hold_the_checkpoint_values(tiny_native_dir, tmp_path):
    export_gguf(tiny_native_dir, tmp_path / "m.gguf")
    _, tensors = read(tmp_path / "m.gguf")
    ref = disk(tiny_native_dir)
    for i in range(3):
        k_b = tensors[f"blk.{i}.attn_k_b.weight"][2]  # [H, rank, nope]
        v_b = tensors[f"blk.{i}.attn_v_b.weight"][2]  # [H, v, rank]
        kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(4 * (8 + 12), 16)
        np.testing.assert_array_equal(kv_b, ref[f"model.layers.{i}.self_attn.kv_b_proj.weight"].numpy())
    for e in range(8):
        for part in ("gate", "up", "down"):
            np.testing.assert_array_equal(
                tensors[f"blk.2.ffn_{part}_exps.weight"][2][e],
                ref[f"model.layers.2.mlp.experts.{e}.{part}_proj.weight"].numpy(),
            )
    np.testing.assert_array_equal(
        tensors["blk.1.exp_probs_b.bias"][2], ref["model.layers.1.mlp.gate.e_score_correction_bias"].numpy()
    )
    assert np.abs(tensors["blk.1.exp_probs_b.bias"][2]).max() > 0


def test_q8_0_keeps_norms_router_and_biases_f32_and_falls_back_to_f16_off_32(tiny_native_dir, tmp_path):
    result = export_gguf(tiny_native_dir, tmp_path / "m.gguf", qtype="q8_0")
    keys, tensors = read(tmp_path / "m.gguf")
    assert keys["general.file_type"] == 7  # LlamaFileType.MOSTLY_Q8_0
    ref = disk(tiny_native_dir)
    for name, (kind, shape, _) in tensors.items():
        if len(shape) == 1 or "norm" in name or "ffn_gate_inp" in name:
            assert kind == "F32", name
        else:
            assert kind == ("Q8_0" if shape[0] % 32 == 0 else "F16"), name
    assert result.types == {
        k.lower(): n for k, n in __import__("collections").Counter(t[0] for t in tensors.values()).items()
    }
    # q8_0: blocks of 32 values share one scale d = max|x|/127 stored as f16, so each value is within half a step
    # plus the scale's rounding times up to 127 steps: 0.5 + 127 * 2^-11 = 0.562 steps (0.521 measured)
    w = ref["model.layers.0.mlp.down_proj.weight"].numpy()  # rows of 64: q8_0
    q = tensors["blk.0.ffn_down.weight"][2]
    step = np.abs(w.reshape(-1, 32)).max(1, keepdims=True) / 127
    assert (np.abs(q - w).reshape(-1, 32) <= 0.57 * step + 1e-7).all()
    assert 0 < np.abs(q - w).max()


def test_full_rank_queries_tied_embeddings_and_rope_halves_are_reordered_for_llama_cpp(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    cfg = tiny_config(
        len(tok),
        rope_interleave=False,
        num_hidden_layers=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    path = save_model(DeepseekV3(cfg), tmp_path / "m", tokenizer=tok)
    export_gguf(path, tmp_path / "m.gguf")
    keys, tensors = read(tmp_path / "m.gguf")
    assert keys["deepseek2.attention.q_lora_rank"] == 0  # llama.cpp then loads attn_q
    assert "output.weight" not in tensors and "blk.0.attn_q_a.weight" not in tensors
    ref = disk(path)
    q, q_ref = tensors["blk.0.attn_q.weight"][2], ref["model.layers.0.self_attn.q_proj.weight"].numpy()
    d, nope, rope = 64, 32, 32  # per head: 32 no-RoPE rows, then RoPE pairs (i, i + 16) -> rows (2i, 2i + 1)
    for h in range(4):
        np.testing.assert_array_equal(q[h * d : h * d + nope], q_ref[h * d : h * d + nope])
        for i in range(rope // 2):
            np.testing.assert_array_equal(q[h * d + nope + 2 * i], q_ref[h * d + nope + i])
            np.testing.assert_array_equal(q[h * d + nope + 2 * i + 1], q_ref[h * d + nope + i + rope // 2])
    kv, kv_ref = tensors["blk.0.attn_kv_a_mqa.weight"][2], ref["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    np.testing.assert_array_equal(kv[128 + 2], kv_ref[128 + 1].numpy())
    np.testing.assert_array_equal(kv[128 + 3], kv_ref[128 + 1 + 16].numpy())


def test_tokenizer_and_every_chat_template_are_written(tiny_native_dir, tiny_tokenizer, tmp_path):
    export_gguf(tiny_native_dir, tmp_path / "m.gguf")
    keys, _ = read(tmp_path / "m.gguf")
    j = json.loads((tiny_native_dir / "tokenizer.json").read_text())
    assert keys["tokenizer.ggml.model"] == "gpt2" and keys["tokenizer.ggml.pre"] == "starcoder"
    tokens, types = keys["tokenizer.ggml.tokens"], keys["tokenizer.ggml.token_type"]
    for text, i in j["model"]["vocab"].items():
        assert tokens[i] == text
    for t in j["added_tokens"]:
        assert tokens[t["id"]] == t["content"]
        assert types[t["id"]] == (3 if t["special"] else 4)  # CONTROL / USER_DEFINED
    assert types.count(1) == len(tokens) - len(j["added_tokens"])
    assert keys["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    tok = tiny_tokenizer
    assert (keys["tokenizer.ggml.bos_token_id"], keys["tokenizer.ggml.eos_token_id"]) == (
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert keys["tokenizer.ggml.add_bos_token"] is False  # the template writes BOS itself
    assert keys["tokenizer.chat_template"] == R1_TEMPLATE
    assert keys["tokenizer.chat_templates"] == ["r1zero"] and keys["tokenizer.chat_template.r1zero"] == R1ZERO_TEMPLATE


def test_vocabulary_is_padded_to_the_models_size(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    cfg = tiny_config(len(tok) + 10, num_hidden_layers=1, first_k_dense_replace=1)
    path = save_model(DeepseekV3(cfg), tmp_path / "m", tokenizer=tok)
    export_gguf(path, tmp_path / "m.gguf")
    keys, tensors = read(tmp_path / "m.gguf")
    assert len(keys["tokenizer.ggml.tokens"]) == len(tok) + 10 == tensors["token_embd.weight"][1][1]
    assert keys["tokenizer.ggml.tokens"][-1] == f"[PAD{len(tok) + 9}]" and keys["tokenizer.ggml.token_type"][-1] == 5


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(attention_bias=True), "attention_bias true"),
        (dict(n_shared_experts=0), "n_shared_experts 0"),
        (dict(qk_nope_head_dim=0), "qk_nope_head_dim 0"),
        (dict(num_hidden_layers=27), "q_lora_rank 24 with num_hidden_layers 27"),
        (
            dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
            "rope_scaling.mscale None with mscale_all_dim None",
        ),
        (
            dict(
                rope_scaling={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                    "mscale": 1.0,
                    "mscale_all_dim": 0.7,
                }
            ),
            "rope_scaling.mscale 1.0 with mscale_all_dim 0.7",
        ),
        (
            dict(
                rope_scaling={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                    "mscale": 1.0,
                    "mscale_all_dim": 1.0,
                    "attention_factor": 1.2,
                }
            ),
            "rope_scaling.attention_factor 1.2",
        ),
        (
            dict(
                rope_scaling={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                    "mscale": 1.0,
                    "mscale_all_dim": 1.0,
                    "beta_fast": 24,
                }
            ),
            "rope_scaling.beta_fast 24",
        ),
    ],
)
def test_settings_llama_cpp_computes_differently_are_refused_by_name(change, named):
    why = deepseek_refusals(tiny_model_config(300, **change))
    assert len(why) == 1 and why[0].startswith(named)


def test_settings_llama_cpp_computes_alike_are_not_refused():
    yarn = {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 32,
        "beta_slow": 1,
    }  # DeepSeek-V3's own YaRN settings
    for cfg in (
        tiny_model_config(300, rope_scaling=yarn),
        tiny_model_config(300, n_group=4, topk_group=4),
        tiny_model_config(300, n_routed_experts=0),
        tiny_config(300),
        tiny_model_config(300, norm_topk_prob=False),
    ):
        assert deepseek_refusals(cfg) == []


def test_a_refused_model_writes_nothing(tiny_tokenizer, tmp_path):
    path = native_dir(tmp_path, tiny_tokenizer, n_shared_experts=0)
    with pytest.raises(GGUFExportError, match="n_shared_experts 0"):
        export_gguf(path, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".m.gguf*"))


def test_llama_family_settings_llama_cpp_lacks_are_refused_by_name():
    import transformers

    small = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    llama3 = transformers.LlamaConfig(
        **small,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    assert llama_refusals(llama3) == ["rope type 'llama3' (only plain RoPE is exported for llama)"]
    mistral = transformers.MistralConfig(**small, sliding_window=4096)
    assert llama_refusals(mistral)[0].startswith("sliding_window 4096")
    assert llama_refusals(transformers.Qwen2Config(**small)) == []
    assert llama_refusals(transformers.MistralConfig(**small, sliding_window=None)) == []


def test_tokenizers_llama_cpp_splits_differently_are_refused_by_name(tiny_tokenizer):
    j = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    assert tokenizer_refusals(j) == []
    meta = {**j, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}}
    assert tokenizer_refusals(meta)[0].startswith('pre-tokenizer {"type": "Metaspace"')
    nfc = {**j, "normalizer": {"type": "NFC"}}
    assert tokenizer_refusals(nfc)[0].startswith("normalizer 'NFC'") and tokenizer_refusals(nfc, skip_nfc=True) == []
    prefix = json.loads(json.dumps(j))
    prefix["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    assert tokenizer_refusals(prefix)[0].startswith("pre-tokenizer")
    stripped = json.loads(json.dumps(j))
    stripped["added_tokens"][5]["lstrip"] = True
    assert tokenizer_refusals(stripped) == [
        "added token '<think>' with lstrip (llama.cpp matches added tokens exactly)"
    ]
    fallback = {**j, "model": {**j["model"], "byte_fallback": True}}
    assert tokenizer_refusals(fallback)[0].startswith("BPE byte_fallback True")


def test_a_tokenizer_without_digit_splitting_is_gpt2s(tmp_path):
    tok = train_tokenizer(tiny_texts(), vocab_size=300, individual_digits=False)
    cfg = tiny_config(len(tok), num_hidden_layers=1, first_k_dense_replace=1)
    export_gguf(save_model(DeepseekV3(cfg), tmp_path / "m", tokenizer=tok), tmp_path / "m.gguf")
    assert read(tmp_path / "m.gguf")[0]["tokenizer.ggml.pre"] == "gpt-2"


# ----------------------------------------------------------------------------- Llama family


def test_llama_is_written_with_queries_and_keys_in_llama_cpps_rope_order(tiny_llama_dir, tmp_path):
    result = export_gguf(tiny_llama_dir, tmp_path / "l.gguf", qtype="f16")
    keys, tensors = read(tmp_path / "l.gguf")
    assert result.arch == keys["general.architecture"] == "llama"
    assert (
        keys["llama.attention.head_count"],
        keys["llama.attention.head_count_kv"],
        keys["llama.block_count"],
        keys["llama.rope.dimension_count"],
    ) == (4, 2, 2, 8)
    assert keys["llama.rope.freq_base"] == pytest.approx(10000.0)
    ref = disk(tiny_llama_dir)
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight"
        for i in range(2)
        for n in (
            "attn_norm",
            "ffn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        )
    }
    for name, heads in (("q", 4), ("k", 2)):  # head h's rotate_half pair (i, i + 4) -> rows (2i, 2i + 1)
        w, w_ref = tensors[f"blk.1.attn_{name}.weight"][2], ref[f"model.layers.1.self_attn.{name}_proj.weight"].numpy()
        for h in range(heads):
            for i in range(4):
                np.testing.assert_allclose(w[h * 8 + 2 * i], w_ref[h * 8 + i], rtol=1e-3)
                np.testing.assert_allclose(w[h * 8 + 2 * i + 1], w_ref[h * 8 + i + 4], rtol=1e-3)
    assert tensors["blk.0.attn_v.weight"][0] == "F16" and tensors["blk.0.attn_norm.weight"][0] == "F32"


def test_llama_export_imports_back_with_the_same_logits_and_tokens(tiny_llama_dir, tmp_path):
    """Round trip through r1lab's importer (transformers' GGUF reader): f32 weights come back exactly, and the
    digit-splitting pre-tokenizer with them."""
    import transformers

    from r1lab.model.gguf import import_gguf

    export_gguf(tiny_llama_dir, tmp_path / "l.gguf")
    back = import_gguf(tmp_path / "l.gguf", tmp_path / "back")
    tok, tok_back = (transformers.AutoTokenizer.from_pretrained(p) for p in (tiny_llama_dir, back))
    text = "What is 123 + 45? <think> 123 plus 45 </think> <answer> 168 </answer>"
    assert tok_back(text).input_ids == tok(text).input_ids
    pre = [json.loads(t.backend_tokenizer.to_str())["pre_tokenizer"] for t in (tok, tok_back)]
    assert pre[1] == pre[0] and pre[0]["pretokenizers"][0]["type"] == "Digits"  # transformers alone drops Digits
    ids = torch.tensor([tok(text).input_ids])
    a, b = (transformers.AutoModelForCausalLM.from_pretrained(p).eval() for p in (tiny_llama_dir, back))
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=0, atol=1e-5)


def test_other_architectures_are_refused_by_model_type(tiny_gpt2_dir, tmp_path):
    with pytest.raises(GGUFExportError, match="model_type 'gpt2' has no GGUF export"):
        export_gguf(tiny_gpt2_dir, tmp_path / "g.gguf")


# ----------------------------------------------------------------------------- the command


def test_export_gguf_subcommand_writes_the_file_and_says_what(tiny_native_dir, tmp_path, capsys):
    assert main(["export-gguf", str(tiny_native_dir), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    out = capsys.readouterr()
    assert "deepseek2" in out.out and str(tmp_path / "m.gguf") in out.out and "q8_0" in out.out
    assert "multi-token-prediction" in out.err
    assert read(tmp_path / "m.gguf")[0]["general.file_type"] == 7


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "{out}"], "model directory not found"),
        (["{refused}", "{out}"], "n_shared_experts 0"),
    ],
)
def test_export_gguf_errors_are_one_line(args, message, tiny_tokenizer, tmp_path, capsys):
    refused = native_dir(tmp_path, tiny_tokenizer, n_shared_experts=0)
    fill = {"missing": str(tmp_path / "nowhere"), "refused": str(refused), "out": str(tmp_path / "m.gguf")}
    assert main(["export-gguf", *[a.format(**fill) for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("r1lab export-gguf:") and message in err and "\n" not in err


def test_export_gguf_names_the_types_it_writes(tiny_native_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export-gguf", str(tiny_native_dir), str(tmp_path / "m.gguf"), "--type", "q4_0"])
    assert "f32" in capsys.readouterr().err


# ----------------------------------------------------------------------------- llama.cpp itself (slow)
# llama-cpp-python builds llama.cpp from source (CPU only) for minutes; .ci/run installs it and sets
# R1LAB_REQUIRE_LLAMA_CPP=1, so there a missing build fails instead of skipping.

LLAMA_CPP_PYTHON = "0.3.36"  # the version these checks were measured with
STRINGS = [
    "Hello world",
    "What is 123 + 4567?",
    " leading space",
    "trailing  ",
    "multiple   spaces\n\nnew\nlines\n",
    "tabs\tand\r\nCRLF",
    "don't I'll we've THEY'RE",
    "<think> 12 plus 7 </think> <answer> 19 </answer>",
    "<｜User｜>hi<｜Assistant｜><think>\n",
    "unicode: café naïve 日本語 😀 ½ ² ٣ Ⅻ",
    "x=1.5e-3; y=[1,2,3]",
    "   ",
    "a\u00a0b\u2009c",
    "12345678901234567890",
]


def llama_cpp():
    try:
        import llama_cpp as module
    except ImportError as e:
        why = (
            f'llama-cpp-python is not installed ({e}); build it with CMAKE_ARGS="-DGGML_NATIVE=OFF '
            f'-DLLAVA_BUILD=OFF" .venv/bin/pip install llama-cpp-python=={LLAMA_CPP_PYTHON}'
        )
        if os.environ.get("R1LAB_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return module


class LlamaCpp:
    """One GGUF file in llama.cpp: f32 KV cache, no flash attention, one thread, RoPE settings from the file."""

    def __init__(self, path, n_ctx: int = 256):
        self.llm = llama_cpp().Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=1,
            n_threads_batch=1,
            logits_all=True,
            verbose=False,
            type_k=0,
            type_v=0,
            flash_attn=False,
            yarn_attn_factor=-1.0,
            yarn_beta_fast=-1.0,
            yarn_beta_slow=-1.0,
        )

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """n tokens chosen one at a time through llama.cpp's own KV cache."""
        self.llm.reset()
        self.llm.eval(prompt)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval(out[-1:])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def close(self):
        self.llm.close()


def reference_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from the model's own full forward (no cache) at every step."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(reference_logits(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(model, gguf_file, prompt: list[int], n: int = 24) -> dict:
    """llama.cpp against the model on the same tokens: greedy sequences from each, the largest log-probability
    difference over the reference's greedy sequence, mean KL(reference || llama.cpp) and top-1 agreement there."""
    cpp = LlamaCpp(gguf_file)
    try:
        ref = reference_greedy(model, prompt, n)
        got = cpp.greedy(prompt, n)
        ids = prompt + ref
        a, b = log_softmax(reference_logits(model, ids)), log_softmax(cpp.logits(ids))
    finally:
        cpp.close()
    top2 = np.sort(a, -1)[:, -2:]
    return {
        "ref": ref,
        "cpp": got,
        "max_logp_diff": float(np.abs(a - b).max()),
        "kl": float((np.exp(a) * (a - b)).sum(-1).mean()),
        "top1": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "min_margin": float((top2[:, 1] - top2[:, 0]).min()),
    }


def prompt_ids(tok) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 7?"}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, add_special_tokens=False).input_ids


def report(name, qtype, m):
    print(
        f"\n{name} {qtype}: greedy equal {m['ref'] == m['cpp']}, max |dlogp| {m['max_logp_diff']:.2e}, "
        f"KL {m['kl']:.2e}, top-1 {m['top1']:.3f}, smallest top-2 margin {m['min_margin']:.3f}",
        file=sys.stderr,
    )


@pytest.fixture(scope="module")
def native_models(tmp_path_factory, tiny_tokenizer):
    """(directory, model, prompt ids) of two native models: "tiny", the default model of `r1lab pretrain` (tied,
    full-rank queries, 2 expert groups / top 1) trained for 60 steps on its arithmetic (about 2 minutes on 2 cores),
    and "full", random weights (a wide init, so greedy choices are not near-ties) with everything else llama.cpp has
    to get right: q_lora_rank, an untied head, an MTP layer, balancing biases, rotate-half RoPE and YaRN."""
    from r1lab.model.load import load_model
    from r1lab.tokenizer import render_prompt
    from r1lab.train.pretrain import PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("native_cpp")
    _, tok, run = pretrain(
        PretrainConfig(
            out=str(root / "pretrain"),
            steps=60,
            rows=8,
            seq_len=128,
            warmup=10,
            eval_every=10**6,
            eval_problems=1,
            save_every=10**6,
            log_every=10**6,
        ),
        resume=False,
        progress=False,
    )
    tiny = run.model_dir
    yarn = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    }
    full = native_dir(
        root,
        tiny_tokenizer,
        "full",
        num_nextn_predict_layers=1,
        rope_interleave=False,
        rope_scaling=yarn,
        initializer_range=0.15,
    )
    arithmetic = tok(render_prompt(tok, "What is 37 + 48?", "r1zero"), add_special_tokens=False).input_ids
    return {"tiny": (tiny, load_model(tiny), arithmetic), "full": (full, load_model(full), prompt_ids(tiny_tokenizer))}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "full"])
def test_native_model_in_llama_cpp_gives_r1labs_greedy_tokens(native_models, tmp_path, which):
    path, model, prompt = native_models[which]
    export_gguf(path, tmp_path / "f32.gguf")
    m = agreement(model, tmp_path / "f32.gguf", prompt, n=32)
    report(which, "f32", m)  # measured: max |dlogp| 7.8e-6 (tiny), 3e-6 (full)
    assert m["cpp"] == m["ref"] and m["max_logp_diff"] < 1e-4


@pytest.mark.slow
def test_trained_native_model_at_q8_0_keeps_its_next_token_distribution(native_models, tmp_path):
    path, model, prompt = native_models["tiny"]
    export_gguf(path, tmp_path / "q8.gguf", qtype="q8_0")
    m = agreement(model, tmp_path / "q8.gguf", prompt, n=32)
    report("tiny", "q8_0", m)  # measured: KL 5.8e-5, top-1 1.000 (after 150 steps: 2.8e-5, 0.992)
    assert m["kl"] < 1e-3 and m["top1"] >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_family_model_in_llama_cpp_gives_the_same_greedy_tokens(tiny_tokenizer, tmp_path, family):
    import transformers

    from r1lab.model.load import load_tokenizer

    tok = tiny_tokenizer
    small = dict(
        vocab_size=len(tok) + 8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.15,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    make = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    model = make[1](make[0](**small)).eval()
    if family == "qwen2":  # random q/k/v biases, so that they matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    # transformers loads a qwen2 directory's tokenizer with Qwen2's own pipeline: its regex (llama.cpp's qwen2) and
    # an NFC normaliser, which llama.cpp lacks (--skip-nfc; every string here is already NFC)
    tok = load_tokenizer(tmp_path / "m")
    assert export_gguf(tmp_path / "m", tmp_path / "f32.gguf", skip_nfc=family == "qwen2").arch == family
    assert read(tmp_path / "f32.gguf")[0]["tokenizer.ggml.pre"] == {"llama": "starcoder", "qwen2": "qwen2"}[family]
    m = agreement(model, tmp_path / "f32.gguf", prompt_ids(tok))
    report(family, "f32", m)
    assert m["cpp"] == m["ref"] and m["max_logp_diff"] < 1e-4  # measured 3.7e-6 (llama), 4.9e-6 (qwen2)
    cpp = LlamaCpp(tmp_path / "f32.gguf")
    try:
        for text in STRINGS:
            assert cpp.tokenize(text) == tok(text).input_ids, text
    finally:
        cpp.close()
    export_gguf(tmp_path / "m", tmp_path / "q8.gguf", qtype="q8_0", skip_nfc=family == "qwen2")
    m = agreement(model, tmp_path / "q8.gguf", prompt_ids(tok))
    report(family, "q8_0", m)  # random weights: near-ties flip (top-1 0.92-0.97); the KL measured 5.9e-4, 5.6e-4
    assert m["kl"] < 5e-3


def split_then_bytes(regex: str, ignore_merges: bool, texts: list[str]):
    """A byte-level BPE whose pre-tokenizer splits by `regex` first (as Llama-3's and Qwen2's do), trained on texts,
    with R1's special tokens and the reasoning tags."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from r1lab.tokenizer import BOS, EOS, PAD, TAGS

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=[BOS, EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["starcoder", "gpt-2", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_as_the_tokenizer_does(tmp_path, pre):
    """Each byte-level BPE pre-tokenizer the export maps to a llama.cpp type, with special and added tokens."""
    from r1lab.model.gguf_export import LLAMA3_SPLIT, QWEN2_SPLIT

    texts = tiny_texts() + STRINGS * 3
    tok = {
        "starcoder": lambda: train_tokenizer(texts, vocab_size=400),
        "gpt-2": lambda: train_tokenizer(texts, vocab_size=400, individual_digits=False),
        "llama-bpe": lambda: split_then_bytes(LLAMA3_SPLIT, True, texts),
        "qwen2": lambda: split_then_bytes(QWEN2_SPLIT, False, texts),
    }[pre]()
    cfg = tiny_config(len(tok), num_hidden_layers=1, first_k_dense_replace=1)
    export_gguf(save_model(DeepseekV3(cfg), tmp_path / "m", tokenizer=tok), tmp_path / "m.gguf")
    assert read(tmp_path / "m.gguf")[0]["tokenizer.ggml.pre"] == pre
    cpp = LlamaCpp(tmp_path / "m.gguf")
    try:
        for text in STRINGS + [t.upper() for t in STRINGS]:
            assert cpp.tokenize(text) == tok(text).input_ids, text
    finally:
        cpp.close()


@pytest.mark.slow
def test_smollm2_export_runs_in_llama_cpp_like_the_original_and_imports_back(smollm_dir, tmp_path):
    """The real SmolLM2-135M-Instruct: its GGUF (Q4_1) imported by r1lab, exported again, run in llama.cpp against
    transformers, tokenised against the original file, and imported back."""
    import transformers
    from smollm import gguf_path

    from r1lab.model.gguf import import_gguf

    tok = transformers.AutoTokenizer.from_pretrained(smollm_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm_dir).eval()
    export_gguf(smollm_dir, tmp_path / "f32.gguf")
    prompt = prompt_ids(tok)
    m = agreement(model, tmp_path / "f32.gguf", prompt, n=16)
    report("SmolLM2-135M", "f32", m)  # measured: max |dlogp| 7.2e-5
    assert m["cpp"] == m["ref"] and m["max_logp_diff"] < 1e-3

    ours, original = LlamaCpp(tmp_path / "f32.gguf", n_ctx=512), LlamaCpp(gguf_path(), n_ctx=512)
    try:
        for text in STRINGS + [tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False)]:
            assert ours.tokenize(text) == original.tokenize(text) == tok(text, add_special_tokens=False).input_ids, text
        key = "tokenizer.chat_template"
        assert ours.llm.metadata[key] == original.llm.metadata[key]
        # the original's Q4_1 weights, run as Q4_1 (llama.cpp quantises activations to 8 bits for it), against the
        # same weights dequantised to f32: close, not equal
        ids = prompt + m["ref"]
        a, b = log_softmax(ours.logits(ids)), log_softmax(original.logits(ids))
        kl, top1 = float((np.exp(a) * (a - b)).sum(-1).mean()), float((a.argmax(-1) == b.argmax(-1)).mean())
        print(
            f"\nSmolLM2 f32 export vs the original Q4_1 file in llama.cpp: KL {kl:.2e}, top-1 {top1:.3f}",
            file=sys.stderr,
        )
        assert kl < 0.05 and top1 >= 0.9  # measured: KL 4.9e-3, top-1 1.000
    finally:
        ours.close()
        original.close()

    export_gguf(smollm_dir, tmp_path / "q8.gguf", qtype="q8_0")
    m = agreement(model, tmp_path / "q8.gguf", prompt, n=16)
    report("SmolLM2-135M", "q8_0", m)  # measured: KL 6.2e-3, top-1 0.982 (most of it llama.cpp's 8-bit activations,
    assert m["kl"] < 2e-2 and m["top1"] >= 0.95  # as the Q4_1 comparison above shows)

    back = import_gguf(tmp_path / "f32.gguf", tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    ids = prompt + m["ref"]
    np.testing.assert_allclose(reference_logits(again, ids), reference_logits(model, ids), rtol=0, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(back)(STRINGS[1]).input_ids == tok(STRINGS[1]).input_ids
