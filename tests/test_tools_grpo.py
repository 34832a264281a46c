"""GRPO with a tool: the tool's tokens are context only (no gradient, no share of the ratio or the length metrics),
the step logs the tool metrics, and a run with tools resumes exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import grpo_interrupted_at

from r1lab.sampler import Completion
from r1lab.sandbox import unavailable
from r1lab.tasks import Problem
from r1lab.tools import ToolCall
from r1lab.train import grpo as GR
from r1lab.train.logprobs import to_matrix
from r1lab.train.rollout import Rollout
from r1lab.train.run import read_metrics

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no sandbox here: {unavailable()}")

SMALL = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    """A small model pretrained for a few steps on multiplication whose worked solutions mostly call the tool: it
    writes `</tool>` often (with programs that rarely run), which is what these tests need."""
    from r1lab.train.pretrain import PretrainConfig, pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = PretrainConfig(
            out=str(tmp_path_factory.mktemp("tool_pretrain")),
            vocab_size=420,
            model=SMALL,
            task_args={"arithmetic": {"min_digits": 1, "max_digits": 2, "ops": "*"}},
            direct_fraction=0.2,
            tool_fraction=0.6,
            steps=15,
            rows=8,
            seq_len=256,
            lr=3e-3,
            warmup=5,
            eval_every=10**6,
            eval_problems=4,
            save_every=10**6,
            bf16=False,
        )
        _, _, run = pretrain(cfg, resume=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    return run.model_dir


def _cfg(tmp_path, model_dir, **kw):
    base = dict(
        out=str(tmp_path / "grpo"),
        model=str(model_dir),
        steps=3,
        prompts_per_step=3,
        num_generations=4,
        max_new_tokens=64,
        template="r1zero",
        bf16=False,
        save_every=2,
        eval_problems=4,
        tools="python",
        task_args={"arithmetic": {"max_digits": 2, "ops": "*"}},
        lr=1e-3,
    )
    base.update(kw)
    return GR.GRPOConfig(**base)


def _rollout_by_hand(tok, T: int):
    """Two groups of two completions; in each completion some tokens are the tool's (mask 0)."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(5, len(tok) - 5, (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(9), ids(6)]
    masks = [[1] * 3 + [0] * 4 + [1] * 5, [1] * 6, [1] * 2 + [0] * 3 + [1] * 2 + [0] * 2 + [1], [1] * 4 + [0] * 2]
    comps = [
        Completion(
            0,
            "",
            ids(len(m)),
            [-1.5] * len(m),
            "stop",
            0,
            m,
            [ToolCall("print(1)", "1", "passed", 0.01, m.count(0))] if 0 in m else [],
        )
        for m in masks
    ]
    problems = [Problem(id=str(i), task="arithmetic", prompt="q", answer="1") for i in range(2)]
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    return Rollout(problems, prompts, [comps[:2], comps[2:]], rewards, {}, rewards.clone()), masks


def test_tool_tokens_get_no_gradient_and_no_share_of_the_ratio(tiny_native_dir_long, tmp_path):
    t = GR.GRPOTrainer(_cfg(tmp_path, tiny_native_dir_long, max_new_tokens=16, task_args={}), progress=False)
    ro, masks = _rollout_by_hand(t.tok, 16)
    grads = []
    real = t.policy

    def spy(lay, temperature, entropy=False):
        lp, ent = real(lay, temperature, entropy=entropy)
        lp.register_hook(lambda grad: grads.append(to_matrix(grad.double(), lay, (4, 16))))
        return lp, ent

    t.policy = spy
    stats = t.update(ro, lr=0.0)  # no weight moves: a second update sees the same policy
    grad = sum(grads)
    for n, m in enumerate(masks):
        m = torch.tensor(m, dtype=torch.bool)
        assert torch.all(grad[n, : len(m)][~m] == 0), n  # exactly zero where the tool wrote
        assert torch.all(grad[n, : len(m)][m] != 0), n  # every token the model wrote is trained on
    for c in ro.flat:  # the engine's log-probs at the tool's tokens are meaningless: garbage changes nothing
        c.logprobs = [lp if k else -50.0 for lp, k in zip(c.logprobs, c.token_mask)]
    again = t.update(ro, lr=0.0)
    for key in (
        "loss",
        "clip_frac",
        "mismatch/logp_abs_diff_mean",
        "mismatch/logp_abs_diff_max",
        "mismatch/kl",
        "entropy",
    ):
        assert again[key] == stats[key], key


def test_a_run_with_tools_logs_tool_metrics_and_resumes_exactly(tool_model_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref_model, _, run = GR.grpo(_cfg(tmp_path / "a", tool_model_dir, save_every=1), progress=False)
        grpo_interrupted_at(_cfg(tmp_path / "b", tool_model_dir, save_every=1), step=2)
        resumed, _, run_b = GR.grpo(_cfg(tmp_path / "b", tool_model_dir, save_every=1), progress=False)
    finally:
        torch.set_num_threads(threads)
    rows = read_metrics(run.metrics_path)
    for key in ("tool_calls_per_reply", "tool_share", "tool_errors", "tool_seconds", "tool_wait_seconds"):
        assert all(key in r for r in rows), key
    assert sum(r["tool_calls_per_reply"] for r in rows) > 0 and sum(r["tool_seconds"] for r in rows) > 0
    # the rows that came back from a tool call kept their cache and were fed the output: the trainer's forward over
    # the whole reply gives the sampler's log-probs at every token the model wrote
    assert max(r["mismatch/logp_abs_diff_max"] for r in rows) < 1e-4
    for (k, a), (_, b) in zip(ref_model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert [r["reward_mean"] for r in read_metrics(run_b.metrics_path)] == [r["reward_mean"] for r in rows]
