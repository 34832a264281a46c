"""The native model's config: the fields and names of `transformers.DeepseekV3Config`, plus r1lab's training knobs.

`config.json` is written so that `transformers.AutoConfig` reads it as `deepseek_v3`; the r1lab-only training
knobs (balancing speed, MTP loss weight) ride along as extra keys that transformers keeps and ignores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # FFN width of the dense layers
    moe_intermediate_size: int = 2048  # FFN width of each routed and shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    first_k_dense_replace: int = 3  # the first k layers are dense, the rest MoE
    # Multi-head latent attention
    q_lora_rank: int | None = 1536  # None: full-rank query projection
    kv_lora_rank: int = 512  # the cached latent
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # the decoupled RoPE key, shared by all heads and cached
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    # Multi-token prediction
    num_nextn_predict_layers: int = 0
    # Positions and norms
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # r1lab training knobs (not read by transformers)
    bias_update_speed: float = 1e-3  # aux-loss-free balancing step gamma (V3: 0.001)
    seq_aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (V3: 0.0001); 0 disables
    mtp_loss_weight: float = 0.3  # lambda for the MTP loss (V3: 0.3, then 0.1)

    R1LAB_KEYS = ("bias_update_speed", "seq_aux_loss_alpha", "mtp_loss_weight")

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace) if self.n_routed_experts else 0

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"invalid model config: {msg}")

        for f in dataclasses.fields(self):  # config.json is hand-edited: a string or a list where a number belongs
            value = getattr(self, f.name)
            need(_fits(value, str(f.type)), f"{f.name} must be {_described(str(f.type))} (got {value!r})")
        if self.rope_scaling is not None:
            for k in (
                "factor",
                "original_max_position_embeddings",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "attention_factor",
            ):
                v = self.rope_scaling.get(k)
                need(v is None or _fits(v, "float"), f"rope_scaling.{k} must be a number (got {v!r})")
                need(
                    v is None or k.startswith(("mscale", "attention")) or v > 0,
                    f"rope_scaling.{k} must be > 0 (got {v!r})",
                )
        need(
            self.hidden_act == "silu",
            f"hidden_act must be 'silu', the only activation DeepSeek-V3 uses (got {self.hidden_act!r})",
        )
        for name in ("rms_norm_eps", "max_position_embeddings", "routed_scaling_factor"):
            need(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        need(self.rope_theta > 1, f"rope_theta must be > 1, the RoPE base (got {self.rope_theta})")
        need(
            self.n_routed_experts >= 0 and self.n_shared_experts >= 0,
            "n_routed_experts and n_shared_experts must be >= 0 "
            f"(got {self.n_routed_experts}, {self.n_shared_experts})",
        )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "intermediate_size",
        ):
            need(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even (got {self.qk_rope_head_dim})")
        need(self.qk_nope_head_dim >= 0, f"qk_nope_head_dim must be >= 0 (got {self.qk_nope_head_dim})")
        need(
            self.q_lora_rank is None or self.q_lora_rank > 0,
            f"q_lora_rank must be None or > 0 (got {self.q_lora_rank})",
        )
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            f"first_k_dense_replace must be in [0, num_hidden_layers] (got {self.first_k_dense_replace})",
        )
        need(
            self.num_nextn_predict_layers >= 0,
            f"num_nextn_predict_layers must be >= 0 (got {self.num_nextn_predict_layers})",
        )
        if self.n_routed_experts:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0 for a MoE model")
            need(
                1 <= self.num_experts_per_tok <= self.n_routed_experts,
                f"num_experts_per_tok must be in [1, n_routed_experts={self.n_routed_experts}] "
                f"(got {self.num_experts_per_tok})",
            )
            need(
                self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})",
            )
            need(
                self.n_group == 1 or self.n_routed_experts // self.n_group >= 2,
                "each expert group needs >= 2 experts (group scores sum the top-2 per group)",
            )
            need(1 <= self.topk_group <= self.n_group, f"topk_group must be in [1, n_group] (got {self.topk_group})")
            need(
                self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                "num_experts_per_tok exceeds the experts in the topk_group selected groups",
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            need(kind in ("yarn", "default"), f"rope_scaling type must be 'yarn' (got {kind!r})")

    # ------------------------------------------------------------------ transformers config.json
    def to_hf_dict(self) -> dict:
        """A config.json that `transformers.AutoConfig` loads as DeepseekV3Config."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("rope_theta", "rope_scaling")}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**{k: v for k, v in self.rope_scaling.items() if k != "type"}, "rope_theta": self.rope_theta}
            rope["rope_type"] = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        if not self.n_routed_experts:  # transformers has no MoE-off switch: make every layer a dense one
            d["first_k_dense_replace"] = self.num_hidden_layers
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            rope_parameters=rope,
            head_dim=self.qk_rope_head_dim,
            attention_dropout=0.0,
            use_cache=True,
            dtype="float32",
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> ModelConfig:
        """Read a DeepSeek-V3 config.json: transformers >= 5 (`rope_parameters`) or the original release
        (`rope_theta` + `rope_scaling`, as in deepseek-ai/DeepSeek-V3)."""
        mt = d.get("model_type", "deepseek_v3")
        if mt not in ("deepseek_v3", "r1lab"):
            raise ValueError(f"not a DeepSeek-V3 config (model_type={mt!r}); load it as a transformers model instead")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("rope_parameters", "rope_scaling"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ValueError(
                    f"invalid model config: {key} must be an object like "
                    f'{{"rope_type": "yarn", "factor": 40}} or null (got {d[key]!r})'
                )
        # as transformers reads it: a legacy `rope_scaling` wins over `rope_parameters` when both are there
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        if rope:
            kw["rope_theta"] = rope.get("rope_theta", kw.get("rope_theta", 10000.0))
            kind = rope.get("rope_type", rope.get("type", "default"))
            kw["rope_scaling"] = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
        if kw.get("rope_scaling"):  # one spelling: rope_type (older files say type)
            rs = kw["rope_scaling"]
            kind = rs.get("rope_type", rs.get("type"))
            kw["rope_scaling"] = (
                None if kind == "default" else {**{k: v for k, v in rs.items() if k != "type"}, "rope_type": kind}
            )
        if d.get("n_routed_experts") is None:
            kw["n_routed_experts"] = 0
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
        return cls(**kw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            return cls.from_hf_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-save the checkpoint") from None


def _fits(value, annotation: str) -> bool:
    """Whether a value has a field's type (`int`, `float`, `int | None`, `int | list[int] | None`, ...); a bool
    is not a number here, though Python counts it as one."""

    def one(t: str) -> bool:
        if t == "None":
            return value is None
        if t in ("bool", "str", "dict"):
            return isinstance(value, {"bool": bool, "str": str, "dict": dict}[t])
        if isinstance(value, bool):
            return False
        if t == "list[int]":
            return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
        return isinstance(value, int) if t == "int" else t == "float" and isinstance(value, (int, float))

    return any(one(t.strip()) for t in annotation.split("|"))


def _described(annotation: str) -> str:
    """`int | None` -> 'an integer or null': a field's type in config.json's words."""
    words = {
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "str": "a string",
        "dict": "an object",
        "None": "null",
        "list[int]": "a list of integers",
    }
    return " or ".join(words[t.strip()] for t in annotation.split("|"))


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    """The embedded default: a DeepSeek-V3 in miniature (MLA + grouped MoE with shared experts and aux-loss-free
    balancing; about 1.3M parameters active) that trains on a CPU in minutes. MTP is off by default (it costs a
    block per step; turn it on with num_nextn_predict_layers=1), balancing moves 10x faster than V3's since a run is
    a few hundred steps, the kv latent is as wide as the model and queries are not compressed (V2-Lite also runs
    without it); the measurements behind these are in docs/performance.md."""
    base = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.0,
        num_nextn_predict_layers=0,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bias_update_speed=1e-2,
    )
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:  # a typo in pretrain's `model` overrides (or the distill student's) is named, not a TypeError
        raise ValueError(
            f"invalid model config: unknown key(s) {', '.join(unknown)}; known keys: "
            f"{', '.join(f.name for f in dataclasses.fields(ModelConfig))}"
        )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]  # each value's type is checked by ModelConfig.validate


PRESETS = {"tiny": tiny_config}
