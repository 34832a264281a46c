"""Packing: no padding between samples, positions restart, nothing predicts across a boundary, and a shared
prefix gives exactly what separate sequences give."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from r1lab.model.deepseek import DeepseekV3
from r1lab.train.packing import pack, pack_groups


def test_samples_are_packed_first_fit_with_restarting_positions():
    samples = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([6, 7, 8], [1, 1, 1]), ([9, 10], [0, 1])]
    p = pack(samples, seq_len=8, pad_id=0)
    assert p.input_ids.shape == (2, 8)
    assert p.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert p.group[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    # loss mask applied, and the first token of every sample is never a target
    assert p.labels[0].tolist() == [-100, -100, 3, 4, 5, -100, 7, 8]
    assert p.input_ids[1].tolist()[:2] == [9, 10] and p.attention_mask[1].tolist() == [1, 1] + [0] * 6
    assert p.n_tokens == 10


def test_mask_lets_samples_see_their_prefix_and_themselves_only():
    p = pack_groups([([1, 2], [[3, 4], [5]])], capacity=8)
    m = p.mask()[0, 0]
    # columns: 1 2 | 3 4 | 5
    assert m[3].tolist() == [True, True, True, True, False]  # token 4 sees the prefix and token 3
    assert m[4].tolist() == [True, True, False, False, True]  # token 5 sees the prefix and itself, not sample 1
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 2]  # both samples continue after the prefix
    assert p.places == [[(0, 2), (0, 4)]]


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        pack([([1] * 9, [1] * 9)], seq_len=8)


def _separate_loss(model, seqs):
    """Mean next-token loss over sequences, counting targets from index `first` on."""
    total, count = 0.0, 0
    for s, first in seqs:
        ids = torch.tensor([s])
        lg = model(ids).logits[0, :-1]
        tgt = ids[0, 1:].clone()
        tgt[: first - 1] = -100
        total += torch.nn.functional.cross_entropy(lg, tgt, reduction="sum", ignore_index=-100).item()
        count += int((tgt != -100).sum())
    return total / count


def test_packed_loss_equals_the_mean_of_separate_losses():
    torch.manual_seed(0)
    model = DeepseekV3(tiny_model_config(40, num_nextn_predict_layers=0)).eval()
    seqs = [torch.randint(0, 40, (n,)).tolist() for n in (9, 6, 4)]
    p = pack([(s, [1] * len(s)) for s in seqs], seq_len=20)
    with torch.no_grad():
        via_segments = model(
            p.input_ids,
            attention_mask=p.attention_mask,
            position_ids=p.position_ids,
            segment_ids=p.segment_ids,
            labels=p.labels,
        ).lm_loss
        via_mask = model(p.input_ids, attention_mask=p.mask(), position_ids=p.position_ids, labels=p.labels).lm_loss
    ref = _separate_loss(model, [(s, 1) for s in seqs])
    assert abs(via_segments.item() - ref) < 1e-5 and abs(via_mask.item() - ref) < 1e-5


def test_shared_prefix_gives_the_loss_of_prefix_plus_sample_sequences():
    torch.manual_seed(1)
    model = DeepseekV3(tiny_model_config(40, num_nextn_predict_layers=0)).eval()
    prefix = torch.randint(0, 40, (6,)).tolist()
    samples = [torch.randint(0, 40, (n,)).tolist() for n in (5, 7, 3, 4)]
    p = pack([(s, [0] + [1] * (len(s) - 1)) for s in samples], seq_len=20, prefix=prefix)
    assert p.input_ids.shape[0] == 2 and (p.input_ids[:, :6] == torch.tensor(prefix)).all()  # prefix once per row
    with torch.no_grad():
        packed = model(p.input_ids, attention_mask=p.mask(), position_ids=p.position_ids, labels=p.labels).lm_loss
    # separately: prefix + sample, loss on the sample's tokens after its first
    ref = _separate_loss(model, [(prefix + s, len(prefix) + 1) for s in samples])
    assert abs(packed.item() - ref) < 1e-5
