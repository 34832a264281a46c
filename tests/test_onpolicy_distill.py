"""On-policy distillation: the student samples, the teacher scores the sampled tokens, and the per-token reverse KL
is the advantage. It moves the student toward the teacher, needs no reward, works with native and transformers
teachers (on the student's layout or packed rows), and refuses a teacher with another tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from r1lab.model.checkpoint import save_model
from r1lab.model.deepseek import DeepseekV3
from r1lab.model.load import load_model_and_tokenizer
from r1lab.train import grpo as GR
from r1lab.train.logprobs import grouped_batches, packed_rows
from r1lab.train.run import read_metrics
from r1lab.train.teacher import reverse_kl_advantage, teacher_logprobs


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    """Another tiny native model (another seed) with the same tokenizer."""
    tok = tiny_tokenizer
    cfg = tiny_model_config(
        len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=512,
    )
    torch.manual_seed(7)
    return save_model(DeepseekV3(cfg), tmp_path_factory.mktemp("teacher") / "model", tokenizer=tok)


def _cfg(tmp_path, student, teacher, **kw):
    base = dict(
        out=str(tmp_path / "opd"),
        model=str(student),
        teacher=str(teacher),
        rewards=[],
        reward_weights=[],
        steps=16,
        prompts_per_step=2,
        num_generations=32,
        max_new_tokens=6,
        template="r1",
        bf16=False,
        lr=1e-2,
        warmup=1,
        eval_problems=2,
        task_args={"arithmetic": {"max_digits": 1}},
    )
    base.update(kw)
    return GR.GRPOConfig(**base)


@pytest.mark.slow  # 16 steps of 64 samples: ~70 s of CPU
def test_the_student_moves_toward_the_teacher_without_any_reward(tiny_native_dir_long, teacher_dir, tmp_path):
    _, _, run = GR.grpo(_cfg(tmp_path, tiny_native_dir_long, teacher_dir), progress=False)
    kl = [r["teacher_reverse_kl"] for r in read_metrics(run.metrics_path)]
    assert all(r is None for r in [row["reward_mean"] for row in read_metrics(run.metrics_path)])
    assert sum(kl[-3:]) / 3 < 0.8 * sum(kl[:3]) / 3, kl  # measured: 2.9 -> 2.0 nats per token


def test_the_advantage_is_the_per_token_reverse_kl_by_hand():
    teacher = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    student = torch.log(torch.tensor([[0.25, 0.25, 0.3]]))
    adv = reverse_kl_advantage(teacher, student, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[0.6931472, 0.0, 0.0]]))  # log 2, equal, masked


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_transformers_teacher_scores_the_students_tokens(family, tiny_native_dir, tiny_llama_dir, tiny_gpt2_dir):
    """A Llama teacher runs the student's grouped micro-batches; GPT-2 cannot, so it gets the same groups packed in
    rows: either way its log-probs equal its own plain forward."""
    teacher, _ = load_model_and_tokenizer(tiny_llama_dir if family == "llama" else tiny_gpt2_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 250, (n,), generator=g).tolist() for n in (6, 3)]
    comps = [[torch.randint(5, 250, (m,), generator=g).tolist() for m in ms] for ms in ((3, 5), (4, 2))]
    got = teacher_logprobs(teacher, grouped_batches(prompts, comps, 10_000, 0), prompts, comps, (4, 5), 0.7, 0, 10_000)
    ref = teacher_logprobs(teacher, packed_rows(prompts, comps, 10_000, 0), prompts, comps, (4, 5), 0.7, 0, 10_000)
    assert torch.allclose(got, ref, atol=1e-5)
    with torch.no_grad():
        ids = torch.tensor([prompts[0] + comps[0][1]])
        plain = (teacher(input_ids=ids).logits[0, len(prompts[0]) - 1 : -1] / 0.7).log_softmax(-1)
    assert torch.allclose(got[1], plain.gather(1, torch.tensor(comps[0][1])[:, None]).squeeze(1), atol=1e-5)


def test_a_teacher_with_another_tokenizer_is_refused(tiny_native_dir_long, tmp_path, tiny_tokenizer):
    from r1lab.tokenizer import train_tokenizer

    other = train_tokenizer([f"{a} times {a} is {a * a}" for a in range(300)], vocab_size=290)
    cfg = tiny_model_config(len(other), max_position_embeddings=512)
    torch.manual_seed(1)
    path = save_model(DeepseekV3(cfg), tmp_path / "other", tokenizer=other)
    with pytest.raises(ValueError, match="another tokenizer than the student"):
        GR.grpo(_cfg(tmp_path, tiny_native_dir_long, path, steps=1), progress=False)


def test_on_policy_distillation_settings_are_checked():
    with pytest.raises(ValueError, match="at least one reward"):
        GR.GRPOConfig(model="m", rewards=[], reward_weights=[]).validate()
    with pytest.raises(ValueError, match="dynamic_sampling"):
        GR.GRPOConfig(model="m", teacher="t", rewards=[], reward_weights=[], dynamic_sampling=True).validate()


def test_r1lab_distill_method_on_policy(tiny_native_dir_long, teacher_dir, tmp_path, capsys):
    from r1lab.cli import main

    out = tmp_path / "d"
    assert (
        main(
            [
                "distill",
                "--method",
                "on-policy",
                "--teacher",
                str(teacher_dir),
                "--student",
                str(tiny_native_dir_long),
                "--out",
                str(out),
                "--task-args",
                '{"arithmetic": {"max_digits": 1}}',
                "--teacher-template",
                "r1",
                "--onpolicy.steps",
                "2",
                "--onpolicy.prompts-per-step",
                "2",
                "--onpolicy.num-generations",
                "3",
                "--onpolicy.max-new-tokens",
                "6",
                "--onpolicy.bf16",
                "false",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "reverse KL to the teacher per token" in printed and (out / "onpolicy" / "model" / "config.json").is_file()
    rows = read_metrics(out / "onpolicy" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["teacher_reverse_kl"] > 0 for r in rows)
    assert (
        main(
            [
                "distill",
                "--method",
                "on-policy",
                "--teacher-url",
                "http://127.0.0.1:1/v1",
                "--teacher-model",
                "t",
                "--student",
                str(tiny_native_dir_long),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "cannot do: give a local --teacher" in capsys.readouterr().err
