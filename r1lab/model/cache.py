"""The sampler's preallocated caches: one row per sequence, each row at its own length, so prompts need no left
padding and rows can leave (`drop`, `keep`) or join (`extend`) a running batch.

`RowCache` keeps the rows' lengths and the layout of its buffers (rows first, positions along `seq_dim`); its two
kinds hold what attention needs per token and layer:
- `LatentCache`: MLA's [kv latent | rotated RoPE key] (r1lab's DeepSeek-V3; V3 section 2.1.1);
- `KVCache`: per-head keys and values (Llama-family models through r1lab.model.llama.FastDecoder).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RowCache:
    """Rows of preallocated buffers (one or more per layer) with a length per row."""

    seq_dim = 1  # where positions run in each buffer
    _slots: torch.Tensor | None = None  # this step's write positions in the flattened buffers (reset by `mask`)

    def _start(self, buf: list[torch.Tensor]) -> None:
        """Empty rows over these preallocated buffers (rows first, positions along `seq_dim`)."""
        self.buf = buf
        self.lengths = torch.zeros(buf[0].shape[0], dtype=torch.long, device=buf[0].device)
        self._S, self.fresh = 0, True

    @property
    def capacity(self) -> int:
        return self.buf[0].shape[self.seq_dim]

    @property
    def batch(self) -> int:
        return self.buf[0].shape[0]

    def mask(self, S: int) -> torch.Tensor:
        """[B, 1, S, T]: query i of row b (at position lengths[b] + i) sees keys at positions <= its own."""
        need = int(self.lengths.max()) + S if self.batch else S
        if need > self.capacity:
            raise ValueError(f"cache full: {need} tokens > capacity {self.capacity}; allocate a larger cache")
        self._S, self._T, self._slots = S, need, None
        self.fresh = need == S  # every row empty: nothing cached yet
        q_pos = self.lengths[:, None] + torch.arange(S, device=self.lengths.device)  # [B, S]
        return (torch.arange(need, device=self.lengths.device)[None, None, :] <= q_pos[..., None]).unsqueeze(1)

    def step_slots(self) -> torch.Tensor:
        """Where each row's next entry goes in a buffer flattened to [rows x heads x capacity, d] (one per row and
        head), computed once per decoding step for all layers: one index_copy_ per write."""
        if self._slots is None:
            heads = math.prod(self.buf[0].shape[1 : self.seq_dim])  # dims between rows and positions
            first = torch.arange(self.batch * heads, device=self.lengths.device) * self.capacity
            self._slots = first + self.lengths.repeat_interleave(heads)
        return self._slots

    def _scatter(self, buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Store `new` (this step's S entries per row, laid out as `buf`) at each row's next positions; return the
        buffer up to the longest row."""
        if self._S == 1:  # decoding: one flat index per row (and head) for the whole step
            d = buf.shape[-1]
            buf.view(-1, d).index_copy_(0, self.step_slots(), new.select(self.seq_dim, 0).reshape(-1, d))
        else:
            pos = self.lengths[:, None] + torch.arange(self._S, device=buf.device)  # [B, S]
            shape = [pos.shape[0]] + [1] * (buf.dim() - 1)
            shape[self.seq_dim] = self._S
            buf.scatter_(self.seq_dim, pos.view(shape).expand_as(new), new)
        return buf.narrow(self.seq_dim, 0, self._T)

    def advance(self, n) -> None:
        self.lengths += n

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows, in this order (repeats duplicate): a new copy of every buffer."""
        self.buf = [b.index_select(0, rows) for b in self.buf]
        self.lengths = self.lengths.index_select(0, rows)

    def drop(self, gone: list[int]) -> list[int]:
        """Remove these rows (finished sequences) by moving the last surviving rows into their slots: one row's
        cache is copied per removed row, not the whole batch at every step a row finishes. Returns the new row order
        as indices of the old rows."""
        gone_set = set(gone)
        n = self.batch - len(gone_set)
        holes = sorted(g for g in gone_set if g < n)
        movers = [r for r in range(n, self.batch) if r not in gone_set]  # as many as there are holes
        order = list(range(n))
        if holes:
            dst, src = (torch.tensor(i, device=self.lengths.device) for i in (holes, movers))
            for b in self.buf:
                b.index_copy_(0, dst, b.index_select(0, src))
            self.lengths.index_copy_(0, dst, self.lengths.index_select(0, src))
            for h, m in zip(holes, movers):
                order[h] = m
        self.buf = [b[:n] for b in self.buf]  # views of the same storage: later rows only shrink it again
        self.lengths = self.lengths[:n]
        return order

    def extend(self, other: RowCache) -> None:
        """Append the rows of another cache (new requests joining a running batch)."""
        cap = max(self.capacity, other.capacity)
        after = (0, 0) * (self.buf[0].dim() - 1 - self.seq_dim)  # F.pad counts from the last dimension
        pad = lambda b: F.pad(b, after + (0, cap - b.shape[self.seq_dim]))  # noqa: E731
        self.buf = [torch.cat([pad(a), pad(b)]) for a, b in zip(self.buf, other.buf)]
        self.lengths = torch.cat([self.lengths, other.lengths])

    def bytes_per_token(self) -> int:
        return sum(b[0].select(self.seq_dim - 1, 0).numel() * b.element_size() for b in self.buf)


class LatentCache(RowCache):
    """MLA's cache: only [kv latent | rotated RoPE key] per token and layer, [B, capacity, width] per layer."""

    seq_dim = 1

    def __init__(self, cfg, batch: int, capacity: int, dtype=torch.float32, device="cpu", layers: int | None = None):
        """`layers`: the main layers by default; speculative decoding adds the MTP module's."""
        self.width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self._start(
            [
                torch.zeros(batch, capacity, self.width, dtype=dtype, device=device)
                for _ in range(layers or cfg.num_hidden_layers)
            ]
        )

    def write(self, layer: int, entries: torch.Tensor) -> torch.Tensor:
        """Store entries [B, S, W] at each row's next positions; return the keys [B, T, W] for attention."""
        return self._scatter(self.buf[layer], entries)


class KVCache(RowCache):
    """Per-head keys and values [B, H_kv, capacity, d] per layer (keys and values in turn in `buf`)."""

    seq_dim = 2

    def __init__(self, cfg, batch: int, capacity: int, dtype=torch.float32, device="cpu"):
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self._start(
            [torch.zeros(batch, kv, capacity, d, dtype=dtype, device=device) for _ in range(2 * cfg.num_hidden_layers)]
        )

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H_kv, S, d] at each row's next positions; return the keys and values [B, H_kv, T, d]."""
        return self._scatter(self.buf[2 * layer], k), self._scatter(self.buf[2 * layer + 1], v)
