"""Advantage estimators for group-sampled RL, in one registry: a new variant is one function and one decorator.

Each takes rewards [P, G] (P prompts, G completions each; NaN marks a completion no reward could judge) and
returns advantages [P, G], one per completion, broadcast over its tokens by the loss. NaN rewards get
advantage 0, so unjudged samples neither push nor pull.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str):
    def deco(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return deco


def get_advantage(name: str) -> AdvantageFn:
    try:
        return ADVANTAGES[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {', '.join(ADVANTAGES)}") from None


def _group_stats(r: torch.Tensor):
    """Mean and (unbiased, as in TRL and DeepSeekMath's code) std over the judged members of each group."""
    valid = ~torch.isnan(r)
    n = valid.sum(1, keepdim=True).clamp(min=1)
    x = torch.where(valid, r, torch.zeros_like(r))
    mean = x.sum(1, keepdim=True) / n
    var = (torch.where(valid, r - mean, torch.zeros_like(r)) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    return mean, var.sqrt(), valid


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (DeepSeekMath eq. 3 outcome supervision): (r - mean(group)) / std(group); `scale=False` is Dr. GRPO's
    unscaled r - mean(group), which removes the bias toward groups with low reward variance."""
    mean, std, valid = _group_stats(rewards)
    adv = rewards - mean
    if scale:  # a group of equal rewards has adv 0 already; never divide 0 by 0
        adv = torch.where(std + eps > 0, adv / (std + eps), torch.zeros_like(adv))
    return torch.where(valid, adv, torch.zeros_like(adv))


@register_advantage("rloo")
def rloo(rewards: torch.Tensor, scale: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """REINFORCE leave-one-out: r_i minus the mean of the other members of the group (Ahmadian et al., 2024)."""
    valid = ~torch.isnan(rewards)
    n = valid.sum(1, keepdim=True)
    x = torch.where(valid, rewards, torch.zeros_like(rewards))
    others = (x.sum(1, keepdim=True) - x) / (n - 1).clamp(min=1)
    adv = torch.where(n > 1, x - others, torch.zeros_like(x))
    if scale:
        std = _group_stats(rewards)[1]
        adv = torch.where(std + eps > 0, adv / (std + eps), torch.zeros_like(adv))
    return torch.where(valid, adv, torch.zeros_like(adv))


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P] bool: groups whose judged rewards are all equal (they carry no learning signal; DAPO drops them)."""
    valid = ~torch.isnan(rewards)
    hi = torch.where(valid, rewards, torch.full_like(rewards, -torch.inf)).max(1).values
    lo = torch.where(valid, rewards, torch.full_like(rewards, torch.inf)).min(1).values
    return (hi - lo <= 0) | (valid.sum(1) < 2)
