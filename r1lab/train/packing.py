"""Pack tokenised samples into fixed-length rows with no padding between them. Each sample keeps its own
segment id and restarts its positions at 0, so with `segment_ids` in the forward no sample attends to another."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor      # [R, L]
    labels: torch.Tensor         # [R, L], -100 where no loss (prompt, padding)
    segment_ids: torch.Tensor    # [R, L], 0.. per sample within a row; padding gets its own id
    position_ids: torch.Tensor   # [R, L], restarting at 0 in each sample
    attention_mask: torch.Tensor  # [R, L], 1 for real tokens

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def pack(samples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int = 0) -> Packed:
    """samples: (token ids, loss mask of 0/1 per token). First-fit-decreasing into rows of `seq_len`;
    a sample longer than a row is an error (raise seq_len or filter)."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i][0]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(samples[i][0])
        if n > seq_len:
            raise ValueError(f"a sample has {n} tokens, more than seq_len={seq_len}; raise seq_len or drop it")
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    R = len(rows)
    ids = torch.full((R, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((R, seq_len), -100, dtype=torch.long)
    seg = torch.zeros(R, seq_len, dtype=torch.long)
    pos = torch.zeros(R, seq_len, dtype=torch.long)
    mask = torch.zeros(R, seq_len, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            toks, loss = samples[i]
            n = len(toks)
            ids[r, at: at + n] = torch.tensor(toks)
            labels[r, at: at + n] = torch.where(torch.tensor(loss, dtype=torch.bool), torch.tensor(toks), -100)
            labels[r, at] = -100  # nothing in this sample predicts its first token (the previous sample must not)
            seg[r, at: at + n] = s
            pos[r, at: at + n] = torch.arange(n)
            mask[r, at: at + n] = 1
            at += n
        seg[r, at:] = len(members)
    return Packed(ids, labels, seg, pos, mask)
