"""The GRPO trainer: shared-prefix layouts equal plain forwards, sampler log-probs serve as the old policy, updates
accumulate exactly, the variants do what they say, resume continues exactly, and the reward goes up."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import transformers
from conftest import grpo_interrupted_at

from r1lab.model.load import load_model_and_tokenizer
from r1lab.train import grpo as GR
from r1lab.train import logprobs
from r1lab.train.run import read_metrics

transformers.logging.set_verbosity_error()


def _plain_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def _groups():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 250, (n,), generator=g).tolist() for n in (7, 4, 9)]
    comps = [[torch.randint(5, 250, (m,), generator=g).tolist() for m in ms] for ms in ((3, 5), (1, 6), (4, 2))]
    return prompts, comps


@pytest.mark.parametrize("which", ["native", "native-grouped", "qwen2"])
@pytest.mark.parametrize("max_tokens", [12, 4096])  # many micro-batches, one micro-batch
def test_shared_prefix_logprobs_equal_plain_forwards(which, max_tokens, tiny_native_dir, tiny_tokenizer):
    if which.startswith("native"):
        model, _ = load_model_and_tokenizer(tiny_native_dir)
    else:
        cfg = transformers.Qwen2Config(
            vocab_size=len(tiny_tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.3,
        )
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(cfg).eval()
    prompts, comps = _groups()
    layouts = (
        logprobs.grouped_batches(prompts, comps, max_tokens, pad_id=0)
        if which == "native-grouped"
        else logprobs.packed_rows(prompts, comps, max_tokens, pad_id=0)
    )
    got = torch.zeros(6, 6)
    with torch.no_grad():
        for lay in layouts:
            lp, _ = logprobs.token_logprobs(model, lay, temperature=0.7)
            got += logprobs.to_matrix(lp, lay, (6, 6))
    for gi, (p, cs) in enumerate(zip(prompts, comps)):
        for j, c in enumerate(cs):
            ref = _plain_logprobs(model, p, c, 0.7)
            assert torch.allclose(got[gi * 2 + j, : len(c)], ref, atol=1e-4), (gi, j)
    if max_tokens == 4096:
        assert len(layouts) == 1 and layouts[0].n_tokens == sum(
            len(p) + sum(map(len, cs)) for p, cs in zip(prompts, comps)
        )


def _write_reward(tmp_path, body):
    f = tmp_path / "my_reward.py"
    f.write_text(textwrap.dedent(body))
    return f


def _cfg(tmp_path, model_dir, **kw):
    base = dict(
        out=str(tmp_path / "grpo"),
        model=str(model_dir),
        steps=3,
        prompts_per_step=3,
        num_generations=4,
        max_new_tokens=8,
        template="r1",
        bf16=False,
        save_every=2,
        eval_problems=4,
        task_args={"arithmetic": {"max_digits": 1}},
    )
    base.update(kw)
    return GR.GRPOConfig(**base)


def test_sampler_logprobs_are_the_old_policy(tiny_native_dir, tmp_path):
    """At the first update nothing has changed yet: the training forward reproduces the sampler's log-probs,
    so the ratio starts at 1 and no extra forward pass is needed."""
    t = GR.GRPOTrainer(_cfg(tmp_path, tiny_native_dir), progress=False)
    ro = t.rollout(0)
    layouts = logprobs.packed_rows(ro.prompt_ids, [[c.token_ids for c in g] for g in ro.completions], 4096, 0)
    with torch.no_grad():
        for lay in layouts:
            lp, _ = logprobs.token_logprobs(t.model, lay, t.cfg.temperature)
            for v, n, i in zip(lp.tolist(), lay.seq.tolist(), lay.pos.tolist()):
                assert abs(v - ro.flat[n].logprobs[i]) < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_transformers_models_sample_and_train_on_the_path_that_fits_them(
    family, tiny_llama_dir, tiny_gpt2_dir, tmp_path
):
    """Llama-family models run on FastDecoder (r1lab's cache, grouped layout), others on their own forward (packed
    rows); either way the first update's training forward reproduces the sampler's log-probs."""
    from r1lab.model.llama import FastDecoder
    from r1lab.sampler import HFBackend

    reward = _write_reward(
        tmp_path,
        """
        def share(completions, completion_ids, **kw):  # spread inside every group, so the update is not zero
            return [sum(t % 3 == 0 for t in ids) / len(ids) for ids in completion_ids]
    """,
    )
    t = GR.GRPOTrainer(
        _cfg(
            tmp_path,
            tiny_llama_dir if family == "llama" else tiny_gpt2_dir,
            rewards=[f"{reward}:share"],
            reward_weights=[1.0],
        ),
        progress=False,
    )
    assert t.grouped == (family == "llama")
    assert (
        isinstance(t.sampler.backend.model, FastDecoder)
        if family == "llama"
        else isinstance(t.sampler.backend, HFBackend)
    )
    ro = t.rollout(0)
    layouts = t.layouts(ro.prompt_ids, [[c.token_ids for c in g] for g in ro.completions])
    assert all(isinstance(lay, logprobs.GroupedBatch if family == "llama" else logprobs.PackedRows) for lay in layouts)
    with torch.no_grad():
        for lay in layouts:
            lp, _ = t.policy(lay, t.cfg.temperature)
            for v, n, i in zip(lp.tolist(), lay.seq.tolist(), lay.pos.tolist()):
                assert abs(v - ro.flat[n].logprobs[i]) < 1e-4
    before = [p.detach().clone() for p in t.model.parameters()]
    stats = t.update(ro, lr=1e-2)
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_gradient_accumulation_equals_one_batch(tiny_native_dir, tmp_path):
    grads = []
    for mb in (8, 100_000):
        torch.manual_seed(0)
        t = GR.GRPOTrainer(
            _cfg(tmp_path / str(mb), tiny_native_dir, micro_batch_tokens=mb, loss_agg="token-mean"), progress=False
        )
        ro = t.rollout(0)
        t.opt.step = lambda: None  # keep the weights; look at the gradient
        t.opt.zero_grad = lambda set_to_none=True: None
        t.update(ro, lr=0.0)
        grads.append(torch.cat([p.grad.flatten() for p in t.model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_reference_model_only_when_beta_is_positive(tiny_native_dir, tmp_path):
    assert GR.GRPOTrainer(_cfg(tmp_path / "a", tiny_native_dir), progress=False).ref is None
    t = GR.GRPOTrainer(_cfg(tmp_path / "b", tiny_native_dir, beta=0.04), progress=False)
    assert t.ref is not None and not any(p.requires_grad for p in t.ref.parameters())
    stats = t.update(t.rollout(0), lr=1e-3)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # before any step the policy is the reference


def test_dynamic_sampling_drops_groups_without_signal(tiny_native_dir, tmp_path):
    const = _write_reward(
        tmp_path,
        """
        def const(completions, **kw):
            return [1.0 for _ in completions]
    """,
    )
    cfg = _cfg(
        tmp_path,
        tiny_native_dir,
        rewards=[f"{const}:const"],
        reward_weights=[1.0],
        dynamic_sampling=True,
        max_resample_rounds=2,
    )
    t = GR.GRPOTrainer(cfg, progress=False)
    ro = t.rollout(0)
    assert ro.problems == [] and ro.rounds == 3 and ro.zero_variance_share == 1.0
    model, _, run = t.train()
    row = read_metrics(run.metrics_path)[0]
    assert row["skipped_update"] is True and row["zero_variance_share"] == 1.0


def test_truncated_completions_get_no_loss_when_masked(tiny_native_dir, tmp_path):
    t = GR.GRPOTrainer(_cfg(tmp_path, tiny_native_dir, mask_truncated=True, max_new_tokens=3), progress=False)
    t.sampler.eos_ids = []  # every completion runs to max_new_tokens
    ro = t.rollout(0)
    assert all(c.finish_reason == "length" for c in ro.flat)
    stats = t.update(ro, lr=1e-3)
    assert stats["loss"] == 0.0 and stats["grad_norm"] == 0.0


def test_a_run_logs_the_promised_metrics_and_resumes_exactly(tiny_native_dir, tmp_path):
    ref_model, _, run = GR.grpo(_cfg(tmp_path / "a", tiny_native_dir, steps=4), progress=False)
    row = read_metrics(run.metrics_path)[0]
    for key in (
        "reward_mean",
        "reward_std",
        "reward/accuracy/mean",
        "reward/format/mean",
        "accuracy",
        "mean_length",
        "think_share",
        "kl",
        "clip_frac",
        "entropy",
        "zero_variance_share",
        "sample_tokens_per_s",
        "sample_seconds",
        "train_seconds",
        "train_mfu",
        "lr",
        "grad_norm",
    ):
        assert key in row, key

    grpo_interrupted_at(_cfg(tmp_path / "b", tiny_native_dir, steps=4), step=3)
    resumed, _, run = GR.grpo(_cfg(tmp_path / "b", tiny_native_dir, steps=4), progress=False)
    for (k, a), (_, b) in zip(ref_model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert [r["step"] for r in read_metrics(run.metrics_path)] == [1, 2, 3, 4]


def test_grpo_raises_a_simple_reward(tiny_native_dir, tmp_path):
    """Reward the share of one token in the reply (one the model already emits sometimes): a few GRPO steps
    must raise it."""
    from collections import Counter

    from r1lab.sampler import Sampler, SamplingParams
    from r1lab.tokenizer import render_prompt

    model, tok = load_model_and_tokenizer(tiny_native_dir)
    outs = Sampler(model, tok).generate(
        [render_prompt(tok, "What is 3 + 4?", "r1")], SamplingParams(max_new_tokens=8, n=32, seed=0)
    )
    target, _ = Counter(t for o in outs for t in o.token_ids).most_common(1)[0]
    f = _write_reward(
        tmp_path,
        f"""
        def share(completions, completion_ids, **kw):
            return [sum(t == {target} for t in ids) / len(ids) for ids in completion_ids]
    """,
    )
    cfg = _cfg(
        tmp_path,
        tiny_native_dir,
        rewards=[f"{f}:share"],
        reward_weights=[1.0],
        steps=12,
        prompts_per_step=4,
        num_generations=8,
        lr=3e-3,
        temperature=1.0,
    )
    _, _, run = GR.grpo(cfg, progress=False)
    r = [row["reward_mean"] for row in read_metrics(run.metrics_path)]
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.1, r


def test_bad_settings_are_refused(tiny_native_dir, tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        _cfg(tmp_path, tiny_native_dir, num_generations=1).validate()
    with pytest.raises(ValueError, match="same length"):
        _cfg(tmp_path, tiny_native_dir, reward_weights=[1.0]).validate()
    with pytest.raises(ValueError, match="--model is required"):
        _cfg(
            tmp_path,
            "",
        ).validate()
    with pytest.raises(ValueError, match="loss aggregation"):
        _cfg(tmp_path, tiny_native_dir, loss_agg="sum").validate()


def test_max_seconds_ends_the_run_after_the_step_that_reaches_it(tiny_native_dir, tmp_path):
    _, _, run = GR.grpo(_cfg(tmp_path, tiny_native_dir, steps=50, max_seconds=1e-6), progress=False)
    rows = read_metrics(run.metrics_path)
    assert [r["step"] for r in rows] == [1] and rows[0]["total_seconds"] > 0
    assert (run.model_dir / "config.json").is_file()
    with pytest.raises(ValueError, match="max_seconds must be >= 0"):
        GR.GRPOConfig(model="m", max_seconds=-1).validate()


@pytest.mark.parametrize("family", ["native", "llama"])
def test_sampler_and_trainer_log_probs_agree_to_rounding(family, tiny_native_dir, tiny_llama_dir, tmp_path):
    """Every step logs how far the rollout engine's log-probs were from the trainer's own (pi_old): with r1lab's
    sampler and one update per batch they are the same computation, so the mismatch is float32 rounding."""
    model_dir = tiny_native_dir if family == "native" else tiny_llama_dir
    _, _, run = GR.grpo(_cfg(tmp_path, model_dir, steps=2, max_new_tokens=12), progress=False)
    for row in read_metrics(run.metrics_path):
        assert row["mismatch/logp_abs_diff_max"] < 2e-5, row
        assert row["mismatch/logp_abs_diff_mean"] < 2e-6 and abs(row["mismatch/kl"]) < 1e-9


@pytest.mark.parametrize(
    "loss,correction",
    [
        ("clip", "token-truncate"),
        ("gspo", "none"),
        ("gspo-token", "sequence-mask"),
        ("cispo", "token-mask"),
        ("clip", "sequence-truncate"),
    ],
)
def test_every_objective_and_correction_trains_through_the_trainer(loss, correction, tiny_native_dir, tmp_path):
    eps = dict(epsilon_low=3e-4, epsilon_high=4e-4) if loss.startswith("gspo") else {}
    f = _write_reward(
        tmp_path,
        """
        def even(completions, completion_ids, **kw):
            return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]
    """,
    )
    cfg = _cfg(
        tmp_path,
        tiny_native_dir,
        steps=1,
        policy_loss=loss,
        rollout_correction=correction,
        mu=2,
        rewards=[f"{f}:even"],
        reward_weights=[1.0],
        **eps,
    )
    before, _ = load_model_and_tokenizer(tiny_native_dir)
    after, _, run = GR.grpo(cfg, progress=False)
    row = read_metrics(run.metrics_path)[0]
    assert {"clip_frac", "correction_weight", "mismatch/kl", "grad_norm"} <= set(row)
    assert 0.99 < row["correction_weight"] <= 1.0  # the sampler agrees with the trainer: nothing is reweighted
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    with pytest.raises(ValueError, match="unknown policy loss"):
        _cfg(tmp_path, tiny_native_dir, policy_loss="ppo2").validate()


def test_gathered_rollout_has_tool_columns_only_where_the_run_has_a_tool():
    """Under torchrun the step's metrics read the gathered rollout: without a tool there must be no tool columns
    (so the metrics rows have the same keys with 1 or N processes), with one they come back as tuples."""
    from r1lab.sampler import Completion
    from r1lab.train.rollout import Rollout, gather_rollout

    c = Completion(0, " <think> x </think> <answer> 1 </answer>", [5, 6], [-0.1, -0.2], "stop")
    ro = Rollout([], [], [[c, c]], torch.tensor([[1.0, 0.0]]), {}, torch.tensor([[1.0, 0.0]]))
    assert gather_rollout(ro, [2, 2], [True, True], None)[-1] is None
    assert gather_rollout(ro, [2, 2], [True, True], [(1, 0, 0.5), (0, 0, 0.0)])[-1] == [(1, 0, 0.5), (0, 0, 0.0)]
