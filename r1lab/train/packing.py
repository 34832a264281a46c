"""Pack tokenised samples into fixed-length rows without padding between them.

A row holds groups; a group is an optional shared prefix followed by samples: [prefix | s1 | s2 | ...]. Every
sample attends to its group's prefix and to itself only, and its positions continue from the prefix. So
- plain packing (SFT) is groups with no prefix and one sample each: no sample sees another;
- GRPO puts a prompt and its G completions in one group, so the prompt is forwarded once instead of G times;
- pretraining puts the R1-Zero preamble shared by every example in front of many examples.
Sharing a prefix changes no result: the same tokens see the same context, and the prefix's gradients add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    group: torch.Tensor  # [R, L] group slot within its row, -1 for padding
    segment: torch.Tensor  # [R, L] 0 = the group's prefix, j >= 1 = its j-th sample, -1 = padding
    places: list[list[tuple[int, int]]]  # per group, per sample: (row, first column)
    labels: torch.Tensor | None = None  # [R, L], -100 where no loss (set by the caller)

    def require_labels(self) -> torch.Tensor:
        """`labels`, on a batch that has them (`pack` sets them, `pack_groups` leaves them to the caller)."""
        if self.labels is None:
            raise ValueError("this packed batch has no labels")
        return self.labels

    @property
    def attention_mask(self) -> torch.Tensor:
        return (self.group >= 0).long()

    @property
    def n_tokens(self) -> int:
        return int((self.group >= 0).sum())

    @property
    def segment_ids(self) -> torch.Tensor:
        """One id per (group, sample), prefixes included: equals the mask when no group has a prefix."""
        return self.group * 100_000 + self.segment

    def mask(self) -> torch.Tensor:
        """[R, 1, L, L] True where a query may attend a key: same group, causal, key in the prefix or the
        query's own sample. Padding sees itself only, so no row of the mask is empty."""
        g, s = self.group, self.segment
        n = g.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        same = (g[:, :, None] == g[:, None, :]) & (g[:, None, :] >= 0)
        visible = (s[:, None, :] == 0) | (s[:, :, None] == s[:, None, :])
        return ((same & visible & causal) | torch.eye(n, dtype=torch.bool)).unsqueeze(1)


def assign_rows(sizes: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of items per row, no row above `capacity` (a bigger item gets a row alone)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for r in range(len(rows)):
            if room[r] >= sizes[i]:
                rows[r].append(i)
                room[r] -= sizes[i]
                break
        else:
            rows.append([i])
            room.append(capacity - sizes[i])
    return rows


def pack_groups(
    groups: list[tuple[list[int], list[list[int]]]], capacity: int, pad_id: int = 0, rows: list[list[int]] | None = None
) -> Packed:
    """groups: (prefix ids, [sample ids, ...]). Rows are first-fit packed up to `capacity` tokens (or given)."""
    sizes = [len(p) + sum(len(s) for s in samples) for p, samples in groups]
    rows = rows if rows is not None else assign_rows(sizes, capacity)
    R, L = len(rows), max(sum(sizes[g] for g in row) for row in rows)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros(R, L, dtype=torch.long)
    group = torch.full((R, L), -1, dtype=torch.long)
    seg = torch.full((R, L), -1, dtype=torch.long)
    places: list[list[tuple[int, int]]] = [[] for _ in groups]
    for r, row in enumerate(rows):
        at = 0
        for slot, gi in enumerate(row):
            prefix, samples = groups[gi]
            n = len(prefix)
            ids[r, at : at + n] = torch.tensor(prefix, dtype=torch.long)
            pos[r, at : at + n] = torch.arange(n)
            group[r, at : at + n] = slot
            seg[r, at : at + n] = 0
            at += n
            for j, s in enumerate(samples):
                m = len(s)
                ids[r, at : at + m] = torch.tensor(s, dtype=torch.long)
                pos[r, at : at + m] = torch.arange(n, n + m)
                group[r, at : at + m] = slot
                seg[r, at : at + m] = j + 1
                places[gi].append((r, at))
                at += m
    return Packed(ids, pos, group, seg, places)


def pack(
    samples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int = 0, prefix: list[int] | None = None
) -> Packed:
    """samples: (token ids, 0/1 loss mask per token), packed into rows of `seq_len`. With `prefix`, every row
    starts with it once and all its samples share it; without, no sample sees another. Labels are the tokens
    where the loss mask is 1, except each sample's first token: the shifted loss would read its prediction from
    the column before it, which belongs to another sample."""
    prefix = prefix or []
    for toks, _ in samples:
        if len(toks) + len(prefix) > seq_len:
            raise ValueError(
                f"a sample has {len(toks)} tokens (+{len(prefix)} prefix), more than seq_len={seq_len}; "
                "raise seq_len or drop it"
            )
    if prefix:  # one group per row: the prefix, then as many samples as fit
        rows = assign_rows([len(t) for t, _ in samples], seq_len - len(prefix))
        groups = [(prefix, [samples[i][0] for i in row]) for row in rows]
        members = rows
    else:
        groups = [([], [t]) for t, _ in samples]
        members = [[i] for i in range(len(samples))]
    packed = pack_groups(groups, seq_len, pad_id)
    labels = torch.full_like(packed.input_ids, -100)
    for gi, idx in enumerate(members):
        for (r, at), i in zip(packed.places[gi], idx):
            toks, loss = samples[i]
            lab = torch.where(torch.tensor(loss, dtype=torch.bool), torch.tensor(toks), -100)
            lab[0] = -100
            labels[r, at : at + len(toks)] = lab
    packed.labels = labels
    return packed
