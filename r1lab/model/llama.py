"""Llama-family `transformers` models (Llama, Qwen2, Qwen3, Mistral) on r1lab's fast paths.

The generic path runs a causal LM through its own forward: in sampling one call per token that rebuilds masks and
grows a DynamicCache, in GRPO packed [prompt | c1 | ... | cG] rows with a 4D mask. Where a model's decoder layer is
exactly norm -> attention (q/k/v projections, optional per-head q/k norm, RoPE, grouped-query heads) -> residual ->
norm -> gated MLP -> residual, `FastDecoder` runs the model's own modules (so its weights, dtype and LoRA adapters
are used as they are) with r1lab's preallocated per-row KV cache for sampling, and GRPO's grouped layout for
training (each prompt once per group, nothing computed for padding but the attention scores). Anything else keeps
the generic path: `fast_decoder` returns None. Checked against the model's own forward in tests/test_llama.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from r1lab.model.cache import KVCache
from r1lab.model.grouped import GroupedLayout, attention_bias

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def fast_decoder(model) -> FastDecoder | None:
    """The fast path over `model` (looking through a `peft` wrapper), or None where it would not compute exactly
    what the model's own forward does: another architecture, sliding-window layers, attention dropout, or weights
    sharded by FSDP (whose gathering hooks run only through the layers' own forward)."""
    from r1lab.model.hf import base_model

    base = base_model(model)
    cfg = getattr(base, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in FAMILIES or not hasattr(base, "model"):
        return None
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return None
    if model_type == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        return None
    if getattr(cfg, "attention_dropout", 0.0) or getattr(cfg, "pretraining_tp", 1) != 1:
        return None
    if any(type(p).__name__ == "DTensor" for p in base.parameters()):
        return None
    return FastDecoder(base)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' Llama family applies it (rotate_half: the two halves of each head)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, fused: bool | None = None
) -> torch.Tensor:
    """Grouped-query attention with an additive bias [B, 1, S, T]: q [B, H, S, d], k and v [B, H_kv, T, d] (query
    heads j*g .. j*g+g-1 read kv head j, as repeat_kv lays them out) -> [B, H, S, d]. On CPU each kv head is read
    once for its g query heads with baddbmm; `fused` (the default off CPU) uses SDPA, whose GPU kernels never hold
    the [B, H, S, T] scores (docs/performance.md)."""
    B, H, S, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if fused if fused is not None else q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=H != Hkv)
    g = H // Hkv
    scores = torch.baddbmm(
        bias[:, None].expand(B, Hkv, g, S, T).reshape(B * Hkv, g * S, T),
        q.reshape(B * Hkv, g * S, d),
        k.reshape(B * Hkv, T, d).transpose(1, 2),
        alpha=scale,
    )
    probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    return torch.bmm(probs, v.reshape(B * Hkv, T, -1)).view(B, H, S, -1)


@dataclass
class Output:
    logits: torch.Tensor


class FastDecoder:
    """A Llama-family model's own modules run by r1lab, with the interface of r1lab's native model where the sampler
    and GRPO use it: `__call__` / `body` with a `KVCache`, `grouped_hidden_states`, `model` (the decoder: embeddings,
    layers, final norm) and `lm_head`."""

    Cache = KVCache

    def __init__(self, base):
        self.base, self.config = base, base.config
        self.model, self.lm_head = base.model, base.get_output_embeddings()
        attn = self.model.layers[0].self_attn
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.qk_norm = hasattr(attn, "q_norm")

    # ---------------------------------------------------------------- one layer
    def _qkv(self, layer, x, cos, sin):
        """Per-head queries, keys and values [..., heads, d] of normalised x [..., D], RoPE applied."""
        a, d = layer.self_attn, self.head_dim
        q, k, v = (p(x).unflatten(-1, (-1, d)) for p in (a.q_proj, a.k_proj, a.v_proj))
        if self.qk_norm:
            q, k = a.q_norm(q), a.k_norm(k)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    @staticmethod
    def _rest(layer, x, o):
        """The residual around attention (o [..., H, d]), then the MLP block."""
        x = x + layer.self_attn.o_proj(o.flatten(-2))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _rope(self, x, positions):
        cos, sin = self.model.rotary_emb(x, positions)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads

    # ---------------------------------------------------------------- cached (sampling)
    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> Output:
        """Logits [B, S, V] of right-padded new tokens (`attention_mask` marks the real ones) continuing each row
        of `cache` at its own length."""
        return Output(self.lm_head(self.model.norm(self.body(input_ids, attention_mask, cache)[0])))

    @torch.no_grad()
    def body(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, None]:
        """Hidden states before the final norm [B, S, D] (and no rotations to share: the interface of
        DeepseekV3.body, which the sampler uses to take only the prompts' last positions through the head)."""
        if cache is None:
            raise ValueError("FastDecoder runs with a KVCache; call the transformers model itself without one")
        B, S = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(x, cache.lengths[:, None] + torch.arange(S, device=x.device))
        bias = attention_bias(cache.mask(S), x.dtype)  # [B, 1, S, T]
        for i, layer in enumerate(self.model.layers):
            q, k, v = (t.transpose(1, 2) for t in self._qkv(layer, layer.input_layernorm(x), cos, sin))
            k, v = cache.write_kv(i, k, v)
            x = self._rest(layer, x, attend(q, k, v, bias, self.scale).transpose(1, 2))
        cache.advance(attention_mask.sum(1) if attention_mask is not None else S)
        return x, None

    # ---------------------------------------------------------------- grouped (GRPO training)
    def grouped_hidden_states(
        self, prompt_ids, prompt_lens, completion_ids, completion_lens, group, padded: bool = False
    ):
        """Final-norm hidden states of the real tokens of prompts [Rp, D] and completions [Rc, D], completion n
        continuing prompt `group[n]`: the numbers of packing [prompt | c1 | ... | cG] with a 4D mask (see
        DeepseekV3.grouped_hidden_states), with each prompt computed once."""
        if padded:
            raise ValueError("FastDecoder.grouped_hidden_states returns real tokens only (padded=False)")
        lay = GroupedLayout(
            prompt_lens, completion_lens, group, prompt_ids.shape[1], completion_ids.shape[1], self.lm_head.weight.dtype
        )
        start = prompt_lens.index_select(0, group)[:, None]
        pos_p = torch.arange(lay.Lp, device=start.device).expand(len(prompt_lens), lay.Lp)
        pos_c = start + torch.arange(lay.Lc, device=start.device)
        x = self.model.embed_tokens(torch.cat([lay.real(prompt_ids, True), lay.real(completion_ids, False)]))
        cos, sin = self._rope(x[None], torch.cat([lay.real(pos_p, True), lay.real(pos_c, False)])[None])
        cos, sin = cos[0], sin[0]
        name = "is_activation_checkpointing"  # transformers >= 5.x; the old name is deprecated
        checkpointed = self.base.training and getattr(
            self.base, name if hasattr(self.base, name) else "is_gradient_checkpointing", False
        )
        for layer in self.model.layers:
            if checkpointed:
                x = checkpoint(self._grouped_layer, layer, x, cos, sin, lay, use_reentrant=False)
            else:
                x = self._grouped_layer(layer, x, cos, sin, lay)
        return self.model.norm(x).split([lay.n_prompt, len(x) - lay.n_prompt])

    def _grouped_layer(self, layer, x, cos, sin, lay: GroupedLayout):
        q, k, v = self._qkv(layer, layer.input_layernorm(x), cos, sin)  # [R, heads, d]
        qp, kp, vp = (lay.pad(t[: lay.n_prompt], prompts=True) for t in (q, k, v))  # [P, heads, Lp, d]
        qc, kc, vc = (lay.pad(t[lay.n_prompt :], prompts=False) for t in (q, k, v))  # [N, heads, Lc, d]
        op = F.scaled_dot_product_attention(
            qp, kp, vp, is_causal=True, scale=self.scale, enable_gqa=qp.shape[1] != kp.shape[1]
        )
        g = lay.group
        oc = attend(
            qc,
            torch.cat([kp.index_select(0, g), kc], dim=2),
            torch.cat([vp.index_select(0, g), vc], dim=2),
            lay.bias_c,
            self.scale,
        )
        return self._rest(layer, x, torch.cat([lay.unpad(op, prompts=True), lay.unpad(oc, prompts=False)]))
