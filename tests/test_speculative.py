"""Speculative sampling keeps the main model's distribution exactly: emitted tokens follow p whatever the draft
distribution q, the second token of a kept draft follows p's next distribution, greedy rows keep a draft exactly
when it is the argmax, and truncation (top-p, top-k) applies to both."""

from __future__ import annotations

import torch

from r1lab.speculative import draw, sampling_distribution, verify

N = 400_000  # rows simulated at once: each is one independent speculative step


def _simulate(p, p_next, q, seed=0):
    g = torch.Generator().manual_seed(seed)
    drafted = draw(q.expand(N, -1), torch.rand(N, generator=g))
    tokens, kept = verify(
        p.expand(N, -1), p_next.expand(N, -1), q.expand(N, -1), drafted, torch.rand(N, 3, generator=g)
    )
    return tokens, kept, drafted


def test_emitted_tokens_follow_the_main_models_distribution_whatever_the_draft():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    p_next = torch.softmax(torch.randn(6, generator=g), 0)
    for q in (torch.softmax(torch.randn(6, generator=g) * 2, 0), p.clone(), torch.full((6,), 1 / 6)):
        tokens, kept, _ = _simulate(p, p_next, q)
        first = torch.bincount(tokens[:, 0], minlength=6).double() / N
        assert (first - p).abs().max() < 0.004, (first, p)  # 3-4 standard errors at N = 400k
        second = torch.bincount(tokens[kept, 1], minlength=6).double() / kept.sum()
        assert (second - p_next).abs().max() < 0.006
        # the acceptance rate is sum_x min(p(x), q(x)) (1 minus the total variation distance)
        assert abs(kept.double().mean() - torch.minimum(p, q).sum()) < 0.004


def test_truncation_applies_to_what_is_drawn_and_what_is_verified():
    logits = torch.tensor([[2.0, 1.5, 0.2, -1.0, -3.0]])
    p = sampling_distribution(logits, torch.tensor([0.7]), torch.tensor([0.8]), torch.tensor([0]))[0]
    assert p[3] == 0 and p[4] == 0 and abs(p.sum() - 1) < 1e-6  # outside the nucleus: never drawn
    q = sampling_distribution(logits * 0.3, torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([2]))[0]
    assert (q > 0).sum() == 2  # top-k 2
    tokens, _, _ = _simulate(p, p, q)
    first = torch.bincount(tokens[:, 0], minlength=5).double() / N
    assert (first - p).abs().max() < 0.004 and first[3] == 0 and first[4] == 0


def test_greedy_rows_keep_a_draft_exactly_when_it_is_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [0.1, 3.0, 0.2], [2.0, 0.0, 1.0]])
    zero = torch.zeros(3)
    p = sampling_distribution(logits, zero, torch.ones(3), torch.zeros(3, dtype=torch.long))
    p_next = sampling_distribution(logits.flip(1), zero, torch.ones(3), torch.zeros(3, dtype=torch.long))
    drafted = torch.tensor([1, 2, 0])
    q = torch.nn.functional.one_hot(drafted, 3).float()
    tokens, kept = verify(p, p_next, q, drafted, torch.rand(3, 3))
    assert kept.tolist() == [True, False, True]
    assert tokens[:, 0].tolist() == [1, 1, 0] and tokens[kept, 1].tolist() == [1, 2]  # argmaxes, like greedy
