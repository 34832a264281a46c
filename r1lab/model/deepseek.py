"""The DeepSeek-V3 architecture in one file: RMSNorm, RoPE (+YaRN), multi-head latent attention, DeepSeekMoE with
auxiliary-loss-free balancing, multi-token prediction. Parameter names match `transformers`' DeepseekV3ForCausalLM,
so a state dict saved here loads there and back.

Attention has two paths with the same maths. Training (no cache) expands the kv latent into per-head keys and
values. Cached inference never expands the cache: the key up-projection is absorbed into the query and the value
up-projection is applied after attention, so the cache holds only the kv latent and the shared RoPE key (V3 §2.1.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1lab.model import grouped
from r1lab.model.cache import LatentCache
from r1lab.model.config import ModelConfig
from r1lab.model.grouped import GroupedLayout, attention_bias

# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # normalised in float32, like transformers
        if x.dtype == self.weight.dtype == torch.float32:  # the same product, one call fewer
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float, float]:
    """Inverse frequencies for the RoPE dims, the cos/sin scale and the softmax-scale multiplier (YaRN, as in
    DeepSeek-V3 and `transformers`: frequencies blended by a linear ramp, mscale folded into the softmax scale)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) == "default":
        return inv_freq, 1.0, 1.0
    orig = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
    factor = rs.get("factor") or cfg.max_position_embeddings / orig
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

    def mscale(m):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    cos_scale = rs.get("attention_factor") or (mscale(m) / mscale(m_all) if m and m_all else mscale(1))
    softmax_mult = mscale(m_all) ** 2 if m_all else 1.0
    return inv_freq, float(cos_scale), float(softmax_mult)


def apply_rope(x: torch.Tensor, rot: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x [B, S, heads, d] by the unit complex numbers rot [B, S, 1, d/2]. With `interleave`
    the rotated pairs are (x0,x1),(x2,x3),... as in DeepSeek's weights, else (x_i, x_{i+d/2}) as in rotate_half.
    The output keeps the input's layout; queries and keys are rotated alike, so their dot products match
    `transformers` (which de-interleaves) exactly."""
    shape = x.shape
    if interleave:
        xc = torch.view_as_complex(x.float().reshape(*shape[:-1], -1, 2))
        return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)
    x1, x2 = x.float().chunk(2, dim=-1)
    xc = torch.complex(x1, x2) * rot
    return torch.cat([xc.real, xc.imag], dim=-1).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: a dense layer, a routed expert, or the shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- multi-head latent attention


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads, self.nope, self.rope, self.vdim, self.rank = (
            h,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=cfg.attention_bias)
        _, _, softmax_mult = rope_frequencies(cfg)
        self.scale = cfg.qk_head_dim**-0.5 * softmax_mult

    def _project(self, x, rot):
        """Queries (no-RoPE and RoPE parts per head), the normalised kv latent and the shared RoPE key."""
        B, S, _ = x.shape
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, S, self.n_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, rot, self.cfg.rope_interleave)
        k_pe = apply_rope(k_pe.unsqueeze(2), rot, self.cfg.rope_interleave).squeeze(2)
        return q_nope, q_pe, self.kv_a_layernorm(latent), k_pe

    def _heads(self, q_nope, q_pe, latent, k_pe):
        """Per-head queries, keys and values [B, H, S, d] with the latent expanded (training / full forward)."""
        B, S = latent.shape[:2]
        k_nope, v = (
            self.kv_b_proj(latent).view(B, S, self.n_heads, self.nope + self.vdim).split([self.nope, self.vdim], dim=-1)
        )
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        return torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2), k, v.transpose(1, 2)

    def _masked(self, q, k, v, bias):
        """Attention with an additive bias [B, 1, S, T] (0 or -inf): baddbmm on CPU, SDPA elsewhere (its fused
        kernels never hold the [B, H, S, T] scores); docs/performance.md."""
        if q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        B, H, S, T = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        scores = torch.baddbmm(
            bias.expand(B, H, S, T).reshape(B * H, S, T),
            q.reshape(B * H, S, -1),
            k.reshape(B * H, T, -1).transpose(1, 2),
            alpha=self.scale,
        )
        return torch.bmm(scores.softmax(-1).to(v.dtype), v.reshape(B * H, T, -1)).view(B, H, S, -1)

    def forward(self, x, rot, mask, cache: LatentCache | None = None, layer: int = 0):
        B, S, _ = x.shape
        q_nope, q_pe, latent, k_pe = self._project(x, rot)
        if cache is not None and cache.fresh:  # a prefill with no past: store the latent, attend as without cache
            cache.write(layer, torch.cat([latent, k_pe], dim=-1))
            cache = None

        if cache is None:  # training / full forward: expand the latent into per-head keys and values
            qf, k, v = self._heads(q_nope, q_pe, latent, k_pe)
            if mask is None:  # plain causal: SDPA's fused kernel
                o = F.scaled_dot_product_attention(qf, k, v, is_causal=True, scale=self.scale)
            else:
                o = self._masked(qf, k, v, mask)
            o = o.transpose(1, 2)
        else:  # cached: attend in latent space; every head reads the same [latent | RoPE key] entries (MQA-like)
            keys = cache.write(layer, torch.cat([latent, k_pe], dim=-1))  # [B, T, rank + rope]
            H = self.n_heads
            w = self.kv_b_proj.weight.view(H, self.nope + self.vdim, self.rank)
            # per-head products as one bmm over heads (cheaper than einsum's permutes at decode sizes)
            q_lat = torch.bmm(q_nope.reshape(B * S, H, -1).transpose(0, 1), w[:, : self.nope])  # absorb W_UK
            q_lat = q_lat.view(H, B, S, self.rank).transpose(0, 1)  # [B, H, S, rank]
            qf = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1).reshape(B, H * S, -1)
            # mask: the additive bias the model built once for all layers, [B, 1, T] (decoding) or [B, H*S, T]
            scores = torch.baddbmm(mask, qf, keys.transpose(1, 2), alpha=self.scale)  # [B, H*S, T]
            probs = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1).to(keys.dtype)
            o = torch.bmm(probs, keys[..., : self.rank])  # [B, H*S, rank]
            o = torch.bmm(
                o.view(B, H, S * self.rank).transpose(0, 1).reshape(H, B * S, self.rank),
                w[:, self.nope :].transpose(1, 2),
            )  # apply W_UV: [H, B*S, v]
            o = o.view(H, B, S, self.vdim).permute(1, 2, 0, 3)
        return self.o_proj(o.reshape(B, S, self.n_heads * self.vdim))


# ----------------------------------------------------------------------------- DeepSeekMoE


class Gate(nn.Module):
    """Sigmoid affinities, group-limited top-k routing, normalised weights times the routed scaling factor.
    `e_score_correction_bias` (aux-loss-free balancing) is added for the choice of experts only, never to weights."""

    e_score_correction_bias: torch.Tensor  # a buffer: aux-loss-free balancing's per-expert bias

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k], expert ids [N, k], affinities [N, E])."""
        cfg = self.cfg
        dtype = torch.promote_types(x.dtype, torch.float32)  # routing in at least float32
        scores = F.linear(x.to(dtype), self.weight.to(dtype)).sigmoid()
        choice = scores + self.e_score_correction_bias
        if cfg.n_group > 1:  # keep only experts in the topk_group groups with the best top-2 sums
            groups = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            keep = groups.topk(2, dim=-1)[0].sum(-1).topk(cfg.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.ones(groups.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, keep, False)
            choice = groups.masked_fill(group_mask[..., None], float("-inf")).view(-1, cfg.n_routed_experts)
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, idx, scores


class Experts(nn.Module):
    """The routed experts as stacked SwiGLU weights (transformers' in-memory layout; checkpoints store them per
    expert). When most experts receive tokens they run as two grouped matmuls over per-expert buckets; when few
    do (small decode batches of a many-expert model) only those experts run, one after another; a small batch
    crowding onto one expert runs every expert on every token (`_dense_is_cheaper`)."""

    def __init__(self, n: int, dim: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, dim))
        self.down_proj = nn.Parameter(torch.empty(n, dim, inter))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, D]; idx, weights [N, k]; counts [E] tokens per expert -> weighted sum of expert outputs [N, D]."""
        E, k = self.gate_up_proj.shape[0], idx.shape[1]
        per_expert = counts.tolist()  # the one host sync of the layer
        if self._dense_is_cheaper(x.shape[0], k, per_expert):  # before sorting: the dense path needs no order
            return self._dense(x, idx, weights)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        token = order // k
        expert = flat[order]
        w = weights.flatten()[order]
        # Grouped (two bmm over buckets padded to the fullest expert) when the padding costs less than running the
        # used experts one by one on their exact tokens, at ~20 token slots of per-op overhead per expert
        # (docs/performance.md).
        padding = E * max(per_expert) - len(flat)
        if padding <= max(0.25 * len(flat), 20 * sum(c > 0 for c in per_expert)):
            # Every bucket slot names its source token (padding slots name an extra zero row), so filling the
            # buckets and summing back are 1-D index_select / index_add: much cheaper than 2-D scatters.
            N, cap = x.shape[0], max(per_expert)
            first = counts.cumsum(0) - counts
            pos = expert * cap + torch.arange(len(flat), device=x.device) - first[expert]
            src = torch.full((E * cap,), N, dtype=torch.long, device=x.device).index_copy_(0, pos, token)
            w_slot = torch.zeros(E * cap, dtype=w.dtype, device=x.device).index_copy_(0, pos, w)
            buckets = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, src).view(E, cap, -1)
            gate, up = torch.bmm(buckets, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
            y = torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2)).reshape(E * cap, -1)
            y = (y * w_slot.unsqueeze(1).to(y.dtype)).to(x.dtype)
            return x.new_zeros(N + 1, x.shape[1]).index_add_(0, src, y)[:N]
        ys, start = [], 0
        for e, c in enumerate(per_expert):
            if c:
                gate, up = F.linear(x[token[start : start + c]], self.gate_up_proj[e]).chunk(2, dim=-1)
                ys.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
                start += c
        y = torch.cat(ys) * w.unsqueeze(1).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def _dense_is_cheaper(self, N: int, k: int, per_expert: list[int]) -> bool:
        """Every expert on every token (weight 0 where not chosen) beats both routed paths when a small batch is
        unevenly routed: E/k times the arithmetic but no sort, gather or scatter. Costs in token slots, ~45 slots of
        overhead per small op group per thread (docs/performance.md)."""
        E, used = len(per_expert), sum(c > 0 for c in per_expert)
        overhead = 45 * torch.get_num_threads()
        return E * N <= min(N * k + used * overhead, E * max(per_expert) + 2 * overhead)

    def _dense(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(x.shape[0], self.gate_up_proj.shape[0], dtype=weights.dtype, device=x.device).scatter_(
            1, idx, weights
        )  # [N, E]
        gate, up = torch.matmul(x, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)  # [E, N, I]
        y = torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2))  # [E, N, D]
        return torch.bmm(w.to(y.dtype)[:, None, :], y.transpose(0, 1)).squeeze(1).to(x.dtype)


class MoE(nn.Module):
    """Shared experts plus routed experts. Keeps per-expert token counts: `last_load` for the latest forward,
    `load` accumulated over training forwards until the balancing step consumes it."""

    load: torch.Tensor  # buffers: routed tokens per expert, accumulated and of the last forward
    last_load: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("last_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx, scores = self.gate(flat)
        counts = torch.bincount(idx.flatten(), minlength=self.cfg.n_routed_experts)
        out = self.experts(flat, idx, weights, counts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)

        with torch.no_grad():  # padding tokens are routed but not counted
            if token_mask is not None:
                counts = torch.bincount(idx[token_mask.reshape(-1)].flatten(), minlength=self.cfg.n_routed_experts)
            self.last_load.copy_(counts)
            if self.training:
                self.load += counts
        self.aux_loss = None
        if self.training and self.cfg.seq_aux_loss_alpha > 0:
            self.aux_loss = self._sequence_balance_loss(scores, idx, shape, token_mask)
        return out.view(shape)

    def _sequence_balance_loss(self, scores, idx, shape, token_mask):
        """V3 eq. 17-20: alpha * sum_i f_i * P_i per sequence, averaged over the batch."""
        E, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        B, T = shape[0], shape[1]
        m = (token_mask if token_mask is not None else torch.ones(B, T, dtype=torch.bool, device=scores.device)).to(
            scores.dtype
        )
        n_tok = m.sum(1).clamp(min=1)  # [B]
        chosen = torch.zeros(B * T, E, dtype=scores.dtype, device=scores.device).scatter_(1, idx, 1.0).view(B, T, E)
        f = (chosen * m[..., None]).sum(1) * E / (k * n_tok[:, None])  # [B, E]
        p_norm = (scores / scores.sum(-1, keepdim=True)).view(B, T, E)
        P = (p_norm * m[..., None]).sum(1) / n_tok[:, None]  # [B, E]
        return self.cfg.seq_aux_loss_alpha * (f * P).sum(-1).mean()


# ----------------------------------------------------------------------------- blocks and model


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.self_attn = MLA(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (
            MoE(cfg)
            if cfg.is_moe_layer(min(layer, cfg.num_hidden_layers - 1))
            else MLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, x, rot, mask, cache=None, token_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), rot, mask, cache, self.layer)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, token_mask) if isinstance(self.mlp, MoE) else self.mlp(h))

    def forward_grouped(self, x, rot, lay: GroupedLayout):
        """`forward` on the real tokens [R, D] of GRPO's grouped layout (r1lab.model.grouped)."""
        x = x + grouped.attention(self.self_attn, self.input_layernorm(x), rot, lay)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h[None])[0] if isinstance(self.mlp, MoE) else self.mlp(h))


class SharedHead(nn.Module):
    """The MTP module's output norm; the projection itself is the main model's lm_head (shared)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    """Multi-token prediction depth k (V3 §2.2): combine the previous depth's hidden state at i with the embedding
    of token i+k, run one block, predict token i+k+1. Stored as `model.layers.{L+k-1}` like DeepSeek's weights."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev, emb, rot, mask, token_mask=None, cache=None):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return super().forward(x, rot, mask, cache, token_mask)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        L = cfg.num_hidden_layers
        self.layers = nn.ModuleList(
            [Block(cfg, i) for i in range(L)] + [MTPLayer(cfg, L + k) for k in range(cfg.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class Output:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None  # total: LM + MTP + balance
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class DeepseekV3(nn.Module):
    """The causal LM. `forward` takes the same core arguments as a `transformers` causal LM
    (input_ids, attention_mask, position_ids, labels, logits_to_keep) plus a latent cache and packing segments."""

    inv_freq: torch.Tensor  # a buffer: RoPE's inverse frequencies (YaRN-blended)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.cos_scale, _ = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self):
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.zero_()
        for m in self.modules():
            if isinstance(m, Gate):
                m.e_score_correction_bias.zero_()

    @torch.no_grad()
    def init_buffers(self, loaded=()) -> None:
        """Recompute non-persistent buffers and re-tie weights after `to_empty` + `load_state_dict`;
        balancing biases absent from the loaded keys start at zero."""
        self.inv_freq = rope_frequencies(self.config)[0].to(self.lm_head.weight.device)
        loaded = set(loaded)
        for name, m in self.named_modules():
            if isinstance(m, MoE):
                m.load.zero_()
                m.last_load.zero_()
                if f"{name}.gate.e_score_correction_bias" not in loaded:
                    m.gate.e_score_correction_bias.zero_()
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def cast(self, dtype: torch.dtype) -> DeepseekV3:
        """Cast parameters to dtype; RoPE frequencies and the balancing biases stay float32 (tiny bias steps
        would vanish in bf16)."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self

    @property
    def main_layers(self):
        return self.model.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self):
        return self.model.layers[self.config.num_hidden_layers :]

    # ------------------------------------------------------------------ forward
    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """Unit complex rotations [B, S, 1, d/2] for these positions (times the YaRN cos/sin scale)."""
        angles = positions[..., None].float() * self.inv_freq
        return torch.polar(torch.full_like(angles, self.cos_scale), angles).unsqueeze(2)

    def body(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        segment_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        advance: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings through the main layers: (hidden before the final norm [B, S, D], rotations).
        `token_mask` [B, S] marks real tokens for the expert load counts when the mask is 4D. With a cache, the
        rows' lengths move past the new tokens unless `advance` is False (speculative decoding advances each row by
        what it accepted, after `draft`)."""
        B, S = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        if cache is not None:  # rows continue at their own lengths; new tokens are right-padded
            position_ids = cache.lengths[:, None] + torch.arange(S, device=x.device)
            mask = cache.mask(S)
            token_mask = None if attention_mask is None else attention_mask.bool()
        elif attention_mask is not None and attention_mask.dim() == 4:  # a custom [B, 1, S, S] mask, used as is
            mask = attention_mask.bool()
            token_mask = token_mask.bool() if token_mask is not None else None
            if position_ids is None:
                raise ValueError("a 4D attention_mask needs explicit position_ids")
        else:
            if position_ids is None:
                if attention_mask is not None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                else:
                    position_ids = torch.arange(S, device=x.device).expand(B, S)
            mask = build_mask(S, attention_mask, segment_ids, x.device)  # type: ignore[assignment]  # None: causal
            token_mask = attention_mask.bool() if attention_mask is not None else None
        rot = self.rope(position_ids)
        mask = (
            self._cached_bias(mask, S, x.dtype)
            if cache is not None
            else (attention_bias(mask, x.dtype) if mask is not None else None)
        )
        for layer in self.main_layers:
            x = layer(x, rot, mask, cache, token_mask)
        if cache is not None and advance:
            cache.advance(attention_mask.sum(1) if attention_mask is not None else S)
        return x, rot

    def _cached_bias(self, mask: torch.Tensor, S: int, dtype) -> torch.Tensor:
        """The additive bias of cached attention: as without a cache when nothing is cached yet ([B, 1, S, S]: MLA
        expands the latent, cheaper than latent-space attention for S > 1), else laid out as MLA's cached attention
        reads it, a row per (head, query) ([B, S, T] for one new token, [B, H*S, T] for more)."""
        bias = attention_bias(mask, dtype)
        if S == mask.shape[-1]:  # every row empty (cache.fresh)
            return bias
        bias = bias[:, 0]
        return bias if S == 1 else bias.repeat(1, self.config.num_attention_heads, 1)

    def draft(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        rot: torch.Tensor,
        cache: LatentCache,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The MTP module's next-next-token logits [B, S, V] at the positions the last `body` call wrote (before
        its rows advance): position i combines the main model's hidden state h_i [B, S, D] with the embedding of
        token i+1 (`next_ids` [B, S]) and predicts token i+2 (V3 section 2.2), attending over its own cached
        entries (the cache's layer after the main ones). The draft of speculative decoding."""
        if not len(self.mtp_layers):
            raise ValueError("this model has no multi-token-prediction module to draft with")
        layer = self.mtp_layers[0]
        S = next_ids.shape[1]
        bias = self._cached_bias(cache.mask(S), S, hidden.dtype)
        h = layer(
            hidden,
            self.model.embed_tokens(next_ids),
            rot,
            bias,
            None if attention_mask is None else attention_mask.bool(),
            cache,
        )
        return self.lm_head(layer.shared_head.norm(h))

    def hidden_states(
        self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, token_mask=None
    ) -> torch.Tensor:
        """Final-norm hidden states [B, S, D]; `lm_head` on a subset of them gives those positions' logits."""
        return self.model.norm(self.body(input_ids, attention_mask, position_ids, None, segment_ids, token_mask)[0])

    def grouped_hidden_states(self, prompt_ids, prompt_lens, completion_ids, completion_lens, group, padded=True):
        """Final-norm hidden states of prompts and their completions held apart (GRPO's grouped layout, with each
        prompt computed once): see r1lab.model.grouped.hidden_states."""
        return grouped.hidden_states(self, prompt_ids, prompt_lens, completion_ids, completion_lens, group, padded)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        segment_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        token_mask: torch.Tensor | None = None,
        **_,
    ) -> Output:
        """input_ids [B, S]. `attention_mask` [B, S] marks real tokens (1) and padding (0), or is a custom boolean
        [B, 1, S, S] mask (True = may attend) as in `transformers`; with a cache, new tokens are right-padded and
        each row continues at its own cached length. `segment_ids` [B, S] keeps packed samples from attending to
        each other. `labels` [B, S] aligned with input_ids (-100 = ignore) gives the shifted next-token loss, plus
        the MTP and balance losses in training."""
        hidden, rot = self.body(input_ids, attention_mask, position_ids, cache, segment_ids, token_mask)
        h = self.model.norm(hidden)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        out = Output(logits=logits, hidden=hidden if return_hidden else None)
        if labels is None:
            return out

        out.lm_loss = shifted_ce(logits, labels[:, -logits.shape[1] :], 1)
        total = out.lm_loss
        S = input_ids.shape[1]
        if self.training and len(self.mtp_layers) and self.config.mtp_loss_weight > 0 and S > 2:
            out.mtp_loss = self._mtp_loss(hidden, input_ids, labels, rot, attention_mask, segment_ids, token_mask)
            total = total + self.config.mtp_loss_weight * out.mtp_loss
        aux = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        if aux:
            out.aux_loss = torch.stack(aux).sum()
            total = total + out.aux_loss
        out.loss = total
        return out

    def _mtp_loss(self, hidden, input_ids, labels, rot, attention_mask, segment_ids, token_mask=None):
        """Mean over depths of the cross-entropy for token i+k+1 at depth k (V3 eq. 24-25). With a custom 4D mask
        (packed samples sharing a prefix), MTP position j sees position i when j sees i and token j+k sees token
        i+k, and token t = j+k+1 is a target only where t sees both j and j+k: nothing crosses a sample."""
        losses, h = [], hidden
        S = input_ids.shape[1]
        custom = attention_mask is not None and attention_mask.dim() == 4
        allowed = attention_mask.bool()[:, 0] if custom else None  # [B, S, S]
        for k, layer in enumerate(self.mtp_layers, start=1):
            n = S - k  # MTP position j combines h_j with the embedding of token j+k
            if n < 2:
                break
            emb = self.model.embed_tokens(input_ids[:, k:])
            target = labels[:, k + 1 :]
            if custom:
                mask = (allowed[:, :n, :n] & allowed[:, k:, k:])[:, None]
                am = token_mask[:, :n].bool() & token_mask[:, k:].bool() if token_mask is not None else None
                j = torch.arange(n - 1, device=hidden.device)
                sees = allowed[:, j + k + 1, j] & allowed[:, j + k + 1, j + k]  # [B, n - 1]
                target = target.masked_fill(~sees, -100)
            else:
                am = attention_mask[:, :n].bool() & attention_mask[:, k:].bool() if attention_mask is not None else None
                seg = segment_ids[:, :n] if segment_ids is not None else None
                mask = build_mask(n, am, seg, hidden.device)
                if segment_ids is not None:  # never predict across a packing boundary
                    target = target.masked_fill(segment_ids[:, k + 1 :] != segment_ids[:, : n - 1], -100)
            h = layer(h[:, :n], emb, rot[:, :n], None if mask is None else attention_bias(mask, h.dtype), am)
            logits = self.lm_head(layer.shared_head.norm(h[:, : n - 1])).float()
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100))
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------ balancing
    def expert_load(self, accumulated: bool = False) -> torch.Tensor:
        """Per-MoE-layer token counts per routed expert [n_moe_layers, E]: the last forward, or accumulated."""
        rows = [(m.load if accumulated else m.last_load) for m in self.main_moe()]
        return torch.stack(rows) if rows else torch.zeros(0)

    def main_moe(self) -> list[MoE]:
        return [layer.mlp for layer in self.main_layers if isinstance(layer.mlp, MoE)]

    @torch.no_grad()
    def update_expert_bias(self, speed: float | None = None) -> torch.Tensor:
        """Aux-loss-free balancing (V3 §2.1.2): after an optimiser step, raise the bias of underloaded experts and
        lower that of overloaded ones by a fixed step, using the loads counted since the last update.
        Returns the load imbalance (max/mean) per layer before the update."""
        speed = self.config.bias_update_speed if speed is None else speed
        imbalance = []
        for m in [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]:
            load = m.load
            if load.sum() == 0:
                continue
            imbalance.append(load.max() / load.mean())
            m.gate.e_score_correction_bias += speed * torch.sign(load.mean() - load)
            m.load.zero_()
        return torch.stack(imbalance) if imbalance else torch.zeros(0)

    def num_parameters(self) -> dict[str, int]:
        from r1lab.model.info import count_parameters

        return count_parameters(self.config)


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + shift], ignoring -100."""
    lg = logits[:, :-shift].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(lg, labels[:, shift:].reshape(-1), ignore_index=-100)


def build_mask(S: int, attention_mask, segment_ids, device) -> torch.Tensor | None:
    """Boolean attention mask [B, 1, S, S] (True = may attend) for a forward without cache, or None for plain
    causal attention. Padding keys are hidden; a padding query sees itself only (so no row is all -inf)."""
    if attention_mask is None and segment_ids is None:
        return None
    idx = torch.arange(S, device=device)
    mask = (idx[None, :] <= idx[:, None])[None, None]  # causal [1,1,S,S]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask | torch.eye(S, dtype=torch.bool, device=device)
