"""On-policy distillation's signal (GKD 2024; Qwen3): the student samples, a teacher scores the very tokens it
sampled in one forward, and the per-token reverse KL, log pi_teacher(y_t) - log pi_student(y_t), is the advantage
that GRPO's policy-gradient machinery follows. Dense (every token is judged), and no reward function is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from r1lab.train.logprobs import grouped_model, packed_rows, to_matrix, token_logprobs

PROBE = "What is 47 + 38? <think> 7+8=15 </think> <answer> 85 </answer> λx. x²"


def load_teacher(path: str | Path, student_tokenizer, device):
    """The teacher (any model directory r1lab loads, native or `transformers`), frozen, after checking that it
    shares the student's tokenizer: it must score the student's own token ids."""
    from r1lab.model.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(path, device=device)
    theirs, ours = tok.get_vocab(), student_tokenizer.get_vocab()
    if (
        theirs != ours
        or tok(PROBE, add_special_tokens=False)["input_ids"]
        != student_tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    ):
        differ = sum(theirs.get(t) != i for t, i in ours.items())
        raise ValueError(
            f"the teacher {path} has another tokenizer than the student ({len(theirs)} vs {len(ours)} "
            f"tokens, {differ} of the student's mapped differently): on-policy distillation scores the "
            "student's token ids with the teacher, so use a teacher with the student's tokenizer (or "
            "distill with --method sft, which works on text)"
        )
    return model.eval().requires_grad_(False)


@torch.no_grad()
def teacher_logprobs(
    teacher, batches: list, prompt_ids, completion_ids, shape, temperature: float, pad_id: int, max_tokens: int
) -> torch.Tensor:
    """The teacher's log-probs [N, T] of the sampled completion tokens. It runs the student's micro-batches when it
    can run their layout, else the same groups packed into rows (any causal LM can)."""
    from r1lab.train.logprobs import GroupedBatch

    if batches and isinstance(batches[0], GroupedBatch) and grouped_model(teacher) is None:
        batches = packed_rows(prompt_ids, completion_ids, max_tokens, pad_id)
    device = next(teacher.parameters()).device
    out = torch.zeros(shape, device=device)
    for b in batches:
        lp, _ = token_logprobs(teacher, b, temperature)
        out += to_matrix(lp.float(), b, shape)
    return out


def reverse_kl_advantage(teacher_lp: torch.Tensor, student_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantage [N, T]: -(log pi_student - log pi_teacher) on the sampled tokens, 0 elsewhere. Its mean
    over the student's samples is minus the reverse KL(student || teacher)."""
    return (teacher_lp - student_lp) * mask
