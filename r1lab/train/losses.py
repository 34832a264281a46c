"""Policy losses, rollout corrections, KL estimators and loss aggregations for GRPO and its variants, each in a
small registry: a new variant is one function and one decorator, tested alone.

Per-token tensors are [N, T] (N completions, T completion positions) with a 0/1 `mask` for the real tokens the loss
covers. Every policy loss has one signature,

    loss(logp, old_logp, rollout_logp, adv, mask, settings) -> (per-token loss [N, T], {metric: per-token [N, T]})

where `logp` are the policy's log-probs (with gradient), `old_logp` the trainer's own log-probs of the policy that
sampled (pi_old, no gradient), `rollout_logp` the sampling engine's log-probs of the same tokens (mu), `adv` the
advantages [N] or [N, T], and `settings` anything with the loss's knobs as attributes (epsilon_low, epsilon_high: a
GRPOConfig). Metrics are per-token indicators or values that the trainer averages over the masked tokens.
A rollout correction reweights the per-token loss by how far the engine's probabilities were from the trainer's
(pi_old / mu), independently of the loss. An aggregation reduces per-token losses with denominators that can be
global (the whole rollout batch), so gradient accumulation over micro-batches equals one big batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

POLICY_LOSSES: dict[str, Callable] = {}
ROLLOUT_CORRECTIONS: dict[str, Callable] = {}
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
register_rollout_correction, get_rollout_correction = _registry(ROLLOUT_CORRECTIONS, "rollout correction")
register_kl, get_kl = _registry(KL_ESTIMATORS, "KL estimator")
register_aggregation, get_aggregation = _registry(AGGREGATIONS, "loss aggregation")


# ----------------------------------------------------------------------------- policy losses


def _per_token(adv: torch.Tensor) -> torch.Tensor:
    return adv[:, None] if adv.dim() == 1 else adv


def _clip_min(ratio: torch.Tensor, adv: torch.Tensor, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) and where the clipped term was taken."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - settings.epsilon_low, 1 + settings.epsilon_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).to(ratio.dtype)


@register_policy_loss("clip")
def clipped_surrogate(logp, old_logp, rollout_logp, adv, mask, settings):
    """PPO/GRPO's clipped surrogate with a per-token ratio rho = pi_theta / pi_old (DeepSeekMath eq. 3);
    epsilon_high > epsilon_low is DAPO's clip-higher."""
    loss, clipped = _clip_min(torch.exp(logp - old_logp), _per_token(adv), settings)
    return loss, {"clip_frac": clipped}


def sequence_ratio(logp, old_logp, mask) -> torch.Tensor:
    """GSPO's s_i = exp(mean over the sequence's tokens of log(pi_theta / pi_old)) [N, 1]."""
    return torch.exp(((logp - old_logp) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1))


@register_policy_loss("gspo")
def gspo(logp, old_logp, rollout_logp, adv, mask, settings):
    """GSPO (Qwen, 2025): one ratio per sequence, the geometric mean of its token ratios, clipped per sequence
    (epsilon about 3e-4 / 4e-4); every token of a sequence carries the sequence's loss, so a seq-mean
    aggregation gives mean_i min(s_i A_i, clip(s_i) A_i)."""
    s = sequence_ratio(logp, old_logp, mask)
    loss, clipped = _clip_min(s, _per_token(adv), settings)
    return loss.expand_as(logp), {"clip_frac": clipped.expand_as(logp)}


@register_policy_loss("gspo-token")
def gspo_token(logp, old_logp, rollout_logp, adv, mask, settings):
    """GSPO's token variant: s_it = sg[s_i] * pi_theta(y_t) / sg[pi_theta(y_t)], equal to s_i in value (so clipped
    per sequence) but with a gradient per token, which lets advantages vary along a sequence."""
    s = sequence_ratio(logp, old_logp, mask).detach() * torch.exp(logp - logp.detach())
    loss, clipped = _clip_min(s, _per_token(adv), settings)
    return loss, {"clip_frac": clipped}


@register_policy_loss("cispo")
def cispo(logp, old_logp, rollout_logp, adv, mask, settings):
    """CISPO (MiniMax-M1, 2025): sg[clip(rho, 1 - eps_low, 1 + eps_high)] * A * log pi_theta per token: the
    importance weight is clipped, but no token's gradient is dropped (PPO's clip zeroes it)."""
    ratio = torch.exp(logp - old_logp).detach()
    weight = ratio.clamp(1 - settings.epsilon_low, 1 + settings.epsilon_high)
    return -weight * _per_token(adv) * logp, {"clip_frac": (weight != ratio).to(logp.dtype)}


# ----------------------------------------------------------------------------- rollout correction


def token_is_ratio(old_logp, rollout_logp, mask) -> torch.Tensor:
    """pi_old / mu per token [N, T]: how much likelier the trainer found each sampled token than the engine did."""
    return torch.exp((old_logp - rollout_logp) * mask)


def sequence_is_ratio(old_logp, rollout_logp, mask) -> torch.Tensor:
    """pi_old / mu of each whole sequence (the product of its token ratios) [N, 1], as TRL computes it."""
    return torch.exp(((old_logp - rollout_logp) * mask).sum(1, keepdim=True))


@register_rollout_correction("none")
def no_correction(old_logp, rollout_logp, mask, settings):
    return torch.ones_like(old_logp)


@register_rollout_correction("token-truncate")
def token_truncate(old_logp, rollout_logp, mask, settings):
    """Truncated IS per token: min(pi_old / mu, C) with C = correction_high."""
    return token_is_ratio(old_logp, rollout_logp, mask).clamp(max=settings.correction_high)


@register_rollout_correction("sequence-truncate")
def sequence_truncate(old_logp, rollout_logp, mask, settings):
    """Truncated IS per sequence: min(prod_t pi_old / mu, C), the same weight on every token of the sequence."""
    return sequence_is_ratio(old_logp, rollout_logp, mask).clamp(max=settings.correction_high).expand_as(old_logp)


@register_rollout_correction("token-mask")
def token_mask(old_logp, rollout_logp, mask, settings):
    """Masked IS per token: tokens whose pi_old / mu leaves [correction_low, correction_high] get no loss."""
    r = token_is_ratio(old_logp, rollout_logp, mask)
    return ((r >= settings.correction_low) & (r <= settings.correction_high)).to(old_logp.dtype)


@register_rollout_correction("sequence-mask")
def sequence_mask(old_logp, rollout_logp, mask, settings):
    """Masked IS per sequence: sequences whose ratio leaves [correction_low, correction_high] get no loss."""
    r = sequence_is_ratio(old_logp, rollout_logp, mask)
    return ((r >= settings.correction_low) & (r <= settings.correction_high)).to(old_logp.dtype).expand_as(old_logp)


def mismatch(old_logp, rollout_logp, mask) -> dict[str, float]:
    """How far the rollout engine's log-probs were from the trainer's on the sampled tokens: the mean and max
    absolute difference, and KL(mu || pi_old) by the k3 estimator (non-negative, unbiased under mu's samples)."""
    m = mask.bool()
    if not m.any():
        return {"mismatch/logp_abs_diff_mean": 0.0, "mismatch/logp_abs_diff_max": 0.0, "mismatch/kl": 0.0}
    d = (old_logp - rollout_logp)[m].double()
    return {
        "mismatch/logp_abs_diff_mean": d.abs().mean().item(),
        "mismatch/logp_abs_diff_max": d.abs().max().item(),
        "mismatch/kl": (torch.exp(d) - d - 1).mean().item(),
    }


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
def constant_norm(
    loss: torch.Tensor, mask: torch.Tensor, n_tokens: float, n_seqs: float, max_tokens: int
) -> torch.Tensor:
    """Dr. GRPO: sum over tokens divided by a constant (sequences x max new tokens), no length normalisation."""
    return (loss * mask).sum() / (n_seqs * max_tokens)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)
