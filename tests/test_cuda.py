"""On a CUDA GPU (bench/gpu.sh runs these): the sampler, the fast paths and a GRPO step give what they give on the
CPU. Without CUDA every test here is skipped, and says why."""

from __future__ import annotations

import pytest
import torch

from r1lab.model.load import load_model_and_tokenizer
from r1lab.sampler import Sampler, SamplingParams
from r1lab.tokenizer import render_prompt

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs these)"),
]

PROMPTS = ["What is 12 + 7?", "What is 3 + 4?", "What is 40 - 9?"]


def _greedy(model_dir, device):
    model, tok = load_model_and_tokenizer(model_dir, device=device)
    prompts = [render_prompt(tok, p, "r1") for p in PROMPTS]
    return [
        o.token_ids for o in Sampler(model, tok).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    ]


@pytest.mark.parametrize("family", ["native", "llama"])
def test_greedy_sampling_on_the_gpu_equals_the_cpu(family, tiny_native_dir_long, tiny_llama_dir):
    model_dir = tiny_native_dir_long if family == "native" else tiny_llama_dir
    assert _greedy(model_dir, "cuda") == _greedy(model_dir, "cpu")


def test_gpu_attention_paths_equal_the_cpu_kernels(tiny_native_dir_long):
    """MLA's masked attention takes SDPA on the GPU and baddbmm on the CPU: the same logits."""
    model, _ = load_model_and_tokenizer(tiny_native_dir_long)
    ids = torch.randint(5, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        cpu = model(ids, attention_mask=mask).logits
        gpu = model.to("cuda")(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    assert torch.allclose(cpu[mask.bool()], gpu[mask.bool()], atol=1e-4)


def test_a_bf16_grpo_step_on_the_gpu_takes_a_finite_step(tiny_native_dir_long, tmp_path):
    from r1lab.train import grpo as GR
    from r1lab.train.run import read_metrics

    cfg = GR.GRPOConfig(
        out=str(tmp_path / "g"),
        model=str(tiny_native_dir_long),
        steps=2,
        prompts_per_step=2,
        num_generations=4,
        max_new_tokens=8,
        template="r1",
        bf16=True,
        device="cuda",
        eval_problems=2,
        task_args={"arithmetic": {"max_digits": 1}},
    )
    _, _, run = GR.grpo(cfg, progress=False)
    rows = read_metrics(run.metrics_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["grad_norm"] is not None and r["mismatch/logp_abs_diff_max"] < 0.1 for r in rows)
