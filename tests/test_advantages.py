"""Advantage estimators against hand-worked groups and a float64 reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from r1lab.train.advantages import ADVANTAGES, get_advantage, grpo, rloo, zero_variance_groups

nan = math.nan


def test_grpo_normalises_within_each_group_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    adv = grpo(r, eps=0.0)
    # mean 0.5, unbiased std sqrt((4 * 0.25) / 3)
    a = 0.5 / math.sqrt(1 / 3)
    assert torch.allclose(adv[0], torch.tensor([a, -a, -a, a], dtype=torch.float64))
    assert torch.equal(adv[1], torch.zeros(4, dtype=torch.float64))  # equal rewards: no signal


def test_dr_grpo_drops_the_std_division():
    r = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    assert torch.equal(grpo(r, scale=False), torch.tensor([[1.0, -1.0]], dtype=torch.float64))


def test_unjudged_rewards_get_zero_advantage_and_are_left_out_of_the_statistics():
    r = torch.tensor([[1.0, nan, 0.0]], dtype=torch.float64)
    adv = grpo(r, scale=False)
    assert adv.tolist() == [[0.5, 0.0, -0.5]]


def test_rloo_subtracts_the_mean_of_the_others_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(rloo(r), torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]], dtype=torch.float64))


@pytest.mark.parametrize("name", list(ADVANTAGES))
def test_estimators_match_a_float64_loop_reference(name):
    rng = random.Random(0)
    rows = [[rng.choice([0.0, 0.1, 1.0, 1.1, nan]) for _ in range(6)] for _ in range(20)]
    got = get_advantage(name)(torch.tensor(rows, dtype=torch.float64), scale=True, eps=1e-4)
    for row, out in zip(rows, got.tolist()):
        judged = [x for x in row if not math.isnan(x)]
        n = len(judged)
        mean = sum(judged) / n if n else 0.0
        std = math.sqrt(sum((x - mean) ** 2 for x in judged) / (n - 1)) if n > 1 else 0.0
        for x, a in zip(row, out):
            if math.isnan(x):
                assert a == 0.0
            elif name == "grpo":
                assert abs(a - (x - mean) / (std + 1e-4)) < 1e-9
            else:  # rloo
                others = (sum(judged) - x) / (n - 1) if n > 1 else x
                assert abs(a - (x - others) / (std + 1e-4)) < 1e-9


def test_zero_variance_groups_are_found():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [nan, 2.0, nan], [0.5, nan, 0.5]])
    assert zero_variance_groups(r).tolist() == [True, False, True, True]


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(ValueError, match="grpo"):
        get_advantage("ppo-gae")
