"""Policy losses, KL estimators and loss aggregations for GRPO and its variants, each in a small registry.

Per-token tensors are [N, T] (N completions, T completion positions) with a 0/1 `mask` for real tokens.
A policy loss returns per-token losses; an aggregation reduces them with denominators that can be global
(the whole rollout batch), so gradient accumulation over micro-batches equals one big batch.
"""

from __future__ import annotations

from typing import Callable

import torch

POLICY_LOSSES: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
AGGREGATIONS: dict[str, Callable] = {}


def _registry(table: dict, kind: str):
    def register(name: str):
        def deco(fn):
            table[name] = fn
            return fn
        return deco

    def get(name: str):
        try:
            return table[name]
        except KeyError:
            raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(table)}") from None

    return register, get


register_policy_loss, get_policy_loss = _registry(POLICY_LOSSES, "policy loss")
register_kl, get_kl = _registry(KL_ESTIMATORS, "KL estimator")
register_aggregation, get_aggregation = _registry(AGGREGATIONS, "loss aggregation")


# ----------------------------------------------------------------------------- policy losses


@register_policy_loss("clip")
def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float = 0.2,
                      eps_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) per token, rho = pi_theta / pi_old.
    eps_high > eps_low is DAPO's clip-higher. adv is [N] (broadcast over tokens) or [N, T].
    Returns (per-token loss, per-token 'was clipped' indicator)."""
    if adv.dim() == 1:
        adv = adv[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).to(logp.dtype)


# ----------------------------------------------------------------------------- KL to the reference policy


@register_kl("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3, unbiased and non-negative: pi_ref/pi - log(pi_ref/pi) - 1 (DeepSeekMath eq. 4)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@register_kl("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The naive estimator log(pi / pi_ref)."""
    return logp - ref_logp


@register_kl("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """0.5 * (log(pi / pi_ref))^2: low variance, biased."""
    return 0.5 * (logp - ref_logp) ** 2


# ----------------------------------------------------------------------------- aggregation


@register_aggregation("token-mean")
def token_mean(loss: torch.Tensor, mask: torch.Tensor, n_tokens: float, n_seqs: float, max_tokens: int) -> torch.Tensor:
    """DAPO's token-level loss: every token of the batch weighs the same (long answers are not diluted)."""
    return (loss * mask).sum() / n_tokens


@register_aggregation("seq-mean")
def seq_mean(loss: torch.Tensor, mask: torch.Tensor, n_tokens: float, n_seqs: float, max_tokens: int) -> torch.Tensor:
    """Original GRPO: mean over each sequence's tokens, then mean over sequences."""
    per_seq = (loss * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_seq.sum() / n_seqs


@register_aggregation("drgrpo")
def constant_norm(loss: torch.Tensor, mask: torch.Tensor, n_tokens: float, n_seqs: float, max_tokens: int) -> torch.Tensor:
    """Dr. GRPO: sum over tokens divided by a constant (sequences x max new tokens), no length normalisation."""
    return (loss * mask).sum() / (n_seqs * max_tokens)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)
