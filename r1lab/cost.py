"""Parameters, FLOPs, KV cache, memory and training cost of a decoder LM, from its config alone.

Pure functions over a config: a native r1lab / DeepSeek-V3 `config.json`, any `transformers` causal-LM config
(llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, mixtral, qwen2_moe, qwen3_moe, deepseek_v3), or a
preset name (`deepseek-v3-671b`, `deepseek-r1`, the six R1 distills, `smollm2-135m`). Nothing is instantiated.

What the counts include (see `parameter_breakdown`):
- `params_total`: every weight of the main model: embedding, all layers (all experts), final norm, lm_head (once
  when tied), DeepSeek's router bias (`e_score_correction_bias`, a buffer in transformers but in the checkpoint).
  Multi-token-prediction modules are *not* included (DeepSeek's 671B excludes them); they are `params_mtp`.
- `params_active`: what one token touches: like the total but only `num_experts_per_tok` routed experts per MoE
  layer. Embedding and lm_head are counted, as Mixtral's "12.9B active" and Qwen-MoE's "A3B" do; DeepSeek-V3's
  "37B activated" is 37.5B this way (36.6B without the embedding).
- `params_active_matmul`: the weights that cost 2 FLOPs per token: `params_active` less the embedding lookup,
  norms and biases, plus the lm_head matmul even when it shares the embedding's weights.

FLOPs per token (forward) = 2 * params_active_matmul + attention, with attention = 2 * layers * heads *
(qk_head_dim + v_head_dim) * keys: the QK^T scores and the weighted sum of V. Over a training or prefill sequence
of `seq_len` tokens under a causal mask a token sees seq_len / 2 keys on average (the halving is applied, as
FlashAttention skips masked blocks); `causal=False` gives one decode step at context `seq_len`. Sliding-window
layers (mistral, gemma2/3) are counted as full attention. Training = 3 x forward (backward ~ 2 x forward), MTP
modules included: `training_flops_per_token`.

MFU = training FLOPs / (GPU-seconds * peak), with the GPU's dense bf16 peak by default (`peak_dtype`) and, where it
has one, the fp8 peak beside it (DeepSeek-V3 ran its GEMMs in FP8). Peaks live in `r1lab.hardware`.

For trainers: `training_flops_per_token(config, seq_len)` once (config: ModelConfig, transformers config, dict or
path), then each logging step `achieved_flops_report(tokens, seconds, that, peak)` with
`peak = r1lab.hardware.measure_matmul_peak(dtype)` (cached after its first call); both are cheap.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 1024**3

# ----------------------------------------------------------------------------- presets (real config.json fields)

_DEEPSEEK_V3 = dict(  # deepseek-ai/DeepSeek-V3 and DeepSeek-R1 config.json (same architecture)
    model_type="deepseek_v3",
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    first_k_dense_replace=3,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    num_nextn_predict_layers=1,
    tie_word_embeddings=False,
    attention_bias=False,
    max_position_embeddings=163840,
)


def _qwen2(hidden, inter, layers, heads, kv, vocab, tied=False):
    return dict(
        model_type="qwen2",
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )


def _llama(hidden, inter, layers, heads, kv, vocab, tied=False):
    return dict(
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
    )


PRESETS: dict[str, dict] = {
    "deepseek-v3-671b": _DEEPSEEK_V3,
    "deepseek-r1": _DEEPSEEK_V3,
    # The distills keep their bases' architecture: Qwen2.5-Math-1.5B / -7B, Qwen2.5-14B / -32B, Llama-3.1-8B,
    # Llama-3.3-70B-Instruct (deepseek-ai/DeepSeek-R1-Distill-*/config.json).
    "deepseek-r1-distill-qwen-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936),
    "deepseek-r1-distill-qwen-7b": _qwen2(3584, 18944, 28, 28, 4, 152064),
    "deepseek-r1-distill-qwen-14b": _qwen2(5120, 13824, 48, 40, 8, 152064),
    "deepseek-r1-distill-qwen-32b": _qwen2(5120, 27648, 64, 40, 8, 152064),
    "deepseek-r1-distill-llama-8b": _llama(4096, 14336, 32, 32, 8, 128256),
    "deepseek-r1-distill-llama-70b": _llama(8192, 28672, 80, 64, 8, 128256),
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 49152, tied=True),
}

SUPPORTED_TYPES = (
    "deepseek_v3",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)


# ----------------------------------------------------------------------------- reading a config


def load_config(source: Any) -> tuple[str, dict]:
    """(name, config dict) from a preset name, a model directory, a config.json path, a dict, an r1lab
    `ModelConfig` or a `transformers.PretrainedConfig`."""
    if isinstance(source, dict):
        return source.get("_name_or_path") or source.get("model_type", "config"), source
    if hasattr(source, "to_hf_dict"):  # r1lab ModelConfig
        return "r1lab", source.to_hf_dict()
    if hasattr(source, "to_dict"):  # transformers PretrainedConfig
        return getattr(source, "name_or_path", "") or source.model_type, source.to_dict()
    text = str(source)
    if text.lower() in PRESETS:
        return text.lower(), dict(PRESETS[text.lower()])
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no model config at {text!r}: give a model directory, a config.json, or a preset ({', '.join(PRESETS)})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (not UTF-8); give a model directory or its config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or re-save the config") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, not a model config object; give a model "
            "directory or its config.json"
        )
    return text, data


@dataclass(frozen=True)
class Shape:
    """The sizes that decide parameters, FLOPs and KV cache, read once from any supported config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense FFN width
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (qwen3, gemma3)
    norms_per_layer: int = 2
    # Multi-head latent attention (DeepSeek-V3); kv_lora_rank == 0 means ordinary (GQA/MHA) attention
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Mixture of experts
    n_moe_layers: int = 0
    n_routed_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0  # total width of the always-on shared expert(s)
    shared_expert_gate: bool = False  # qwen2_moe's sigmoid gate on the shared expert
    router_bias: bool = False  # DeepSeek's e_score_correction_bias
    num_mtp_layers: int = 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def n_dense_layers(self) -> int:
        return self.num_layers - self.n_moe_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def v_dim(self) -> int:
        return self.v_head_dim if self.is_mla else self.head_dim


_NEEDED_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
SIZE_KEYS = _NEEDED_SIZES + (
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "first_k_dense_replace",
    "decoder_sparse_step",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "num_nextn_predict_layers",
)


def _need(d: dict, key: str, model_type: str):
    v = d.get(key)
    if v is None:
        raise ValueError(f"{model_type} config has no {key!r}; is this a causal-LM config.json?")
    return v


def model_shape(config: Any) -> Shape:
    """Read the sizes from a config (anything `load_config` takes)."""
    if isinstance(config, Shape):
        return config
    _, d = load_config(config)
    if "text_config" in d and "hidden_size" not in d:  # multimodal wrappers: the language model part
        d = d["text_config"]
    for key in SIZE_KEYS:  # a hand-edited size ("64", -2, 0 heads) is named here, not met as a TypeError below
        v, least = d.get(key), 1 if key in _NEEDED_SIZES else 0
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise ValueError(f"{key} must be a whole number >= {least} (got {v!r}); correct the config")
    mt = d.get("model_type") or "llama"
    if mt == "r1lab":
        mt = "deepseek_v3"
    if mt not in SUPPORTED_TYPES:
        raise ValueError(f"model_type {mt!r} is not supported by r1lab cost; supported: {', '.join(SUPPORTED_TYPES)}")
    h, L = _need(d, "hidden_size", mt), _need(d, "num_hidden_layers", mt)
    nh = _need(d, "num_attention_heads", mt)
    nkv = d.get("num_key_value_heads") or nh
    common = dict(
        model_type=mt,
        vocab_size=_need(d, "vocab_size", mt),
        hidden_size=h,
        num_layers=L,
        num_heads=nh,
        num_kv_heads=nkv,
        head_dim=d.get("head_dim") or h // nh,
        intermediate_size=d.get("intermediate_size") or 0,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", mt.startswith("gemma"))),
    )
    attn_bias = bool(d.get("attention_bias") or False)

    if mt == "deepseek_v3":
        experts = d.get("n_routed_experts") or 0
        first_dense = d.get("first_k_dense_replace", 0) if experts else L
        return Shape(
            **common,
            q_lora_rank=d.get("q_lora_rank"),
            kv_lora_rank=_need(d, "kv_lora_rank", mt),
            qk_nope_head_dim=_need(d, "qk_nope_head_dim", mt),
            qk_rope_head_dim=_need(d, "qk_rope_head_dim", mt),
            v_head_dim=_need(d, "v_head_dim", mt),
            qkv_bias=attn_bias,
            o_bias=attn_bias,
            n_moe_layers=max(0, L - first_dense),
            n_routed_experts=experts,
            experts_per_tok=d.get("num_experts_per_tok") or 0,
            moe_intermediate_size=d.get("moe_intermediate_size") or 0,
            shared_intermediate_size=(d.get("moe_intermediate_size") or 0) * (d.get("n_shared_experts") or 0),
            router_bias=bool(experts),
            num_mtp_layers=d.get("num_nextn_predict_layers") or 0,
        )
    if mt in ("llama", "mistral", "gemma", "gemma2", "gemma3_text", "qwen3"):
        return Shape(
            **common,
            qkv_bias=attn_bias,
            o_bias=attn_bias,
            mlp_bias=bool(d.get("mlp_bias") or False),
            qk_norm=mt in ("qwen3", "gemma3_text"),
            norms_per_layer=4 if mt in ("gemma2", "gemma3_text") else 2,
        )
    if mt == "qwen2":  # transformers always builds q, k, v with a bias and o without
        return Shape(**common, qkv_bias=True)
    if mt == "mixtral":
        return Shape(
            **{**common, "intermediate_size": 0},
            n_moe_layers=L,
            n_routed_experts=d.get("num_local_experts") or _need(d, "num_experts", mt),
            experts_per_tok=_need(d, "num_experts_per_tok", mt),
            moe_intermediate_size=_need(d, "intermediate_size", mt),
        )
    # qwen2_moe / qwen3_moe: a layer is sparse unless listed in mlp_only_layers or off the decoder_sparse_step
    # published Qwen configs say num_experts; transformers >= 5 writes qwen3_moe's as num_local_experts
    experts, step = d.get("num_experts") or d.get("num_local_experts") or 0, d.get("decoder_sparse_step") or 1
    dense_only = set(d.get("mlp_only_layers") or [])
    n_moe = sum(1 for i in range(L) if i not in dense_only and experts > 0 and (i + 1) % step == 0)
    shared = (d.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0
    bias = bool(d.get("qkv_bias", True)) if mt == "qwen2_moe" else attn_bias
    return Shape(
        **common,
        qkv_bias=bias,
        o_bias=bias and mt == "qwen3_moe",
        qk_norm=mt == "qwen3_moe",
        n_moe_layers=n_moe,
        n_routed_experts=experts,
        experts_per_tok=d.get("num_experts_per_tok") or 0,
        moe_intermediate_size=d.get("moe_intermediate_size") or 0,
        shared_intermediate_size=shared,
        shared_expert_gate=shared > 0,
    )


# ----------------------------------------------------------------------------- parameters


def _attention_params(s: Shape) -> tuple[int, int]:
    """(all parameters, matmul weights) of one attention block, its internal norms and biases included."""
    h, nh = s.hidden_size, s.num_heads
    if s.is_mla:
        qk = s.qk_nope_head_dim + s.qk_rope_head_dim
        if s.q_lora_rank:
            q_w = h * s.q_lora_rank + s.q_lora_rank * nh * qk
            q_extra = s.q_lora_rank + (s.q_lora_rank if s.qkv_bias else 0)  # q_a_layernorm, q_a_proj bias
        else:
            q_w, q_extra = h * nh * qk, 0
        kv_a = s.kv_lora_rank + s.qk_rope_head_dim
        kv_w = h * kv_a + s.kv_lora_rank * nh * (s.qk_nope_head_dim + s.v_head_dim)
        kv_extra = s.kv_lora_rank + (kv_a if s.qkv_bias else 0)  # kv_a_layernorm, kv_a_proj bias
        o_w = nh * s.v_head_dim * h
        weights = q_w + kv_w + o_w
        return weights + q_extra + kv_extra + (h if s.o_bias else 0), weights
    q, kv = nh * s.head_dim, s.num_kv_heads * s.head_dim
    weights = h * q + 2 * h * kv + q * h
    extra = (q + 2 * kv if s.qkv_bias else 0) + (h if s.o_bias else 0) + (2 * s.head_dim if s.qk_norm else 0)
    return weights + extra, weights


def _mlp_params(h: int, ffn: int, bias: bool = False) -> int:
    """A gated (SwiGLU/GeGLU) MLP: gate, up and down projections."""
    return 3 * h * ffn + ((2 * ffn + h) if bias else 0)


def parameter_breakdown(config: Any) -> dict[str, int]:
    """Parameter counts by component; `total` is the main model (no MTP), `mtp` the MTP modules' own weights."""
    s = model_shape(config)
    h, V, E = s.hidden_size, s.vocab_size, s.n_routed_experts
    attn, _ = _attention_params(s)
    moe_shared = (
        _mlp_params(h, s.shared_intermediate_size) + (h if s.shared_expert_gate else 0)
        if s.shared_intermediate_size
        else 0
    )
    b = {
        "embedding": V * h,
        "lm_head": 0 if s.tie_word_embeddings else V * h,
        "attention": s.num_layers * attn,
        "dense_mlp": s.n_dense_layers * _mlp_params(h, s.intermediate_size, s.mlp_bias),
        "moe_routed_experts": s.n_moe_layers * E * _mlp_params(h, s.moe_intermediate_size),
        "moe_shared_experts": s.n_moe_layers * moe_shared,
        "moe_router": s.n_moe_layers * (E * h + (E if s.router_bias else 0)),
        "norms": s.num_layers * s.norms_per_layer * h + h,
    }
    b["total"] = sum(b.values())
    b["mtp"] = s.num_mtp_layers * _mtp_layer_params(s)
    return b


def _mtp_layer_params(s: Shape) -> int:
    """One DeepSeek MTP module's own weights: a (MoE) block, eh_proj, enorm, hnorm and the shared head's norm;
    the embedding and output head are the main model's (the released checkpoint stores copies of them)."""
    h = s.hidden_size
    block = _attention_params(s)[0] + s.norms_per_layer * h
    if s.n_routed_experts:
        block += (
            s.n_routed_experts * _mlp_params(h, s.moe_intermediate_size)
            + _mlp_params(h, s.shared_intermediate_size)
            + s.n_routed_experts * h
            + (s.n_routed_experts if s.router_bias else 0)
        )
    else:
        block += _mlp_params(h, s.intermediate_size)
    return block + 2 * h * h + 3 * h


def parameter_counts(config: Any) -> dict[str, int]:
    """params_total, params_active, params_active_matmul, params_mtp and params_checkpoint (what the released
    files hold: total + MTP + the MTP modules' stored copies of embedding and head, DeepSeek-V3's "685B")."""
    s = model_shape(config)
    b = parameter_breakdown(s)
    h, V = s.hidden_size, s.vocab_size
    routed_active = s.n_moe_layers * s.experts_per_tok * _mlp_params(h, s.moe_intermediate_size)
    active = b["total"] - b["moe_routed_experts"] + routed_active
    _, attn_w = _attention_params(s)
    matmul = (
        s.num_layers * attn_w
        + s.n_dense_layers * 3 * h * s.intermediate_size
        + routed_active
        + s.n_moe_layers
        * (3 * h * s.shared_intermediate_size + s.n_routed_experts * h + (h if s.shared_expert_gate else 0))
        + V * h
    )
    copies = s.num_mtp_layers * (2 * V * h)
    return {
        "params_total": b["total"],
        "params_active": active,
        "params_active_matmul": matmul,
        "params_mtp": b["mtp"],
        "params_checkpoint": b["total"] + b["mtp"] + copies,
    }


# ----------------------------------------------------------------------------- FLOPs


def attention_flops_per_token(config: Any, seq_len: int, causal: bool = True) -> float:
    """Score and value FLOPs of one token: 2 * layers * heads * (qk_head_dim + v_head_dim) * keys seen, with
    keys seen = seq_len / 2 under a causal mask (training, prefill) or seq_len (one decode step)."""
    s = model_shape(config)
    _check_positive("seq_len", seq_len)
    keys = seq_len / 2 if causal else seq_len
    return 2.0 * s.num_layers * s.num_heads * (s.qk_head_dim + s.v_dim) * keys


def flops_per_token(config: Any, seq_len: int = 4096, causal: bool = True) -> float:
    """Forward FLOPs per token of the main model: 2 * params_active_matmul + attention (MTP excluded)."""
    s = model_shape(config)
    return 2.0 * parameter_counts(s)["params_active_matmul"] + attention_flops_per_token(s, seq_len, causal)


def mtp_flops_per_token(config: Any, seq_len: int = 4096) -> float:
    """Forward FLOPs per token of the MTP modules (training only): a block, eh_proj and the shared head each."""
    s = model_shape(config)
    if not s.num_mtp_layers:
        return 0.0
    h = s.hidden_size
    ffn = (
        (
            s.experts_per_tok * 3 * h * s.moe_intermediate_size
            + 3 * h * s.shared_intermediate_size
            + s.n_routed_experts * h
        )
        if s.n_routed_experts
        else 3 * h * s.intermediate_size
    )
    matmul = _attention_params(s)[1] + ffn + 2 * h * h + s.vocab_size * h
    attn = attention_flops_per_token(s, seq_len) / s.num_layers
    return s.num_mtp_layers * (2.0 * matmul + attn)


def training_flops_per_token(config: Any, seq_len: int, include_mtp: bool = True) -> float:
    """Training FLOPs per token: 3 x forward (backward ~ 2 x forward), MTP modules included when present."""
    s = model_shape(config)  # parse once: trainers may call this every logging step
    fwd = flops_per_token(s, seq_len) + (mtp_flops_per_token(s, seq_len) if include_mtp else 0.0)
    return 3.0 * fwd


def achieved_flops_report(tokens: float, seconds: float, flops_per_token: float, peak: float | None) -> dict:
    """What a training step achieved: tokens/s, FLOPs, FLOP/s and their fraction of `peak` (None: no mfu)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0 (got {seconds}); time at least one step before reporting")
    flops = float(tokens) * flops_per_token
    rate = flops / seconds
    return {"tokens_per_s": tokens / seconds, "flops": flops, "flops_per_s": rate, "mfu": rate / peak if peak else None}


# ----------------------------------------------------------------------------- KV cache and memory


def kv_cache_bytes_per_token(config: Any, bytes_per_value: float = 2) -> dict[str, float]:
    """Cache bytes per token over all layers: MLA keeps the latent plus the shared RoPE key (kv_lora_rank +
    qk_rope_head_dim); GQA keeps K and V for each KV head. `mha` is what full per-head K and V would take
    (for MLA: heads * (qk_head_dim + v_head_dim), which transformers' DeepseekV3 actually caches)."""
    s = model_shape(config)
    if s.is_mla:
        per_layer = s.kv_lora_rank + s.qk_rope_head_dim
    else:
        per_layer = 2 * s.num_kv_heads * s.head_dim
    mha = s.num_heads * (s.qk_head_dim + s.v_dim)
    return {
        "kv_cache_bytes_per_token": s.num_layers * per_layer * bytes_per_value,
        "kv_cache_bytes_per_token_mha": s.num_layers * mha * bytes_per_value,
    }


def activation_bytes_per_token(config: Any) -> float:
    """Rough bf16 activations saved for backward per token (no recomputation, FlashAttention: no S^2 scores):
    per layer the residual and norm outputs (4h), q, k, v and the attention output, MLA's latents, and the
    gate, up and gated product of the FFN for every expert the token visits."""
    s = model_shape(config)
    h = s.hidden_size
    if s.is_mla:  # keys and values are decompressed per head for training; plus the two latents
        attn = (
            s.num_heads * (2 * s.qk_head_dim + 2 * s.v_dim) + (s.q_lora_rank or 0) + s.kv_lora_rank + s.qk_rope_head_dim
        )
    else:
        attn = 2 * s.num_heads * s.head_dim + 2 * s.num_kv_heads * s.head_dim
    moe_ffn = s.experts_per_tok * s.moe_intermediate_size + s.shared_intermediate_size
    per_layer_dense = 4 * h + attn + 3 * s.intermediate_size
    per_layer_moe = 4 * h + attn + 3 * moe_ffn
    return 2.0 * (s.n_dense_layers * per_layer_dense + s.n_moe_layers * per_layer_moe)


def training_memory(config: Any, seq_len: int = 4096, micro_batch: int = 1) -> dict[str, float]:
    """Bytes to train with mixed-precision Adam, unsharded: bf16 weights (2/param) and gradients (2/param),
    fp32 master weights plus Adam moments (12/param), and the activation estimate for one micro-batch.
    MTP weights are trained too, so they are included."""
    n = parameter_counts(config)
    p = n["params_total"] + n["params_mtp"]
    out = {
        "weights": 2.0 * p,
        "gradients": 2.0 * p,
        "optimizer": 12.0 * p,
        "activations": activation_bytes_per_token(config) * seq_len * micro_batch,
    }
    out["total"] = sum(out.values())
    return out


# Bits per weight as stored: int4 carries an fp16 scale and zero per group of 128 (GPTQ/AWQ-style).
QUANT_BITS = {"bf16": 16.0, "int8": 8.0, "int4": 4.25}
RUNTIME_OVERHEAD_BYTES = GiB // 2  # CUDA context, allocator slack, workspace and prefill activations at batch 1


def inference_memory(config: Any, seq_len: int = 4096, batch: int = 1, kv_bytes: float = 2) -> dict[str, dict]:
    """Bytes to serve the main model (no MTP) per weight format: weights, a bf16 KV cache for `batch`
    sequences of `seq_len` tokens, a fixed runtime overhead, and their total."""
    n = parameter_counts(config)["params_total"]
    kv = kv_cache_bytes_per_token(config, kv_bytes)["kv_cache_bytes_per_token"] * seq_len * batch
    out = {}
    for q, bits in QUANT_BITS.items():
        w = n * bits / 8
        out[q] = {
            "weights": w,
            "kv_cache": kv,
            "overhead": RUNTIME_OVERHEAD_BYTES,
            "total": w + kv + RUNTIME_OVERHEAD_BYTES,
        }
    return out


# ----------------------------------------------------------------------------- training cost


def training_cost(
    train_flops_per_token: float,
    tokens: float,
    peaks: dict[str, float],
    gpu_hours: float | None = None,
    mfu: float | None = None,
    price: float | None = None,
    peak_dtype: str = "bf16",
) -> dict:
    """Given tokens and GPU-hours: the implied MFU against each peak in `peaks` ({dtype: FLOP/s});
    given an MFU (against `peaks[peak_dtype]`): the GPU-hours needed. With `price` ($/GPU-hour): cost_usd."""
    if (gpu_hours is None) == (mfu is None):
        raise ValueError(
            "give either --gpu-hours (to get the implied MFU) or --mfu (to get the GPU-hours needed), not both"
        )
    _check_positive("--tokens", tokens)
    if peak_dtype not in peaks:
        raise ValueError(f"no {peak_dtype} peak for this GPU; choose one of {', '.join(peaks)}")
    total = train_flops_per_token * tokens
    if mfu is not None:
        if not 0 < mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1] (got {mfu:g}); 0.4 means 40% of the peak")
        gpu_hours = total / (mfu * peaks[peak_dtype]) / 3600
    else:
        gpu_hours = _check_positive("--gpu-hours", gpu_hours)
    if price is not None and price < 0:
        raise ValueError(f"--price must be >= 0 $ per GPU-hour (got {price:g})")
    seconds = gpu_hours * 3600
    return {
        "tokens": tokens,
        "training_flops": total,
        "gpu_hours": gpu_hours,
        "peak_dtype": peak_dtype,
        "achieved_flops_per_gpu": total / seconds,
        "mfu": total / seconds / peaks[peak_dtype],
        "mfu_by_peak": {dt: total / seconds / p for dt, p in peaks.items()},
        "price_per_gpu_hour": price,
        "cost_usd": None if price is None else gpu_hours * price,
    }


# ----------------------------------------------------------------------------- helpers


def _check_positive(name: str, value: object) -> float:
    """`value`, once it is a finite number > 0 (else a ValueError that names the flag)."""
    if value is None or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0 (got {value})")
    return value


def summary(config: Any, seq_len: int = 4096, batch: int = 1, kv_bytes: float = 2) -> dict:
    """Everything `r1lab cost` prints for a model: counts, breakdown, FLOPs, KV cache and memory."""
    _check_positive("seq_len", seq_len)
    _check_positive("batch", batch)
    name, d = load_config(config)
    try:
        s = model_shape(d)
    except ValueError as e:  # name the config the user gave
        raise ValueError(f"{name}: {e}") from None
    out = {
        "model": name,
        "model_type": s.model_type,
        "seq_len": seq_len,
        **parameter_counts(s),
        "params_breakdown": parameter_breakdown(s),
        "flops_per_token": flops_per_token(s, seq_len),
        "flops_per_token_attention": attention_flops_per_token(s, seq_len),
        "training_flops_per_token": training_flops_per_token(s, seq_len),
        **kv_cache_bytes_per_token(s, kv_bytes),
        "attention": "mla" if s.is_mla else ("mha" if s.num_kv_heads == s.num_heads else "gqa"),
        "training_memory_bytes": training_memory(s, seq_len, batch),
        "inference_memory_bytes": inference_memory(s, seq_len, batch, kv_bytes),
    }
    return out
