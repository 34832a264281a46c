"""Policy losses, rollout corrections, KL estimators and aggregations against hand-worked values, float64 loops,
and TRL's own GRPO loss code run on identical tensors."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from r1lab.train import losses


def knobs(eps_low=0.2, eps_high=0.2, low=0.5, high=2.0):
    return SimpleNamespace(epsilon_low=eps_low, epsilon_high=eps_high, correction_low=low, correction_high=high)


def call(name, logp, old, adv, mask=None, rollout=None, settings=None):
    mask = torch.ones_like(logp) if mask is None else mask
    rollout = old if rollout is None else rollout
    return losses.get_policy_loss(name)(logp, old, rollout, adv, mask, settings or knobs())


# ----------------------------------------------------------------------------- hand-worked


def test_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]], dtype=torch.float64))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, m = call("clip", logp, torch.zeros_like(logp), adv)
    # rho=1.5,A=1: min(1.5, 1.2)=1.2 clipped | rho=.5,A=1: min(.5,.8)=.5 | rho=.5,A=-1: min(-.5,-.8)=-.8 clipped
    # rho=1.5,A=-1: min(-1.5,-1.2)=-1.5 (the pessimistic side is never clipped)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, 0.8, 1.5]], dtype=torch.float64))
    assert m["clip_frac"].tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_clip_higher_raises_only_the_upper_bound():
    logp = torch.log(torch.tensor([[1.5, 0.5]], dtype=torch.float64))
    loss, _ = call("clip", logp, torch.zeros_like(logp), torch.tensor([1.0]), settings=knobs(0.2, 0.28))
    assert torch.allclose(loss, torch.tensor([[-1.28, -0.5]], dtype=torch.float64))


def test_gspo_clips_the_geometric_mean_of_a_sequence_by_hand():
    # sequence 0: token ratios 2 and 0.5 (geometric mean 1, inside the clip); sequence 1: ratios 1.5 and 1.5 over
    # two real tokens and a padded third (mean 1.5, clipped at 1 + 0.0004 for A > 0)
    ratios = torch.tensor([[2.0, 0.5, 1.0], [1.5, 1.5, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, m = call(
        "gspo",
        ratios.log(),
        torch.zeros_like(ratios),
        torch.tensor([2.0, 1.0], dtype=torch.float64),
        mask=mask,
        settings=knobs(3e-4, 4e-4),
    )
    assert torch.allclose(loss[0], torch.full((3,), -2.0, dtype=torch.float64))  # -s * A = -1 * 2
    assert torch.allclose(loss[1], torch.full((3,), -1.0004, dtype=torch.float64))  # -clip(1.5) * 1
    assert m["clip_frac"][:, 0].tolist() == [0.0, 1.0]


def test_gspo_token_equals_gspo_in_value_and_in_gradient_for_sequence_advantages():
    torch.manual_seed(0)
    logp = (torch.randn(4, 6, dtype=torch.float64) * 0.01).requires_grad_()
    old = torch.randn(4, 6, dtype=torch.float64) * 0.01
    mask = (torch.rand(4, 6) > 0.2).double()
    adv = torch.randn(4, dtype=torch.float64)
    a, _ = call("gspo", logp, old, adv, mask=mask, settings=knobs(3e-4, 4e-4))
    b, _ = call("gspo-token", logp, old, adv, mask=mask, settings=knobs(3e-4, 4e-4))
    assert torch.allclose(a, b)
    seq_mean = lambda x: ((x * mask).sum(1) / mask.sum(1)).sum()  # noqa: E731
    (ga,) = torch.autograd.grad(seq_mean(a), logp)
    (gb,) = torch.autograd.grad(seq_mean(b), logp)
    assert torch.allclose(ga, gb)


def test_cispo_clips_the_weight_and_keeps_every_tokens_gradient_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0], dtype=torch.float64)
    loss, m = call("cispo", logp, torch.zeros(1, 3, dtype=torch.float64), adv, settings=knobs(1.0, 0.2))
    # weights sg[clip(rho, 0, 1.2)] = 1.2, 0.5, 1.0: loss = -w * A * log pi
    assert torch.allclose(loss, -torch.tensor([[1.2, 0.5, 1.0]], dtype=torch.float64) * logp.detach())
    assert m["clip_frac"].tolist() == [[1.0, 0.0, 0.0]]
    loss.sum().backward()
    assert torch.allclose(logp.grad, -torch.tensor([[1.2, 0.5, 1.0]], dtype=torch.float64))  # none is zero
    clip_logp = torch.log(torch.tensor([[1.5]], dtype=torch.float64)).requires_grad_()
    clip_loss, _ = call("clip", clip_logp, torch.zeros(1, 1, dtype=torch.float64), adv)
    clip_loss.sum().backward()
    assert clip_logp.grad.item() == 0.0  # where PPO's clip drops the token, CISPO keeps it


# ----------------------------------------------------------------------------- float64 references


def test_surrogate_and_its_gradient_match_a_float64_reference():
    torch.manual_seed(0)
    logp = (torch.randn(5, 7, dtype=torch.float64) * 0.3).requires_grad_()
    old = torch.randn(5, 7, dtype=torch.float64) * 0.3
    adv = torch.randn(5, dtype=torch.float64)
    loss, _ = call("clip", logp, old, adv, settings=knobs(0.2, 0.3))
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


def test_gspo_and_its_gradient_match_a_float64_loop():
    torch.manual_seed(1)
    N, T = 4, 5
    logp = (torch.randn(N, T, dtype=torch.float64) * 0.02).requires_grad_()
    old = torch.randn(N, T, dtype=torch.float64) * 0.02
    mask = torch.ones(N, T, dtype=torch.float64)
    mask[1, 3:] = 0
    adv = torch.randn(N, dtype=torch.float64)
    lo, hi = 3e-4, 4e-4
    loss, _ = call("gspo", logp, old, adv, mask=mask, settings=knobs(lo, hi))
    objective = ((loss * mask).sum(1) / mask.sum(1)).sum()
    objective.backward()
    for i in range(N):
        n = int(mask[i].sum())
        mean_log = sum(logp[i, t].item() - old[i, t].item() for t in range(n)) / n
        s = math.exp(mean_log)
        a = adv[i].item()
        unclipped_is_min = s * a <= min(max(s, 1 - lo), 1 + hi) * a
        assert abs(loss[i, 0].item() + min(s * a, min(max(s, 1 - lo), 1 + hi) * a)) < 1e-12
        for t in range(T):  # d(-s A)/d logp_t = -A s / n on the sequence's real tokens, when unclipped
            expect = -a * s / n if unclipped_is_min and t < n else 0.0
            assert abs(logp.grad[i, t].item() - expect) < 1e-12


def test_cispo_gradient_matches_a_float64_reference():
    torch.manual_seed(2)
    logp = (torch.randn(3, 4, dtype=torch.float64) * 0.4).requires_grad_()
    old = torch.randn(3, 4, dtype=torch.float64) * 0.4
    adv = torch.randn(3, 4, dtype=torch.float64)  # token-level advantages work too
    loss, _ = call("cispo", logp, old, adv, settings=knobs(0.5, 0.3))
    loss.sum().backward()
    for i in range(3):
        for t in range(4):
            w = min(max(math.exp(logp[i, t].item() - old[i, t].item()), 0.5), 1.3)
            assert abs(loss[i, t].item() + w * adv[i, t].item() * logp[i, t].item()) < 1e-12
            assert abs(logp.grad[i, t].item() + w * adv[i, t].item()) < 1e-12


@pytest.mark.parametrize("name", ["token-truncate", "token-mask", "sequence-truncate", "sequence-mask"])
def test_rollout_corrections_match_a_float64_loop(name):
    torch.manual_seed(3)
    old = torch.randn(5, 6, dtype=torch.float64) * 0.5
    rollout = old + torch.randn(5, 6, dtype=torch.float64) * 0.6
    mask = (torch.rand(5, 6) > 0.25).double()
    mask[:, 0] = 1
    w = losses.get_rollout_correction(name)(old, rollout, mask, knobs(low=0.6, high=1.8))
    for i in range(5):
        real = [t for t in range(6) if mask[i, t]]
        seq = math.exp(sum(old[i, t].item() - rollout[i, t].item() for t in real))
        for t in real:
            tok = math.exp(old[i, t].item() - rollout[i, t].item())
            r = seq if name.startswith("sequence") else tok
            expect = min(r, 1.8) if name.endswith("truncate") else float(0.6 <= r <= 1.8)
            assert abs(w[i, t].item() - expect) < 1e-12, (i, t)


def test_no_correction_and_the_mismatch_of_identical_log_probs():
    old = torch.randn(3, 4)
    assert torch.equal(losses.get_rollout_correction("none")(old, old + 1, torch.ones(3, 4), knobs()), torch.ones(3, 4))
    assert losses.mismatch(old, old, torch.ones(3, 4)) == {
        "mismatch/logp_abs_diff_mean": 0.0,
        "mismatch/logp_abs_diff_max": 0.0,
        "mismatch/kl": 0.0,
    }
    m = losses.mismatch(
        torch.zeros(1, 2, dtype=torch.float64),
        torch.tensor([[0.1, -0.3]], dtype=torch.float64),
        torch.tensor([[1.0, 1.0]]),
    )
    assert m["mismatch/logp_abs_diff_mean"] == pytest.approx(0.2) and m["mismatch/logp_abs_diff_max"] == 0.3
    assert m["mismatch/kl"] == pytest.approx(((math.exp(-0.1) + 0.1 - 1) + (math.exp(0.3) - 0.3 - 1)) / 2)


# ----------------------------------------------------------------------------- TRL's own implementation


def trl_loss(logp, old, adv, mask, *, loss_type, level="token", eps_low=0.2, eps_high=0.2, max_len=None, is_ratio=None):
    """TRL's GRPOTrainer._compute_loss on these tensors: its model forward replaced by `logp` (so the
    log-probabilities are identical), everything after it TRL's code."""
    trl = pytest.importorskip("trl")
    trainer = object.__new__(trl.GRPOTrainer)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    settings = dict(
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None,
        max_completion_length=max_len,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x, num_processes=1),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
    )
    for k, v in settings.items():
        setattr(trainer, k, v)
    n = logp.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1),
        "completion_ids": torch.zeros_like(logp, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return trainer._compute_loss(None, inputs)


CASES = {  # r1lab (policy loss, aggregation, knobs) -> TRL (loss_type, importance level, eps_low, eps_high)
    "grpo": (("clip", "seq-mean", knobs(0.2, 0.28)), dict(loss_type="grpo", eps_low=0.2, eps_high=0.28)),
    "dapo": (("clip", "token-mean", knobs(0.2, 0.28)), dict(loss_type="dapo", eps_low=0.2, eps_high=0.28)),
    "dr_grpo": (("clip", "drgrpo", knobs(0.2, 0.2)), dict(loss_type="dr_grpo")),
    "gspo": (
        ("gspo", "seq-mean", knobs(3e-4, 4e-4)),
        dict(loss_type="grpo", level="sequence", eps_low=3e-4, eps_high=4e-4),
    ),
    # TRL's CISPO clamps the ratio from above at epsilon_high (an absolute bound, no lower one): r1lab's
    # clip(rho, 1 - eps_low, 1 + eps_high) with eps_low = 1 is the same weight
    "cispo": (("cispo", "token-mean", knobs(1.0, 0.25)), dict(loss_type="cispo", eps_high=1.25)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_objectives_equal_trls_implementation_on_identical_tensors(case):
    (name, agg, settings), trl_args = CASES[case]
    torch.manual_seed(4)
    N, T = 6, 7
    base = torch.randn(N, T) * 0.3
    old = base + torch.randn(N, T) * (0.01 if name == "gspo" else 0.3)
    mask = (torch.rand(N, T) > 0.2).float()
    mask[:, 0] = 1
    adv = torch.randn(N)
    ours_lp = base.clone().requires_grad_()
    loss_tok, _ = losses.get_policy_loss(name)(ours_lp, old, old, adv, mask, settings)
    ours = losses.get_aggregation(agg)(loss_tok, mask, mask.sum(), N, T)
    ours.backward()
    trl_lp = base.clone().requires_grad_()
    theirs = trl_loss(trl_lp, old, adv, mask, max_len=T, **trl_args)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(ours_lp.grad, trl_lp.grad, atol=1e-6)


@pytest.mark.parametrize("mode", ["token-truncate", "token-mask", "sequence-truncate", "sequence-mask"])
def test_rollout_correction_weights_the_loss_as_trls_vllm_importance_sampling_does(mode):
    """TRL multiplies the per-token loss by its vLLM importance-sampling ratio (computed from the same two sets of
    log-probs, in the same four modes); r1lab's correction, given the same weights, gives its loss and gradient."""
    torch.manual_seed(5)
    N, T = 5, 6
    base = torch.randn(N, T) * 0.3
    rollout = base + torch.randn(N, T) * 0.4
    mask = torch.ones(N, T)
    mask[2, 4:] = 0
    adv = torch.randn(N)
    weight = losses.get_rollout_correction(mode)(base, rollout, mask, knobs(low=0.5, high=2.0))
    ours_lp = base.clone().requires_grad_()
    loss_tok, _ = losses.get_policy_loss("clip")(ours_lp, base, rollout, adv, mask, knobs())
    ours = losses.get_aggregation("seq-mean")(loss_tok * weight, mask, mask.sum(), N, T)
    ours.backward()
    trl_lp = base.clone().requires_grad_()
    is_ratio = weight[:, :1] if mode.startswith("sequence") else weight
    theirs = trl_loss(trl_lp, base, adv, mask, loss_type="grpo", is_ratio=is_ratio)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(ours_lp.grad, trl_lp.grad, atol=1e-6)


# ----------------------------------------------------------------------------- KL and aggregation


def test_k3_is_zero_at_equality_nonnegative_and_unbiased_for_kl():
    assert losses.kl_k3(torch.tensor([0.3]), torch.tensor([0.3])).item() == 0.0
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    exact = (p * (p.log() - q.log())).sum().item()  # KL(p || q), p = policy, q = reference
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    k3 = losses.kl_k3(p.log()[tokens], q.log()[tokens])
    assert (k3 >= 0).all()
    assert abs(k3.mean().item() - exact) < 0.01 * max(exact, 0.05)
    k1 = losses.kl_k1(p.log()[tokens], q.log()[tokens])
    assert abs(k1.mean().item() - exact) < 0.02 * max(exact, 0.05)


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert losses.token_mean(loss, mask, n_tokens=3, n_seqs=2, max_tokens=3).item() == pytest.approx(6 / 3)
    assert losses.seq_mean(loss, mask, n_tokens=3, n_seqs=2, max_tokens=3).item() == pytest.approx((2 + 2) / 2)
    assert losses.constant_norm(loss, mask, n_tokens=3, n_seqs=2, max_tokens=3).item() == pytest.approx(6 / 6)


@pytest.mark.parametrize("agg", list(losses.AGGREGATIONS))
def test_micro_batches_with_global_denominators_sum_to_the_full_batch(agg):
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    fn = losses.get_aggregation(agg)
    full = fn(loss, mask, mask.sum(), 6, 5)
    parts = sum(
        fn(loss * m, mask * m, mask.sum(), 6, 5)
        for m in (torch.tensor([1, 1, 0, 0, 0, 0.0])[:, None], torch.tensor([0, 0, 1, 1, 1, 1.0])[:, None])
    )
    assert torch.allclose(full, parts)


def test_registries_name_their_choices():
    with pytest.raises(ValueError, match="token-mean"):
        losses.get_aggregation("sum")
    with pytest.raises(ValueError, match="k3"):
        losses.get_kl("k4")
    with pytest.raises(ValueError, match="gspo.*cispo"):
        losses.get_policy_loss("ppo2")
    with pytest.raises(ValueError, match="token-truncate"):
        losses.get_rollout_correction("clip")


def test_on_the_first_pass_clip_gspo_and_cispo_take_the_same_gradient():
    """With pi_old the policy's own first-pass log-probs, every ratio is 1: the clip never binds and the three
    objectives (seq-mean) reduce to the same policy gradient, -A mean_t grad log pi. They part only from the
    second update on a batch (mu > 1), which is what bench/objectives.py compares."""
    torch.manual_seed(6)
    base = torch.randn(5, 6, dtype=torch.float64) * 0.4
    mask = torch.ones(5, 6, dtype=torch.float64)
    mask[1, 4:] = 0
    adv = torch.randn(5, dtype=torch.float64)
    grads = {}
    for name, settings in (("clip", knobs()), ("gspo", knobs(3e-4, 4e-4)), ("cispo", knobs(1.0, 4.0))):
        logp = base.clone().requires_grad_()
        loss, _ = losses.get_policy_loss(name)(logp, logp.detach(), logp.detach(), adv, mask, settings)
        losses.seq_mean(loss, mask, mask.sum(), 5, 6).backward()
        grads[name] = logp.grad
    assert torch.allclose(grads["clip"], grads["gspo"]) and torch.allclose(grads["clip"], grads["cispo"])
    expect = -(adv[:, None] * mask / mask.sum(1, keepdim=True)) / 5
    assert torch.allclose(grads["clip"], expect)
