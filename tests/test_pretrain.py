"""Pretraining: the worked/direct corpus mix, a short run, and a resume that continues exactly."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_MODEL as TINY

from r1lab.tasks import Problem
from r1lab.train import pretrain as P
from r1lab.train.run import read_metrics


def _cfg(tmp_path, **kw):
    base = dict(
        out=str(tmp_path / "run"),
        steps=6,
        rows=2,
        seq_len=192,
        warmup=2,
        eval_every=100,
        eval_problems=3,
        log_every=1,
        save_every=3,
        model=TINY,
        vocab_size=400,
        bf16=False,
        task_args={"arithmetic": {"max_digits": 2}},
    )
    base.update(kw)
    return P.PretrainConfig(**base)


def test_completions_are_worked_or_direct():
    p = Problem("x", "arithmetic", "What is 2 + 3?", "5", reasoning="2+3=5. so 5")
    assert P.completion_text(p, direct=False) == " <think> 2+3=5. so 5 </think> <answer> 5 </answer>"
    assert P.completion_text(p, direct=True) == " <think> </think> <answer> 5 </answer>"


def test_corpus_mixes_worked_and_direct_answers_at_the_configured_rate(tmp_path):
    cfg = _cfg(tmp_path, direct_fraction=0.3)
    tok = P.build_tokenizer(cfg)
    pairs = P.Corpus(cfg, tok).texts(seed=1, n=400)
    direct = sum(c.startswith(" <think> </think>") for _, c in pairs) / len(pairs)
    assert 0.22 < direct < 0.38
    assert all(p.endswith(". Assistant:") for p, _ in pairs)
    assert P.Corpus(cfg, tok).texts(seed=1, n=400) == pairs  # same seed, same corpus


def test_batches_are_a_pure_function_of_the_step(tmp_path):
    cfg = _cfg(tmp_path)
    tok = P.build_tokenizer(cfg)
    a, b = P.Corpus(cfg, tok).batch(5), P.Corpus(cfg, tok).batch(5)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, P.Corpus(cfg, tok).batch(6).input_ids)
    # loss only on the replies; each row starts with the template prefix shared by its examples
    prompt_tokens = (a.labels == -100) & (a.attention_mask == 1)
    assert prompt_tokens.sum() > 0 and (a.labels != -100).sum() > 0
    prefix = P.Corpus(cfg, tok).shared_prefix()
    assert len(prefix) > 20 and (a.input_ids[:, : len(prefix)] == torch.tensor(prefix)).all()
    assert (a.segment[:, : len(prefix)] == 0).all() and a.segment.max() >= 2  # several examples per row


def test_short_run_writes_model_metrics_and_flops(tmp_path):
    cfg = _cfg(tmp_path)
    model, tok, run = P.pretrain(cfg, progress=False)
    rows = read_metrics(run.metrics_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    assert {"tokens_per_s", "flops_per_s", "mfu"} <= set(rows[0])
    assert 0 < rows[0]["mfu"] < 1
    assert "eval" in rows[-1] and set(rows[-1]["eval"]["arithmetic"]) == {"greedy", "think_share", "mean_length"}
    assert (run.dir / "config.yaml").is_file() and run.done()


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    ref_model, _, _ = P.pretrain(_cfg(tmp_path / "a"), progress=False)

    real = P.Corpus.batch

    def crash_at_5(self, step, **kw):
        if step == 5:
            raise KeyboardInterrupt
        return real(self, step, **kw)

    monkeypatch.setattr(P.Corpus, "batch", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        P.pretrain(_cfg(tmp_path / "b"), progress=False)
    monkeypatch.setattr(P.Corpus, "batch", real)
    resumed, _, run = P.pretrain(_cfg(tmp_path / "b"), progress=False)  # continues from the step-3 checkpoint
    for (k, a), (_, b) in zip(ref_model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    steps = [r["step"] for r in read_metrics(run.metrics_path) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows logged after the checkpoint were dropped and logged again


def test_bad_settings_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="direct_fraction"):
        P.pretrain(_cfg(tmp_path, direct_fraction=1.5), progress=False)
    with pytest.raises(ValueError, match="unknown task|no task"):
        P.pretrain(_cfg(tmp_path, tasks=["chess"]), progress=False)


def test_a_model_with_mtp_trains_it_on_the_shared_prefix_layout(tmp_path):
    """With an MTP module the corpus keeps its shared-prefix rows (the MTP loss masks what crosses samples; the
    model test pins it against separate sequences): the MTP loss is logged, part of the loss, and falls."""
    cfg = _cfg(tmp_path, steps=24, rows=4, lr=3e-3, model={**TINY, "num_nextn_predict_layers": 1})
    model, _, run = P.pretrain(cfg, progress=False)
    rows = [r for r in read_metrics(run.metrics_path) if "loss" in r]
    assert len(rows) == 24 and len(model.mtp_layers) == 1 and all(r["mtp_loss"] is not None for r in rows)
    weight = model.config.mtp_loss_weight
    assert all(abs(r["loss"] - (r["lm_loss"] + weight * r["mtp_loss"])) < 0.05 * r["loss"] for r in rows)
    first, last = sum(r["mtp_loss"] for r in rows[:3]) / 3, sum(r["mtp_loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
