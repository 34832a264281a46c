"""Policy losses, KL estimators and aggregations against hand-worked values and float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from r1lab.train import losses as L


def test_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]], dtype=torch.float64))
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, clipped = L.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.2)
    # rho=1.5,A=1: min(1.5, 1.2)=1.2 clipped | rho=.5,A=1: min(.5,.8)=.5 | rho=.5,A=-1: min(-.5,-.8)=-.8 clipped
    # rho=1.5,A=-1: min(-1.5,-1.2)=-1.5 (the pessimistic side is never clipped)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, 0.8, 1.5]], dtype=torch.float64))
    assert clipped.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_clip_higher_raises_only_the_upper_bound():
    logp = torch.log(torch.tensor([[1.5, 0.5]], dtype=torch.float64))
    loss, _ = L.clipped_surrogate(logp, torch.zeros_like(logp), torch.tensor([1.0]), eps_low=0.2, eps_high=0.28)
    assert torch.allclose(loss, torch.tensor([[-1.28, -0.5]], dtype=torch.float64))


def test_surrogate_and_its_gradient_match_a_float64_reference():
    torch.manual_seed(0)
    logp = (torch.randn(5, 7, dtype=torch.float64) * 0.3).requires_grad_()
    old = torch.randn(5, 7, dtype=torch.float64) * 0.3
    adv = torch.randn(5, dtype=torch.float64)
    loss, _ = L.clipped_surrogate(logp, old, adv, 0.2, 0.3)
    loss.sum().backward()
    for i in range(5):
        for t in range(7):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            ref = -min(rho * a, min(max(rho, 0.8), 1.3) * a)
            assert abs(loss[i, t].item() - ref) < 1e-12
            # d/dlogp: -rho*A when the unclipped term is the min, else 0 (clipped: constant)
            unclipped_is_min = rho * a <= min(max(rho, 0.8), 1.3) * a
            expect = -rho * a if unclipped_is_min else 0.0
            assert abs(logp.grad[i, t].item() - expect) < 1e-12


def test_k3_is_zero_at_equality_nonnegative_and_unbiased_for_kl():
    assert L.kl_k3(torch.tensor([0.3]), torch.tensor([0.3])).item() == 0.0
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    exact = (p * (p.log() - q.log())).sum().item()          # KL(p || q), p = policy, q = reference
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    k3 = L.kl_k3(p.log()[tokens], q.log()[tokens])
    assert (k3 >= 0).all()
    assert abs(k3.mean().item() - exact) < 0.01 * max(exact, 0.05)
    k1 = L.kl_k1(p.log()[tokens], q.log()[tokens])
    assert abs(k1.mean().item() - exact) < 0.02 * max(exact, 0.05)


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert L.token_mean(loss, mask, n_tokens=3, n_seqs=2, max_tokens=3).item() == pytest.approx(6 / 3)
    assert L.seq_mean(loss, mask, n_tokens=3, n_seqs=2, max_tokens=3).item() == pytest.approx((2 + 2) / 2)
    assert L.constant_norm(loss, mask, n_tokens=3, n_seqs=2, max_tokens=3).item() == pytest.approx(6 / 6)


@pytest.mark.parametrize("agg", list(L.AGGREGATIONS))
def test_micro_batches_with_global_denominators_sum_to_the_full_batch(agg):
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    fn = L.get_aggregation(agg)
    full = fn(loss, mask, mask.sum(), 6, 5)
    parts = sum(fn(loss * m, mask * m, mask.sum(), 6, 5) for m in
                (torch.tensor([1, 1, 0, 0, 0, 0.])[:, None], torch.tensor([0, 0, 1, 1, 1, 1.])[:, None]))
    assert torch.allclose(full, parts)


def test_registries_name_their_choices():
    with pytest.raises(ValueError, match="token-mean"):
        L.get_aggregation("sum")
    with pytest.raises(ValueError, match="k3"):
        L.get_kl("k4")
