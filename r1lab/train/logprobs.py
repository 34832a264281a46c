"""Token log-probabilities of completions under a policy: the two training batch layouts and the forward each model
family runs them with. GRPO and on-policy distillation read log-probs from here; SFT reads the same packed forward.

- `PackedRows`: groups [prompt | c1 | ... | cG] packed into rows with a 4D mask that lets every completion see its
  prompt and itself only (any causal LM: r1lab's, or `transformers`' through its decoder);
- `GroupedBatch`: prompts [P, Lp] and completions [N, Lc] held apart (r1lab's DeepSeek-V3 and Llama-family models
  through `FastDecoder`): each prompt runs once per group and nothing but attention scores is spent on padding.
Both give the same numbers (tests/test_grpo.py); log-probs are log_softmax(logits / temperature) at the sampled
token, as the sampler computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1lab.model.hf import base_model, is_native
from r1lab.train.packing import Packed, assign_rows, pack_groups

# ----------------------------------------------------------------------------- layouts


@dataclass
class PackedRows:
    """Packed [prompt | c1 | ... | cG] groups, and for every completion token where its prediction is read."""

    packed: Packed
    pred_index: torch.Tensor  # [M] flat index (row * L + col) of the hidden state predicting each token
    target: torch.Tensor  # [M] the completion token
    seq: torch.Tensor  # [M] completion number in the batch (prompt-major)
    pos: torch.Tensor  # [M] token number within its completion

    @property
    def n_tokens(self) -> int:
        return self.packed.n_tokens


@dataclass
class GroupedBatch:
    """Prompts [P, Lp] and their completions [N, Lc] held apart, both right-padded (see `grouped_model`: each prompt
    runs once and completions do not score each other; see r1lab.model.grouped)."""

    prompt_ids: torch.Tensor
    prompt_lens: torch.Tensor
    completion_ids: torch.Tensor
    completion_lens: torch.Tensor
    group: torch.Tensor  # [N] the prompt (row of prompt_ids) each completion continues
    target: torch.Tensor  # [M] completion tokens, completion by completion
    seq: torch.Tensor  # [M] completion number in the batch (prompt-major)
    pos: torch.Tensor  # [M] token number within its completion

    @property
    def n_tokens(self) -> int:
        return int(self.prompt_lens.sum() + self.completion_lens.sum())


Batch = PackedRows | GroupedBatch


def packed_rows(
    prompt_ids: list[list[int]],
    completion_ids: list[list[list[int]]],
    max_tokens: int,
    pad_id: int,
    row_tokens: int = 256,
) -> list[PackedRows]:
    """Groups packed into rows of about `row_tokens` (a prompt shared by its G completions; a longer group gets a
    row of its own), rows split into micro-batches of about `max_tokens` tokens. A completion's first token is
    predicted from its prompt's last token."""
    sizes = [len(p) + sum(len(c) for c in cs) for p, cs in zip(prompt_ids, completion_ids)]
    cap = max(row_tokens, max(sizes))
    rows = assign_rows(sizes, cap)
    G = len(completion_ids[0])
    batches: list[PackedRows] = []
    current: list[list[int]] = []
    used = 0
    for row in rows + [None]:  # None closes the last micro-batch
        n_row = sum(sizes[g] for g in row) if row else 0
        if current and (row is None or used + n_row > max_tokens):
            members = [g for r in current for g in r]
            local = {g: i for i, g in enumerate(members)}
            packed = pack_groups(
                [(prompt_ids[g], completion_ids[g]) for g in members],
                cap,
                pad_id,
                rows=[[local[g] for g in r] for r in current],
            )
            batches.append(_index(packed, members, completion_ids, G))
            current, used = [], 0
        if row is not None:
            current.append(row)
            used += n_row
    return batches


def _index(packed: Packed, members, completion_ids, G) -> PackedRows:
    width = packed.input_ids.shape[1]
    pred, tgt, seq, tpos = [], [], [], []
    for i, g in enumerate(members):
        (r0, c0) = packed.places[i][0]
        last_prompt = r0 * width + c0 - 1
        for j, ((r, at), c) in enumerate(zip(packed.places[i], completion_ids[g])):
            m = len(c)
            pred.append(torch.cat([torch.tensor([last_prompt]), r * width + at + torch.arange(m - 1)]))
            tgt.append(torch.tensor(c))
            seq.append(torch.full((m,), g * G + j))
            tpos.append(torch.arange(m))
    return PackedRows(packed, torch.cat(pred), torch.cat(tgt), torch.cat(seq), torch.cat(tpos))


def grouped_batches(
    prompt_ids: list[list[int]], completion_ids: list[list[list[int]]], max_tokens: int, pad_id: int
) -> list[GroupedBatch]:
    """Consecutive groups in micro-batches of about `max_tokens` real tokens (at least one group each)."""
    G = len(completion_ids[0])
    sizes = [len(p) + sum(len(c) for c in cs) for p, cs in zip(prompt_ids, completion_ids)]
    batches: list[GroupedBatch] = []
    current: list[int] = []
    used = 0
    for g in list(range(len(prompt_ids))) + [None]:  # None closes the last micro-batch
        if current and (g is None or used + sizes[g] > max_tokens):
            batches.append(_grouped_batch(current, prompt_ids, completion_ids, G, pad_id))
            current, used = [], 0
        if g is not None:
            current.append(g)
            used += sizes[g]
    return batches


def _grouped_batch(members, prompt_ids, completion_ids, G, pad_id) -> GroupedBatch:
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(  # noqa: E731
        [torch.tensor(x, dtype=torch.long) for x in xs], batch_first=True, padding_value=pad_id
    )
    comps = [c for g in members for c in completion_ids[g]]
    seq = torch.cat([torch.full((len(c),), g * G + j) for g in members for j, c in enumerate(completion_ids[g])])
    return GroupedBatch(
        pad([prompt_ids[g] for g in members]),
        torch.tensor([len(prompt_ids[g]) for g in members]),
        pad(comps),
        torch.tensor([len(c) for c in comps]),
        torch.arange(len(members)).repeat_interleave(G),
        torch.tensor([t for c in comps for t in c]),
        seq,
        torch.cat([torch.arange(len(c)) for c in comps]),
    )


def to_matrix(values: torch.Tensor, batch: Batch, shape) -> torch.Tensor:
    """Per-token values [M] of a micro-batch placed in the step's [N, T] matrix (zeros elsewhere)."""
    out = values.new_zeros(shape)
    out[batch.seq.to(values.device), batch.pos.to(values.device)] = values
    return out


# ----------------------------------------------------------------------------- forwards


def grouped_model(model):
    """What runs the grouped layout for `model`: r1lab's DeepSeek-V3 itself, a Llama-family transformers model
    through `FastDecoder`, or None (other models train on packed rows)."""
    from r1lab.model.llama import fast_decoder

    return base_model(model) if is_native(model) else fast_decoder(model)


def packed_hidden_states(model, packed: Packed) -> tuple[torch.Tensor, torch.nn.Module, float | None]:
    """(final hidden states [R, L, D], the output head, its logit soft-cap or None) of packed rows in which every
    sample sees its group's prefix and itself only: r1lab's model takes the boolean 4D mask, `transformers`'
    decoders an additive one (it is added to the attention scores)."""
    base = base_model(model)
    allowed = packed.mask()
    if is_native(model):
        dev = base.lm_head.weight.device
        h = base.hidden_states(
            packed.input_ids.to(dev),
            attention_mask=allowed.to(dev),
            position_ids=packed.position_ids.to(dev),
            token_mask=packed.attention_mask.to(dev),
        )
        return h, base.lm_head, None
    head = base.get_output_embeddings()
    dev = head.weight.device
    dtype = base.get_input_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    h = base.get_decoder()(
        input_ids=packed.input_ids.to(dev), attention_mask=mask.to(dev), position_ids=packed.position_ids.to(dev)
    ).last_hidden_state
    return h, head, getattr(base.config, "final_logit_softcapping", None)


def token_logprobs(model, batch: Batch, temperature: float, entropy: bool = False):
    """log pi(token) at the sampling temperature for every completion token of the batch [M] (and the entropy of
    each prediction when asked)."""
    if isinstance(batch, GroupedBatch):
        base = base_model(model)
        head = base.lm_head if is_native(model) else base.get_output_embeddings()
        cap = None if is_native(model) else getattr(base.config, "final_logit_softcapping", None)
        return _logprobs(_grouped_hidden(grouped_model(model), batch), head, cap, batch.target, temperature, entropy)
    h, head, cap = packed_hidden_states(model, batch.packed)
    flat = h.reshape(-1, h.shape[-1])[batch.pred_index.to(h.device)]
    return _logprobs(flat, head, cap, batch.target, temperature, entropy)


def _grouped_hidden(base, b: GroupedBatch) -> torch.Tensor:
    """Hidden states predicting each completion token [M]: the prompt's last for the first token, then the
    completion's own."""
    dev = base.lm_head.weight.device
    p_lens, c_lens, group = b.prompt_lens.to(dev), b.completion_lens.to(dev), b.group.to(dev)
    hp, hc = base.grouped_hidden_states(
        b.prompt_ids.to(dev), p_lens, b.completion_ids.to(dev), c_lens, group, padded=False
    )  # real tokens only, row by row
    last = hp.index_select(0, p_lens.cumsum(0) - 1)  # [P] each prompt's last token
    n = torch.arange(len(c_lens), device=dev).repeat_interleave(c_lens)  # [M] completion of each token
    pos = b.pos.to(dev)
    prev = (c_lens.cumsum(0) - c_lens)[n] + pos - 1  # the token before, in hc
    return torch.cat([hc, last]).index_select(0, torch.where(pos == 0, len(hc) + group[n], prev))


def _logprobs(h, head, cap, target, temperature: float, entropy: bool):
    logits = head(h).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp_all = (logits / temperature).log_softmax(-1)
    logp = logp_all.gather(1, target.to(h.device)[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1).detach() if entropy else None
    return logp, ent
