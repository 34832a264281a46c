"""Packing: no padding between samples, positions restart, nothing predicts across a boundary."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from r1lab.model.deepseek import DeepseekV3
from r1lab.train.packing import pack


def test_samples_are_packed_first_fit_with_restarting_positions():
    samples = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([6, 7, 8], [1, 1, 1]), ([9, 10], [0, 1])]
    p = pack(samples, seq_len=8, pad_id=0)
    assert p.input_ids.shape == (2, 8)
    assert p.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert p.segment_ids[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    # loss mask applied, and the first token of every sample is never a target
    assert p.labels[0].tolist() == [-100, -100, 3, 4, 5, -100, 7, 8]
    assert p.input_ids[1].tolist()[:2] == [9, 10] and p.attention_mask[1].tolist() == [1, 1] + [0] * 6
    assert p.n_tokens == 10


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        pack([([1] * 9, [1] * 9)], seq_len=8)


def test_packed_loss_equals_the_mean_of_separate_losses():
    torch.manual_seed(0)
    model = DeepseekV3(tiny_model_config(40, num_nextn_predict_layers=0)).eval()
    seqs = [torch.randint(0, 40, (n,)).tolist() for n in (9, 6, 4)]
    p = pack([(s, [1] * len(s)) for s in seqs], seq_len=20)
    with torch.no_grad():
        packed = model(p.input_ids, attention_mask=p.attention_mask, position_ids=p.position_ids,
                       segment_ids=p.segment_ids, labels=p.labels).lm_loss
        total, count = 0.0, 0
        for s in seqs:
            ids = torch.tensor([s])
            lg = model(ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(lg, ids[0, 1:], reduction="sum").item()
            count += len(s) - 1
    assert abs(packed.item() - total / count) < 1e-5
