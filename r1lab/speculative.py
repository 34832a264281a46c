"""Speculative sampling with one drafted token (Leviathan et al., 2023; Chen et al., 2023), as DeepSeek-V3 uses its
multi-token-prediction module at inference: the MTP module drafts the next token from q, the main model scores it
in the same forward that continues the sequence, and the draft is kept with probability min(1, p(d) / q(d)); if it
is not, a token is drawn from the residual max(0, p - q) instead. Either way the emitted token follows p exactly,
and a kept draft comes with a second token drawn from the main model's next distribution: 1 or 2 tokens per step.

p and q are the distributions actually sampled from (the row's temperature, top-p and top-k applied to both);
greedy rows use one-hot distributions, so a draft is kept exactly when it is the argmax and greedy output is
unchanged. Pure functions on tensors, with the model's draft (`DeepseekV3.draft`) what speculative decoding needs;
the sampler does not run them yet (docs/performance.md).
"""

from __future__ import annotations

import torch


def sampling_distribution(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor
) -> torch.Tensor:
    """The distribution each row samples from [B, V]: softmax(logits / T) truncated to the smallest set reaching
    top_p and to the top_k most likely tokens, renormalised; a one-hot at the argmax where T is 0 (greedy)."""
    logits = logits.float()
    greedy = temperature <= 0
    probs = (logits / temperature.masked_fill(greedy, 1.0)[:, None]).softmax(-1)
    sp, si = probs.sort(-1, descending=True)
    rank = torch.arange(sp.shape[1], device=sp.device)[None, :]
    drop = (sp.cumsum(-1) - sp) >= top_p[:, None]  # keep the smallest set reaching top_p
    drop |= (top_k[:, None] > 0) & (rank >= top_k[:, None])
    drop[:, 0] = False
    probs = torch.zeros_like(probs).scatter_(1, si, sp.masked_fill(drop, 0.0))
    probs = probs / probs.sum(-1, keepdim=True)
    onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], onehot, probs)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one token per row from probs [B, V] with uniforms u [B] in [0, 1)."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[1] - 1)[:, 0]


def verify(
    p: torch.Tensor, p_next: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One speculative step per row. p [B, V]: the main model's distribution for the drafted position; p_next:
    its distribution for the position after it (valid if the draft is kept); q: the draft's distribution;
    drafted [B]: the drafted tokens; u [B, 3]: uniforms (acceptance, residual, next). Returns (tokens [B, 2], kept
    [B] bool): tokens[:, 0] is the drafted token if kept, else a draw from the residual; tokens[:, 1] is a draw
    from p_next, meaningful only where kept."""
    rows = torch.arange(len(drafted), device=drafted.device)
    p_d, q_d = p[rows, drafted], q[rows, drafted]
    kept = u[:, 0] * q_d < p_d  # u < p(d) / q(d), without dividing by 0
    residual = (p - q).clamp_(min=0)
    empty = residual.sum(-1, keepdim=True) <= 0  # p == q: a rejection cannot happen
    residual = torch.where(empty, p, residual)
    first = torch.where(kept, drafted, draw(residual, u[:, 1]))
    return torch.stack([first, draw(p_next, u[:, 2])], dim=1), kept
