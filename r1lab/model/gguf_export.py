"""Export a model directory as a GGUF file for llama.cpp, with its tokenizer and chat templates.

r1lab's native DeepSeek-V3 becomes llama.cpp's `deepseek2` architecture (the one its converter uses for
DeepSeek-V2/V3): MLA is stored in llama.cpp's absorbed form, `kv_b_proj` split into `attn_k_b` (transposed) and
`attn_v_b`, the routed experts stacked, as `convert_hf_to_gguf.py` writes them. Llama and Mistral become `llama`,
Qwen2 `qwen2`. Weights are written with the `gguf` package as f32, f16 or q8_0 (`gguf.quants`); as llama.cpp's
converter does, 1-D tensors (norms, biases, the balancing bias) and the expert router stay f32, and a q8_0 matrix
whose rows are not a multiple of 32 values falls back to f16.

Whatever llama.cpp would compute differently is refused before anything is written, naming the setting:
`deepseek_refusals`, `llama_refusals` and `tokenizer_refusals` list them. Differences left are float arithmetic
and one clamp: llama.cpp divides the top-k expert weights by max(sum, 6.1e-5) where r1lab adds 1e-20, which
differs only when every chosen sigmoid score is below 3e-5.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1lab.model.checkpoint import check_native, read_config, read_weights, recover
from r1lab.model.config import ModelConfig

QTYPES = ("f32", "f16", "q8_0")
LLAMA_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers model_type -> llama.cpp arch


class GGUFExportError(ValueError):
    """A model or tokenizer that llama.cpp cannot run exactly as r1lab does; the message names what and why."""


@dataclass
class Exported:
    """What was written: the file, llama.cpp's architecture name, the count of tensors per stored type, and the
    tensors left out (with the reason)."""

    path: Path
    arch: str
    types: dict[str, int]
    dropped: list[str] = field(default_factory=list)


def export_gguf(model_dir: str | Path, out: str | Path, qtype: str = "f32", skip_nfc: bool = False) -> Exported:
    """Write `model_dir` (native DeepSeek-V3 or a Llama-family transformers model) as the GGUF file `out`, atomically.
    `skip_nfc` writes a tokenizer whose NFC normaliser llama.cpp lacks (Qwen2's) instead of refusing it."""
    import gguf

    if qtype not in QTYPES:
        raise GGUFExportError(f"--type must be one of {', '.join(QTYPES)} (got {qtype!r})")
    if Path(out).is_dir() or any(p.is_file() for p in Path(out).resolve().parents):
        raise ValueError(
            f"{out} is a directory, or inside a path that is a file; give the .gguf file to write "
            f"(e.g. {Path(model_dir).name}.gguf)"
        )
    path = recover(Path(model_dir))
    cfg = read_config(path)
    model_type = cfg.get("model_type")
    if model_type == "deepseek_v3":
        arch, hparams, tensors, dropped = deepseek_tensors(path, cfg)
    elif model_type in LLAMA_FAMILY:
        arch, hparams, tensors, dropped = llama_tensors(path)
    else:
        raise GGUFExportError(
            f"{path}: model_type {model_type!r} has no GGUF export; r1lab exports deepseek_v3 (its "
            f"native model) and {', '.join(LLAMA_FAMILY)}"
        )
    vocab = read_vocab(path, hparams["vocab_size"], skip_nfc)

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(path.name)
        writer.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            }[qtype]
        )
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, hparams)
        vocab.write(writer)
        types: Counter[str] = Counter()
        for name, array in tensors:
            data, kind = stored(name, array, qtype)
            writer.add_tensor(name, data, raw_dtype=kind)
            types[kind.name.lower()] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Exported(out, arch, dict(types), dropped)


# ----------------------------------------------------------------------------- tensor storage


def stored(name: str, array: np.ndarray, qtype: str):
    """(data, GGML type) for one tensor: 1-D tensors, norms and the expert router in f32 (as llama.cpp's converter
    keeps them); other matrices in `qtype`, q8_0 falling back to f16 where a row is not a multiple of 32 values."""
    import gguf

    G = gguf.GGMLQuantizationType
    kind = {"f32": G.F32, "f16": G.F16, "q8_0": G.Q8_0}[qtype]
    if array.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        kind = G.F32
    try:
        return gguf.quants.quantize(array, kind), kind
    except gguf.QuantError:  # rows not a multiple of the q8_0 block (32)
        return gguf.quants.quantize(array, G.F16), G.F16


def write_hparams(writer, hparams: dict) -> None:
    """Each architecture key through the gguf writer's own `add_<key>` method (so its type is the one llama.cpp
    reads); `None` values are left out."""
    for key, value in hparams.items():
        if value is not None:
            getattr(writer, f"add_{key}")(value)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def rope_pairs_adjacent(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a projection whose per-head RoPE pairs are (x_i, x_{i+d/2}) (transformers' rotate_half)
    into llama.cpp's adjacent pairs (x_2i, x_{2i+1}): convert_hf_to_gguf.py's `permute`. Queries and keys reordered
    alike keep every dot product, so this is exact."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- native DeepSeek-V3 -> deepseek2


def deepseek_refusals(cfg: ModelConfig) -> list[str]:
    """The settings of a native model that llama.cpp's deepseek2 graph (src/models/deepseek2.cpp) cannot compute
    as r1lab does; empty when the export is exact."""
    why = []
    if cfg.attention_bias:
        why.append("attention_bias true (llama.cpp's deepseek2 attention has no biases)")
    if cfg.qk_nope_head_dim < 1:
        why.append(f"qk_nope_head_dim {cfg.qk_nope_head_dim} (llama.cpp's deepseek2 needs >= 1)")
    if cfg.n_routed_experts and cfg.n_shared_experts == 0:
        why.append("n_shared_experts 0 (llama.cpp's deepseek2 MoE layers always run shared experts)")
    if cfg.n_routed_experts > 1024:
        why.append(f"n_routed_experts {cfg.n_routed_experts} (llama.cpp allows at most 1024)")
    if cfg.q_lora_rank is not None and cfg.num_hidden_layers in (26, 27):
        why.append(
            f"q_lora_rank {cfg.q_lora_rank} with num_hidden_layers {cfg.num_hidden_layers} (llama.cpp takes "
            "a 26- or 27-layer deepseek2 for DeepSeek-V2-Lite and ignores its q_lora_rank)"
        )
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) == "yarn":
        factor = rs.get("factor") or cfg.max_position_embeddings / rs.get(
            "original_max_position_embeddings", cfg.max_position_embeddings
        )
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        if factor < 1:
            why.append(f"rope_scaling.factor {factor} (YaRN below 1 is not llama.cpp's)")
        if rs.get("attention_factor") is not None:
            why.append(f"rope_scaling.attention_factor {rs['attention_factor']} (llama.cpp's deepseek2 derives it)")
        if not rs.get("truncate", True):
            why.append("rope_scaling.truncate false (llama.cpp rounds YaRN's correction range)")
        for key, default in (("beta_fast", 32), ("beta_slow", 1)):
            if rs.get(key) not in (None, default):
                why.append(
                    f"rope_scaling.{key} {rs[key]} (llama.cpp's deepseek2 reads no YaRN beta from the file and "
                    f"uses {default})"
                )
        if factor > 1 and not (m and m_all and m == m_all):
            why.append(
                f"rope_scaling.mscale {m} with mscale_all_dim {m_all} (llama.cpp's deepseek2 computes YaRN's "
                "scales as if both were equal and set, as in DeepSeek's releases)"
            )
    return why


def deepseek_tensors(path: Path, cfg_dict: dict):
    """(arch, hparams, [(gguf name, array)], dropped) for a native directory, as llama.cpp's converter lays it out."""
    import gguf

    model, state = check_native(path, cfg_dict, read_weights(path))
    cfg = model.config
    why = deepseek_refusals(cfg)
    if why:
        raise GGUFExportError(f"{path} cannot be exported to llama.cpp exactly: {'; '.join(why)}")
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    nope, rope, v, rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    # Groups are written only where they limit the choice: llama.cpp asserts topk_group < n_group, and
    # topk_group == n_group keeps every group, as no grouping does.
    grouped = cfg.n_routed_experts and cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    rs = cfg.rope_scaling
    rs = rs if rs and rs.get("rope_type", rs.get("type")) == "yarn" else None
    hparams: dict[str, Any] = dict(  # numbers, flags and gguf enums, each written by its own add_<key>
        vocab_size=cfg.vocab_size,
        context_length=cfg.max_position_embeddings,
        embedding_length=cfg.hidden_size,
        block_count=L,
        feed_forward_length=cfg.intermediate_size,
        head_count=H,
        head_count_kv=1,
        layer_norm_rms_eps=cfg.rms_norm_eps,
        rope_freq_base=cfg.rope_theta,
        rope_dimension_count=rope,
        leading_dense_block_count=cfg.first_k_dense_replace if cfg.n_routed_experts else L,
        q_lora_rank=cfg.q_lora_rank or 0,  # 0: full-rank queries (llama.cpp then loads attn_q)
        kv_lora_rank=rank,
        key_length=rank + rope,
        value_length=rank,  # MLA run as MQA over the latent
        key_length_mla=nope + rope,
        value_length_mla=v,
        expert_feed_forward_length=cfg.moe_intermediate_size,
        expert_shared_count=cfg.n_shared_experts,
        expert_count=cfg.n_routed_experts or None,
        expert_used_count=cfg.num_experts_per_tok if cfg.n_routed_experts else None,
        expert_weights_scale=cfg.routed_scaling_factor if cfg.n_routed_experts else None,
        expert_weights_norm=True if cfg.n_routed_experts and cfg.norm_topk_prob else None,
        expert_gating_func=gguf.ExpertGatingFuncType.SIGMOID if cfg.n_routed_experts else None,
        expert_group_count=cfg.n_group if grouped else None,
        expert_group_used_count=cfg.topk_group if grouped else None,
    )
    if rs:
        factor = rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"]
        hparams.update(
            rope_scaling_type=gguf.RopeScalingType.YARN,
            rope_scaling_factor=factor,
            rope_scaling_orig_ctx_len=rs.get("original_max_position_embeddings", cfg.max_position_embeddings),
            rope_scaling_yarn_beta_fast=rs.get("beta_fast"),
            rope_scaling_yarn_beta_slow=rs.get("beta_slow"),
            # llama.cpp divides this key by 0.1 on reading ([TAG_DEEPSEEK2_YARN_LOG_MUL_FIX])
            rope_scaling_yarn_log_mul=0.1 * rs["mscale_all_dim"] if rs.get("mscale_all_dim") else None,
        )

    def rope_rows(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """The RoPE rows of each head in llama.cpp's adjacent-pair order (already so when rope_interleave)."""
        if cfg.rope_interleave:
            return w
        w = w.reshape(heads, head_dim, -1).clone()
        pe = w[:, head_dim - rope :].reshape(heads * rope, -1)
        w[:, head_dim - rope :] = rope_pairs_adjacent(pe, heads).view(heads, rope, -1)
        return w.reshape(heads * head_dim, -1)

    out = [
        ("token_embd.weight", state["model.embed_tokens.weight"]),
        ("output_norm.weight", state["model.norm.weight"]),
    ]
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", state["lm_head.weight"]))
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        attn = p + "self_attn."
        out += [
            (b + "attn_norm.weight", state[p + "input_layernorm.weight"]),
            (b + "ffn_norm.weight", state[p + "post_attention_layernorm.weight"]),
            (b + "attn_kv_a_norm.weight", state[attn + "kv_a_layernorm.weight"]),
            (b + "attn_kv_a_mqa.weight", rope_rows(state[attn + "kv_a_proj_with_mqa.weight"], 1, rank + rope)),
            (b + "attn_output.weight", state[attn + "o_proj.weight"]),
        ]
        if cfg.q_lora_rank is None:
            out.append((b + "attn_q.weight", rope_rows(state[attn + "q_proj.weight"], H, nope + rope)))
        else:
            out += [
                (b + "attn_q_a.weight", state[attn + "q_a_proj.weight"]),
                (b + "attn_q_a_norm.weight", state[attn + "q_a_layernorm.weight"]),
                (b + "attn_q_b.weight", rope_rows(state[attn + "q_b_proj.weight"], H, nope + rope)),
            ]
        k_b, v_b = state[attn + "kv_b_proj.weight"].view(H, nope + v, rank).split([nope, v], dim=1)
        out += [(b + "attn_k_b.weight", k_b.transpose(1, 2)), (b + "attn_v_b.weight", v_b)]
        if cfg.is_moe_layer(i):
            mlp = p + "mlp."
            gate, up = state[mlp + "experts.gate_up_proj"].chunk(2, dim=1)
            out += [
                (b + "ffn_gate_inp.weight", state[mlp + "gate.weight"]),
                (b + "ffn_gate_exps.weight", gate),
                (b + "ffn_up_exps.weight", up),
                (b + "ffn_down_exps.weight", state[mlp + "experts.down_proj"]),
            ]
            if mlp + "gate.e_score_correction_bias" in state:  # absent: zero, as llama.cpp takes it
                out.append((b + "exp_probs_b.bias", state[mlp + "gate.e_score_correction_bias"]))
            for part in ("gate", "up", "down"):
                out.append((b + f"ffn_{part}_shexp.weight", state[mlp + f"shared_experts.{part}_proj.weight"]))
        else:
            for part in ("gate", "up", "down"):
                out.append((b + f"ffn_{part}.weight", state[p + f"mlp.{part}_proj.weight"]))
    dropped = []
    if cfg.num_nextn_predict_layers:
        dropped.append(
            f"{cfg.num_nextn_predict_layers} multi-token-prediction layer(s) (model.layers.{L}.*): "
            "llama.cpp's deepseek2 converter drops them too; next-token logits do not use them"
        )
    return "deepseek2", hparams, [(n, as_numpy(t)) for n, t in out], dropped


# ----------------------------------------------------------------------------- Llama family -> llama / qwen2


def llama_refusals(cfg) -> list[str]:
    """The settings of a Llama/Mistral/Qwen2 `transformers` config that llama.cpp's llama/qwen2 graphs would compute
    differently (or that this exporter does not write); empty when the export is exact."""
    why = []
    mt = cfg.model_type
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        why.append(f"rope type {kind!r} (only plain RoPE is exported for {mt})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        why.append(f"hidden_act {cfg.hidden_act!r} (llama.cpp's {LLAMA_FAMILY[mt]} uses silu)")
    if getattr(cfg, "mlp_bias", False):
        why.append("mlp_bias true (not exported)")
    if getattr(cfg, "attention_bias", False) and mt != "qwen2":
        why.append("attention_bias true (not exported for llama/mistral)")
    if mt == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        why.append(f"sliding_window {cfg.sliding_window} (llama.cpp's llama architecture attends to every position)")
    if mt == "qwen2" and getattr(cfg, "use_sliding_window", False):
        why.append("use_sliding_window true (llama.cpp's qwen2 attends to every position)")
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        why.append("layer_types other than full_attention")
    if getattr(cfg, "attention_dropout", 0.0):
        why.append(f"attention_dropout {cfg.attention_dropout}")
    return why


def llama_tensors(path: Path):
    """(arch, hparams, [(gguf name, array)], dropped) for a Llama/Mistral/Qwen2 directory: q and k rows reordered
    for llama.cpp's RoPE where it uses adjacent pairs (llama), as its converter does; qwen2 keeps transformers'
    order (llama.cpp runs it with NEOX RoPE)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    arch = LLAMA_FAMILY[cfg.model_type]
    why = llama_refusals(cfg)
    if why:
        raise GGUFExportError(f"{path} cannot be exported to llama.cpp exactly: {'; '.join(why)}")
    state = read_weights(path)
    H, KV = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    hparams = dict(
        vocab_size=cfg.vocab_size,
        context_length=cfg.max_position_embeddings,
        embedding_length=cfg.hidden_size,
        block_count=cfg.num_hidden_layers,
        feed_forward_length=cfg.intermediate_size,
        head_count=H,
        head_count_kv=KV,
        layer_norm_rms_eps=cfg.rms_norm_eps,
        rope_freq_base=theta,
        rope_dimension_count=head_dim,
        key_length=head_dim if head_dim * H != cfg.hidden_size else None,
        value_length=head_dim if head_dim * H != cfg.hidden_size else None,
    )
    prefix = "model." if "model.embed_tokens.weight" in state else ""
    tied = bool(getattr(cfg, "tie_word_embeddings", False))  # a stored lm_head is then ignored, as transformers does
    if not tied and "lm_head.weight" not in state:
        raise GGUFExportError(
            f"{path}: lm_head.weight is not stored and tie_word_embeddings is false; the weights do "
            "not match config.json"
        )
    expected = {prefix + "embed_tokens.weight", prefix + "norm.weight", "lm_head.weight"}
    out = [
        ("token_embd.weight", state[prefix + "embed_tokens.weight"]),
        ("output_norm.weight", state[prefix + "norm.weight"]),
    ]
    if not tied:
        out.append(("output.weight", state["lm_head.weight"]))
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    if arch == "qwen2":
        names.update({f"self_attn.{x}_proj.bias": f"attn_{x}.bias" for x in "qkv"})
    for i in range(cfg.num_hidden_layers):
        for hf, ours in names.items():
            key = f"{prefix}layers.{i}.{hf}"
            if key not in state:
                raise GGUFExportError(f"{path}: {key} is not stored; the weights do not match config.json")
            t = state[key]
            if arch == "llama" and hf.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                t = rope_pairs_adjacent(t, H if ".q_proj" in hf else KV)
            out.append((f"blk.{i}.{ours}", t))
            expected.add(key)
    extra = sorted(k for k in state if k not in expected and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise GGUFExportError(
            f"{path} stores tensors the {arch} export has no place for ({', '.join(extra[:3])}"
            f"{', ...' if len(extra) > 3 else ''}); llama.cpp would not run them"
        )
    return arch, hparams, [(n, as_numpy(t)) for n, t in out], []


# ----------------------------------------------------------------------------- tokenizer


# transformers' pre-tokenizer regexes that llama.cpp's `tokenizer.ggml.pre` types reproduce (src/llama-vocab.cpp)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def pre_tokenizer_type(pre: dict | None, ignore_merges: bool) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE pre-tokenizer (tokenizer.json), or None when none splits
    text the same way. ByteLevel with its GPT-2 regex is llama.cpp's `gpt-2`; Digits(individual) before it is
    `starcoder` (the same two regexes in llama.cpp); a Split by Llama-3's or Qwen2's regex before a regex-free
    ByteLevel is `llama-bpe` or `qwen2` (llama.cpp ignores merges for llama-bpe only, as those tokenizers do)."""

    def byte_level(p, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex", True) == regex

    if pre is None:
        return None
    parts = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if len(parts) == 1 and byte_level(parts[0], True):
        return None if ignore_merges else "gpt-2"
    if len(parts) != 2:
        return None
    first, second = parts
    if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, True):
        return None if ignore_merges else "starcoder"
    if (
        first.get("type") == "Split"
        and first.get("behavior") == "Isolated"
        and not first.get("invert")
        and byte_level(second, False)
    ):
        regex = first.get("pattern", {}).get("Regex")
        if regex == LLAMA3_SPLIT and ignore_merges:
            return "llama-bpe"
        if regex == QWEN2_SPLIT and not ignore_merges:
            return "qwen2"
    return None


@dataclass
class Vocab:
    """A byte-level BPE tokenizer in llama.cpp's terms (the `tokenizer.*` keys of a GGUF file)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    templates: dict[str, str]

    def write(self, writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        for name, i in self.special_ids.items():
            getattr(writer, f"add_{name}_token_id")(i)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.templates:
            writer.add_chat_template([{"name": k, "template": v} for k, v in self.templates.items()])


def tokenizer_refusals(j: dict, skip_nfc: bool = False) -> list[str]:
    """What in a tokenizer.json llama.cpp's byte-level BPE ("gpt2") tokenizer would split or decode differently."""
    model, why = j.get("model") or {}, []
    if model.get("type") != "BPE":
        return [f"model type {model.get('type')!r} (llama.cpp's byte-level BPE needs BPE)"]
    for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) not in (None, False, ""):
            why.append(f"BPE {key} {model.get(key)!r} (llama.cpp's byte-level BPE has none)")
    norm = j.get("normalizer")
    if norm is not None and not (skip_nfc and norm.get("type") == "NFC"):
        nfc = norm.get("type") == "NFC"
        hint = "; --skip-nfc writes it anyway (text already in NFC tokenises the same)" if nfc else ""
        why.append(f"normalizer {norm.get('type')!r} (llama.cpp does not normalise text{hint})")
    if pre_tokenizer_type(j.get("pre_tokenizer"), bool(model.get("ignore_merges"))) is None:
        why.append(
            f"pre-tokenizer {json.dumps(j.get('pre_tokenizer'))[:200]} with ignore_merges "
            f"{bool(model.get('ignore_merges'))} (no llama.cpp tokenizer.ggml.pre type splits text the same "
            "way; "
            "exported: ByteLevel, Digits+ByteLevel, Llama-3's and Qwen2's Split+ByteLevel)"
        )
    if (j.get("decoder") or {}).get("type") != "ByteLevel":
        why.append(f"decoder {json.dumps(j.get('decoder'))[:100]} (llama.cpp decodes byte-level BPE with ByteLevel)")
    for t in j.get("added_tokens") or []:
        flags = [f for f in ("lstrip", "rstrip", "single_word") if t.get(f)]
        if flags:
            why.append(f"added token {t['content']!r} with {'/'.join(flags)} (llama.cpp matches added tokens exactly)")
    return why


def read_vocab(path: Path, n_vocab: int, skip_nfc: bool = False) -> Vocab:
    """The directory's tokenizer as llama.cpp's vocabulary of `n_vocab` entries (ids the tokenizer does not use are
    `[PAD{id}]`, type UNUSED, as llama.cpp's converter writes them); refused where llama.cpp would tokenise
    differently."""
    from r1lab.model.load import load_tokenizer

    tok = load_tokenizer(path)
    if not getattr(tok, "is_fast", False):
        raise GGUFExportError(
            f"{path}: the tokenizer has no tokenizer.json (a slow {type(tok).__name__}); "
            "llama.cpp's byte-level BPE is written from tokenizer.json"
        )
    j = json.loads(tok.backend_tokenizer.to_str())
    why = tokenizer_refusals(j, skip_nfc)
    if why:
        raise GGUFExportError(f"{path}: the tokenizer cannot be exported to llama.cpp exactly: {'; '.join(why)}")
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    ids = {**j["model"]["vocab"], **{t.content: i for i, t in added.items()}}
    if max(ids.values()) >= n_vocab:
        raise GGUFExportError(
            f"{path}: the tokenizer has id {max(ids.values())} but the model's vocab_size is "
            f"{n_vocab}; they belong to different models"
        )
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [5] * n_vocab  # 5: UNUSED
    for text, i in j["model"]["vocab"].items():
        tokens[i], types[i] = text, 1  # 1: NORMAL
    for i, t in added.items():
        tokens[i], types[i] = t.content, 3 if t.special else 4  # 3: CONTROL, 4: USER_DEFINED
    if len(set(tokens)) != len(tokens):
        dup = next(t for t, n in Counter(tokens).items() if n > 1)
        raise GGUFExportError(f"{path}: token {dup!r} has two ids; llama.cpp needs one text per id")
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    special_ids = {
        name: getattr(tok, f"{name}_token_id")
        for name in ("bos", "eos", "pad", "unk")
        if getattr(tok, f"{name}_token_id", None) is not None
    }
    add_bos, add_eos = special_added(tok, path)
    templates = (
        tok.chat_template
        if isinstance(tok.chat_template, dict)
        else ({"default": tok.chat_template} if tok.chat_template else {})
    )
    for name in templates:
        if not name.replace("_", "").isalnum():
            raise GGUFExportError(
                f"{path}: chat template name {name!r} has characters a GGUF key cannot hold; "
                "rename it to letters, digits and _"
            )
    pre = pre_tokenizer_type(j.get("pre_tokenizer"), bool(j["model"].get("ignore_merges")))
    assert pre is not None  # tokenizer_refusals refused a pre-tokenizer with no llama.cpp type above
    return Vocab(tokens, types, merges, pre, special_ids, add_bos, add_eos, dict(templates))


def special_added(tok, path: Path) -> tuple[bool, bool]:
    """Whether encoding adds BOS first / EOS last (llama.cpp's add_bos_token / add_eos_token); any other
    post-processing is refused."""
    plain = tok("a b", add_special_tokens=False).input_ids
    full = tok("a b").input_ids
    bos = full[:1] == [tok.bos_token_id] and full[1 : len(plain) + 1] == plain
    body = full[1:] if bos else full
    eos = body == plain + [tok.eos_token_id]
    if (body if not eos else body[:-1]) != plain:
        raise GGUFExportError(
            f"{path}: the tokenizer's post-processor turns {plain} into {full}; llama.cpp can only "
            "add BOS first and EOS last"
        )
    return bos, eos
