"""GRPO's grouped layout for r1lab's DeepSeek-V3: prompts [P, Lp] and their completions [N, Lc] held apart, so each
prompt runs once for its G completions, no score is spent between completions, and nothing but attention scores is
computed for padding. The same numbers as packing [prompt | c1 | ... | cG] with a 4D mask (tests/test_grpo.py).

`GroupedLayout` says where the real tokens sit; `attention` is MLA on that layout; `hidden_states` runs a model.
(r1lab.model.llama.FastDecoder runs Llama-family models on the same layout.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_bias(mask: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean mask (True = may attend) -> additive bias (0 or -inf) in the activations' dtype."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class GroupedLayout:
    """Where the real tokens of right-padded prompts [P, Lp] and completions [N, Lc] sit, for GRPO's grouped
    forward: `real` gathers them (prompts' first), `pad`/`unpad` move per-token tensors to and from the padded
    views attention needs, and `bias_c` [N, 1, Lc, Lp + Lc] lets completion n see the real tokens of prompt
    `group[n]` and, causally, itself."""

    def __init__(self, prompt_lens, completion_lens, group, Lp: int, Lc: int, dtype):
        dev = prompt_lens.device
        self.P, self.N, self.Lp, self.Lc, self.group = len(prompt_lens), len(completion_lens), Lp, Lc, group
        self.idx_p = (torch.arange(Lp, device=dev)[None] < prompt_lens[:, None]).flatten().nonzero()[:, 0]
        self.idx_c = (torch.arange(Lc, device=dev)[None] < completion_lens[:, None]).flatten().nonzero()[:, 0]
        self.n_prompt = len(self.idx_p)
        see_prompt = torch.arange(Lp, device=dev)[None, :] < prompt_lens.index_select(0, group)[:, None]  # [N, Lp]
        see_self = torch.ones(Lc, Lc, dtype=torch.bool, device=dev).tril()
        allowed = torch.cat([see_prompt[:, None, :].expand(self.N, Lc, Lp), see_self.expand(self.N, Lc, Lc)], -1)
        self.bias_c = attention_bias(allowed[:, None], dtype)

    def real(self, t: torch.Tensor, prompts: bool) -> torch.Tensor:
        """[B, L, ...] -> its real tokens [R, ...]."""
        return t.flatten(0, 1).index_select(0, self.idx_p if prompts else self.idx_c)

    def pad(self, t: torch.Tensor, prompts: bool, heads: bool = True) -> torch.Tensor:
        """Real tokens [R, H, d] -> [B, H, L, d] (or [R, D] -> [B, L, D] without heads), zeros at the padding."""
        B, L, idx = (self.P, self.Lp, self.idx_p) if prompts else (self.N, self.Lc, self.idx_c)
        out = t.new_zeros(B * L, *t.shape[1:]).index_copy(0, idx, t).view(B, L, *t.shape[1:])
        return out.transpose(1, 2) if heads else out

    def unpad(self, t: torch.Tensor, prompts: bool) -> torch.Tensor:
        """[B, H, L, d] -> its real tokens [R, H, d]."""
        return self.real(t.transpose(1, 2), prompts)


def attention(mla, x: torch.Tensor, rot: torch.Tensor, lay: GroupedLayout) -> torch.Tensor:
    """MLA (r1lab.model.deepseek.MLA) on the real tokens x [R, D] (prompts' then completions'): prompts attend
    causally to themselves; each completion attends to its prompt and causally to itself. Projections run on real
    tokens only; only the score computation sees the padded [P, Lp] / [N, Lc] views."""
    q, k, v = (t[0].transpose(0, 1) for t in mla._heads(*mla._project(x[None], rot[None])))  # [R, H, d]
    qp, kp, vp = (lay.pad(t[: lay.n_prompt], prompts=True) for t in (q, k, v))  # [P, H, Lp, d]
    qc, kc, vc = (lay.pad(t[lay.n_prompt :], prompts=False) for t in (q, k, v))  # [N, H, Lc, d]
    op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=mla.scale)
    g = lay.group
    oc = mla._masked(
        qc, torch.cat([kp.index_select(0, g), kc], dim=2), torch.cat([vp.index_select(0, g), vc], dim=2), lay.bias_c
    )
    return mla.o_proj(torch.cat([lay.unpad(op, prompts=True), lay.unpad(oc, prompts=False)]).flatten(1))


def hidden_states(
    model,
    prompt_ids: torch.Tensor,
    prompt_lens: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_lens: torch.Tensor,
    group: torch.Tensor,
    padded: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-norm hidden states of prompts [P, Lp] and completions [N, Lc] (zeros at the padding) of a DeepseekV3,
    completion n continuing prompt `group[n]`. `padded=False`: the real tokens only, [Rp, D] and [Rc, D]."""
    lay = GroupedLayout(
        prompt_lens,
        completion_lens,
        group,
        prompt_ids.shape[1],
        completion_ids.shape[1],
        model.model.embed_tokens.weight.dtype,
    )
    start = prompt_lens.index_select(0, group)[:, None]  # [N, 1]
    pos_p = torch.arange(lay.Lp, device=start.device).expand(len(prompt_lens), lay.Lp)
    pos_c = start + torch.arange(lay.Lc, device=start.device)
    x = model.model.embed_tokens(torch.cat([lay.real(prompt_ids, True), lay.real(completion_ids, False)]))
    rot = model.rope(torch.cat([lay.real(pos_p, True), lay.real(pos_c, False)])[None])[0]  # [R, 1, d/2]
    for layer in model.main_layers:
        x = layer.forward_grouped(x, rot, lay)  # a block method: FSDP gathers a block's shards around it
    hp, hc = model.model.norm(x).split([lay.n_prompt, len(x) - lay.n_prompt])
    return (lay.pad(hp, True, heads=False), lay.pad(hc, False, heads=False)) if padded else (hp, hc)
