"""One generation engine for GRPO rollouts, evaluation, distillation and serving.

Batched decoding with a KV cache: each prompt is encoded once (its `n` samples share the prefill), every step
is one forward over the rows still running, and a row that finishes leaves the batch at once. Rows can join a
running batch (`Batch.add`), which is how the server batches concurrent requests. Two small adapters hide the
model family: `CachedBackend` (r1lab's DeepSeek-V3, latent cache with per-row lengths; Llama-family transformers
models run the same way through `r1lab.model.llama.FastDecoder`) and `HFBackend` (any other `transformers` causal
LM, left-padded DynamicCache).

With a tool (`Sampler(..., tools=PythonTool(...))`, r1lab.tools) a row that closes a tool call pauses: it leaves the
batch, its program goes to the sandbox's worker pool (a Future; the batch keeps decoding the other rows), and it
re-enters on the cache it kept, fed only the call's closing token and the tool's output (backends that cannot keep
a cache prefill the whole context again). `generate()` re-enters a row a fixed
number of decode steps after it paused (`REENTRY_STEPS`; sooner when nothing else is decoding), waiting for its
program only if that is slower: every rollout is then a function of the model and the seeds, not of how long programs
took (a batch's floating-point sums depend on which rows share it). The server re-enters rows as soon as their
programs end. Completions mark which tokens the model wrote (`token_mask`).

Log-probabilities are those of the distribution sampled from: log_softmax(logits / temperature), before top-p/top-k
truncation (temperature 0 -> raw logits). The GRPO trainer computes its policy log-probs the same way.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from r1lab.tools import ToolCall, program_of

if TYPE_CHECKING:
    from r1lab.model.cache import RowCache

# DeepSeek's sampling settings for R1 models: the R1 evaluation protocol, and what serving and distillation default to.
R1_TEMPERATURE = 0.6
R1_TOP_P = 0.95
# Decode steps a row that called the tool sits out before it re-enters with the output (generate()'s deterministic
# schedule; programs slower than this make the batch wait for them). See docs/tools.md for the measurements.
REENTRY_STEPS = 4
REENTRY = ("steps", "ready")


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    n: int = 1  # samples per prompt
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the model's end-of-sequence ids

    def validate(self) -> SamplingParams:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k})")
        if self.n < 1:
            raise ValueError(f"n must be >= 1 (got {self.n})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings (got {self.stop!r})")
        return self


@dataclass
class Completion:
    prompt_index: int
    text: str  # decoded reply, without the stop token or stop string
    token_ids: list[int]  # generated ids, including the stop token when finish_reason is "stop"
    logprobs: list[float]  # one per generated id
    finish_reason: str  # "stop", "length", or "tool_limit" (a tool call the limits do not allow)
    prompt_tokens: int = 0
    token_mask: list[int] | None = None  # with tools: 1 where the model wrote the token, 0 where the tool did
    tool_calls: list = field(default_factory=list)  # r1lab.tools.ToolCall, in order

    @property
    def model_tokens(self) -> int:
        """The tokens the model wrote (a tool's output excluded): what lengths and throughput count."""
        return len(self.token_ids) if self.token_mask is None else sum(self.token_mask)


# ----------------------------------------------------------------------------- model adapters


class CachedBackend:
    """r1lab's DeepSeek-V3 (MLA latent cache), or a Llama-family model through `FastDecoder` (per-head KV cache):
    rows at their own lengths (no left padding)."""

    can_merge = True

    def __init__(self, model):
        from r1lab.model.cache import LatentCache

        self.model, self.Cache = model, getattr(model, "Cache", LatentCache)  # or a FastDecoder's KVCache
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.max_len = model.config.max_position_embeddings

    def prefill(self, prompts: list[list[int]], capacity: int):
        cache = self.Cache(self.model.config, len(prompts), capacity, dtype=self.dtype, device=self.device)
        return cache, self._feed(cache, prompts)

    def extend(self, cache, tokens: list[list[int]]) -> torch.Tensor:
        """Feed each row its new tokens after what its cache holds (a row back from a tool call: its call's closing
        token and the output); the logits after each row's last token."""
        return self._feed(cache, tokens)

    def _feed(self, cache, tokens: list[list[int]]) -> torch.Tensor:
        """Right-padded new tokens through the model on top of `cache` (a prefill: an empty one)."""
        B, P = len(tokens), max(len(t) for t in tokens)
        ids = torch.zeros(B, P, dtype=torch.long)
        am = torch.zeros(B, P, dtype=torch.long)
        for i, t in enumerate(tokens):
            ids[i, : len(t)] = torch.tensor(t)
            am[i, : len(t)] = 1
        ids, am = ids.to(self.device), am.to(self.device)
        hidden = self.model.body(ids, attention_mask=am, cache=cache)[0]
        last = hidden[torch.arange(B, device=self.device), am.sum(1) - 1]  # only each row's last position
        return self.model.lm_head(self.model.model.norm(last))

    def take(self, cache, rows: list[int]):
        """A copy of these rows' cache (a row that pauses for a tool keeps it); the batch keeps its own."""
        part = copy.copy(cache)
        part.keep(torch.tensor(rows, device=self.device))
        return part

    def decode(self, cache, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens[:, None], cache=cache).logits[:, 0]

    def keep(self, cache, rows: torch.Tensor):
        cache.keep(rows)
        return cache

    def drop(self, cache, gone: list[int]):
        """Remove finished rows; returns the cache and the new row order (indices of the old rows)."""
        return cache, cache.drop(gone)

    def merge(self, a, b):
        a.extend(b)
        return a


class HFBackend:
    """Any `transformers` causal LM: left-padded prompts, attention mask and explicit positions, DynamicCache."""

    def __init__(self, model, pad_id: int):
        import inspect

        from transformers import DynamicCache

        from r1lab.model.hf import base_model

        self.model, self.DynamicCache, self.pad_id = model, DynamicCache, pad_id
        # transformers 5.x renames `past_key_values` to `cache` (the old name warns, then goes in 5.40)
        self.cache_arg = (
            "cache" if "cache" in inspect.signature(base_model(model).forward).parameters else "past_key_values"
        )
        self.device = next(model.parameters()).device
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_len = getattr(cfg, "max_position_embeddings", None) or 1 << 30
        self.can_merge = True  # checked per cache at merge time

    def prefill(self, prompts: list[list[int]], capacity: int):
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        am = torch.zeros(B, P, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :] = torch.tensor(p)
            am[i, P - len(p) :] = 1
        ids, am = ids.to(self.device), am.to(self.device)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        cache = self.DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=am,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: cache},
        )
        state = {"cache": cache, "mask": am, "pos": pos[:, -1] + 1}  # the model fills the cache in place
        return state, out.logits[:, -1]

    def decode(self, state, tokens: torch.Tensor) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(tokens), 1)], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=state["mask"],
            position_ids=state["pos"][:, None],
            use_cache=True,
            **{self.cache_arg: state["cache"]},
        )
        state["pos"] = state["pos"] + 1
        return out.logits[:, -1]

    def keep(self, state, rows: torch.Tensor):
        state["cache"].batch_select_indices(rows)
        state["mask"], state["pos"] = state["mask"][rows], state["pos"][rows]
        return state

    def drop(self, state, gone: list[int]):
        gone_set = set(gone)
        order = [i for i in range(len(state["pos"])) if i not in gone_set]
        return self.keep(state, torch.tensor(order, device=self.device)), order

    def merge(self, a, b):
        """Join two left-padded batches: pad the shorter one on the left (plain DynamicLayer caches only)."""
        from transformers.cache_utils import DynamicLayer

        la, lb = a["mask"].shape[1], b["mask"].shape[1]
        T = max(la, lb)
        for s, L in ((a, la), (b, lb)):
            if L < T:
                for layer in s["cache"].layers:
                    if type(layer) is not DynamicLayer:
                        raise NotImplementedError(f"cannot join batches with a {type(layer).__name__} cache")
                    layer.keys = F.pad(layer.keys, (0, 0, T - L, 0))
                    layer.values = F.pad(layer.values, (0, 0, T - L, 0))
                s["mask"] = F.pad(s["mask"], (T - L, 0))
        for la_, lb_ in zip(a["cache"].layers, b["cache"].layers):
            la_.keys, la_.values = torch.cat([la_.keys, lb_.keys]), torch.cat([la_.values, lb_.values])
        a["mask"], a["pos"] = torch.cat([a["mask"], b["mask"]]), torch.cat([a["pos"], b["pos"]])
        return a


def make_backend(model, tokenizer):
    from r1lab.model.deepseek import DeepseekV3
    from r1lab.model.llama import fast_decoder

    if isinstance(model, DeepseekV3):
        return CachedBackend(model)
    fast = fast_decoder(model)
    if fast is not None:  # a Llama-family transformers model: its modules, r1lab's per-row cache
        return CachedBackend(fast)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return HFBackend(model, pad if pad is not None else 0)


# ----------------------------------------------------------------------------- sampling maths


@dataclass
class RowControls:
    """The running rows' sampling settings as tensors, plus what `sample_next` would otherwise read back from them
    at every step: which rows sample (the rest are greedy), whether any of those truncates (top-p / top-k), and
    which sampled rows draw from each generator. Built when the rows change, not per token."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    sampled: torch.Tensor | None  # indices of the rows that sample; None: every row samples
    truncate: bool
    draws: list[tuple[torch.Generator | None, slice | torch.Tensor]]  # a generator, its rows among the sampled

    @classmethod
    def of(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        device="cpu",
        order: Sequence[int] | None = None,
    ) -> RowControls:
        """`order` ranks the rows (their creation order): a generator's uniforms go to its rows in that order, so
        what a row draws does not depend on where it sits in the batch."""
        rows = [i for i, p in enumerate(params) if p.temperature > 0]
        groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
        for j, i in enumerate(rows):
            groups.setdefault(id(generators[i]), (generators[i], []))[1].append(j)
        draws = []
        for gen, pos in groups.values():
            if order is not None:
                pos.sort(key=lambda j: order[rows[j]])
            contiguous = pos == list(range(pos[0], pos[0] + len(pos)))
            draws.append((gen, slice(pos[0], pos[0] + len(pos)) if contiguous else torch.tensor(pos, device=device)))
        return cls(
            torch.tensor([p.temperature for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device),
            torch.tensor([p.top_k for p in params], device=device),
            None if len(rows) == len(params) else torch.tensor(rows, dtype=torch.long, device=device),
            any(params[i].top_p < 1 or params[i].top_k > 0 for i in rows),
            draws,
        )


def sample_next(logits: torch.Tensor, rows: RowControls) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row with per-row temperature (0 = greedy), top-p and top-k. Returns (tokens, logprobs)
    where logprobs are log_softmax(logits / temperature) at the chosen tokens."""
    logits = logits.float()
    greedy = rows.temperature <= 0
    logp = (logits / rows.temperature.masked_fill(greedy, 1.0)[:, None]).log_softmax(-1)
    tokens = _draw(logp.exp(), rows) if rows.draws else logits.argmax(-1)
    if rows.draws and rows.sampled is not None:  # greedy rows among them
        tokens = logits.argmax(-1).index_copy_(0, rows.sampled, tokens)
    return tokens, logp.gather(1, tokens[:, None]).flatten()


def _draw(probs: torch.Tensor, rows: RowControls) -> torch.Tensor:
    """A token for each row that samples, from probs [B, V] truncated by its top-p / top-k. Inverse-CDF sampling
    with one uniform per row (CPU random draws are slow; per-vocab-entry noise costs more than the model step at
    small sizes), one draw per generator (a prompt's samples, a request's) for all its rows."""
    top_p, top_k = rows.top_p, rows.top_k
    if rows.sampled is not None:
        probs, top_p, top_k = (t.index_select(0, rows.sampled) for t in (probs, top_p, top_k))
    if rows.truncate:
        sp, si = probs.sort(-1, descending=True)
        rank = torch.arange(sp.shape[1], device=sp.device)[None, :]
        drop = (sp.cumsum(-1) - sp) >= top_p[:, None]  # keep the smallest set reaching top_p
        drop |= (top_k[:, None] > 0) & (rank >= top_k[:, None])
        drop[:, 0] = False
        probs = torch.zeros_like(probs).scatter_(1, si, sp.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)
    u = torch.empty(len(probs), 1, device=probs.device)
    for gen, pos in rows.draws:
        if isinstance(pos, slice):
            u[pos].uniform_(generator=gen)
        else:
            u.index_copy_(0, pos, torch.empty(len(pos), 1, device=u.device).uniform_(generator=gen))
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[1] - 1).flatten()


# ----------------------------------------------------------------------------- running batch


@dataclass
class Row:
    """One sequence being generated."""

    key: Any  # caller's handle (prompt index, request id, ...), any hashable value
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    stop_ids: frozenset
    max_new: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_at: int | None = None  # character offset where a stop string begins
    seq: int = 0  # creation order within the batch (rows move when others leave)
    token_mask: list[int] | None = None  # with tools: 1 where the model wrote the token, 0 where the tool did
    tool_calls: list = field(default_factory=list)
    tool_tokens: int = 0


@dataclass
class Paused:
    """A row waiting for its tool call's program."""

    row: Row
    program: str
    future: Future  # of the sandbox's Result
    due: int  # the batch step at which it re-enters (generate()'s schedule)
    shared: bool = False  # an identical program of another row runs for it
    saved: RowCache | None = None  # the cache of the rows that paused with it (backends that can keep it)
    slot: int = 0  # its row in `saved`


class Batch:
    """A running batch: `add` rows (prefilled together, merged into the running set), `step` decodes one token
    for every row and returns the rows that finished. Cancelled or finished rows leave the batch immediately.
    With a tool, rows that close a call leave for `paused` and come back through `resume`."""

    def __init__(
        self, sampler: Sampler, share_programs: bool = False, on_program_done: Callable[[], None] | None = None
    ):
        self.s = sampler
        self.state = None
        self.rows: list[Row] = []
        self.controls: RowControls | None = None  # of self.rows; rebuilt when they change
        self.created = 0
        self.paused: list[Paused] = []
        self.clock = 0  # decode steps taken: the re-entry schedule's time
        self.tool_wait = 0.0  # seconds spent waiting for programs with nothing else to do
        self.share_programs = share_programs  # identical programs run once (one generate() call's rows)
        self.on_program_done = on_program_done  # called from a sandbox thread when a program ends (the server)
        self._programs: dict[str, Future] = {}

    def __len__(self):
        return len(self.rows)

    @property
    def busy(self) -> int:
        """Rows decoding or waiting for a program."""
        return len(self.rows) + len(self.paused)

    def add(self, prompt_ids: list[list[int]], params: list[SamplingParams], keys: list, generators) -> list[Row]:
        """Prefill prompts (each once, then repeated for its n samples), sample each row's first token and join
        them to the running batch. Returns the rows that finished at once (like `step`); all new rows are in
        `self.rows` or among those."""
        new_rows, unique, owner = [], [], []
        for ids, p, key, g in zip(prompt_ids, params, keys, generators):
            max_new = min(p.max_new_tokens, self.s.backend.max_len - len(ids))
            if max_new < 1:
                raise ValueError(
                    f"prompt has {len(ids)} tokens, which leaves no room in the model's context "
                    f"of {self.s.backend.max_len}; shorten the prompt"
                )
            stop_ids = frozenset(p.stop_token_ids if p.stop_token_ids is not None else self.s.eos_ids)
            unique.append(ids)
            for j in range(p.n):
                new_rows.append(
                    Row(
                        (key, j) if p.n > 1 else key,
                        ids,
                        p,
                        g,
                        stop_ids,
                        max_new,
                        token_mask=[] if self.s.tools is not None else None,
                    )
                )
                owner.append(len(unique) - 1)
        for r in new_rows:
            r.seq, self.created = self.created, self.created + 1
        return self._join(new_rows, unique, owner)

    def _join(self, new_rows: list[Row], contexts: list[list[int]], owner: list[int]) -> list[Row]:
        """Prefill `contexts` (row i continues contexts[owner[i]]), sample each row's next token, join the batch."""
        capacity = max(len(r.prompt_ids) + r.max_new for r in new_rows)
        state, logits = self.s.backend.prefill(contexts, capacity)
        idx = torch.tensor(owner, device=logits.device)
        if len(owner) != len(contexts):
            state = self.s.backend.keep(state, idx)
        return self._merge(new_rows, state, logits[idx])

    def _merge(self, new_rows: list[Row], state, logits: torch.Tensor) -> list[Row]:
        """Join rows whose state and next-token logits are ready, sample their next token."""
        if self.state is None:
            self.state, self.rows = state, new_rows
        else:
            self.state = self.s.backend.merge(self.state, state)
            self.rows = self.rows + new_rows
        self.controls = None
        return self._accept(new_rows, logits, offset=len(self.rows) - len(new_rows), controls=self._controls(new_rows))

    def step(self) -> list[Row]:
        """Decode one token for every running row; return the rows that finished at this step."""
        if not self.rows:
            return []
        self.clock += 1
        last = torch.tensor([r.token_ids[-1] for r in self.rows], device=self.s.backend.device)
        logits = self.s.backend.decode(self.state, last)
        if self.controls is None:
            self.controls = self._controls(self.rows)
        return self._accept(self.rows, logits, offset=0, controls=self.controls)

    def cancel(self, keys: set) -> None:
        """Drop rows whose key is in `keys` (a client went away), running or waiting for a program."""
        self._drop([i for i, r in enumerate(self.rows) if r.key in keys])
        self.paused = [p for p in self.paused if p.row.key not in keys]

    # ------------------------------------------------------------------ tool calls

    def due(self, ordered: bool = True, jump: bool = False) -> list[Paused]:
        """The paused rows to re-enter now. `ordered` (generate()): those paused REENTRY_STEPS steps ago or more;
        with `jump` (nothing else can run) the clock moves on to the next re-entry first. Otherwise (the server):
        those whose programs have ended."""
        if not ordered:
            return [p for p in self.paused if p.future.done()]
        if jump and self.paused and not self.rows:
            self.clock = max(self.clock, min(p.due for p in self.paused))
        return [p for p in self.paused if p.due <= self.clock]

    def wait(self, timeout: float | None = None) -> None:
        """Block until some paused row's program ends (the server's loop, when nothing else can run)."""
        if self.paused:
            t0 = time.perf_counter()
            wait([p.future for p in self.paused], timeout=timeout, return_when=FIRST_COMPLETED)
            self.tool_wait += time.perf_counter() - t0

    def resume(self, entries: list[Paused]) -> list[Row]:
        """Re-enter paused rows with their tools' output appended (waiting for programs still running), sample each
        one's next token; returns the rows that finished (a limit reached, or at their first token back)."""
        gone = {id(p) for p in entries}
        self.paused = [p for p in self.paused if id(p) not in gone]
        tools, back, finished = self.s.tools, [], []
        for p in entries:
            r = p.row
            if not p.future.done():
                t0 = time.perf_counter()
                wait([p.future])
                self.tool_wait += time.perf_counter() - t0
            result = p.future.result()
            ids, text = tools.output_ids(result)
            call = ToolCall(p.program, text, result.status, 0.0 if p.shared else result.wall_seconds, 0, p.shared)
            r.tool_calls.append(call)
            if r.tool_tokens + len(ids) > tools.limits.max_tool_tokens:
                r.finish_reason = "tool_limit"
            elif len(r.token_ids) + len(ids) >= r.max_new:  # no room for the output and one more token
                r.finish_reason = "length"
            else:
                call.tokens = len(ids)
                r.token_ids += ids
                r.logprobs += [0.0] * len(ids)
                if r.token_mask is not None:  # always, with a tool
                    r.token_mask += [0] * len(ids)
                r.tool_tokens += len(ids)
                back.append((p, len(ids)))
                continue
            finished.append(r)
        if back:
            finished += self._reenter(back)
        return finished

    def _reenter(self, back: list[tuple[Paused, int]]) -> list[Row]:
        """Rows with their tools' output (n tokens each) appended join the batch again; rows with the same context
        (the same call after the same prompt) share the work. A row that kept its cache (a backend that can `take`
        one) is fed only its call's closing token and the output; otherwise its whole context is prefilled again."""
        rows = [p.row for p, _ in back]
        keys = [tuple(r.prompt_ids + r.token_ids) for r in rows]
        unique: dict[tuple, int] = {}
        owner = [unique.setdefault(k, len(unique)) for k in keys]
        if all(p.saved is not None for p, _ in back):
            first: dict[int, tuple[Paused, int]] = {}  # unique context -> the first row that has it
            for (p, n), u in zip(back, owner):
                first.setdefault(u, (p, n))
            groups: dict[int, tuple[RowCache, list[tuple[int, Paused, int]]]] = {}  # grouped by the cache it kept
            for u, (p, n) in first.items():
                assert p.saved is not None  # every row kept one (checked above)
                groups.setdefault(id(p.saved), (p.saved, []))[1].append((u, p, n))
            order = [u for _, items in groups.values() for u, _, _ in items]
            parts = [
                saved
                if [p.slot for _, p, _ in items] == list(range(saved.batch))
                else self.s.backend.take(saved, [p.slot for _, p, _ in items])
                for saved, items in groups.values()
            ]
            fed = [p.row.token_ids[-n - 1 :] for _, items in groups.values() for _, p, n in items]
            state = parts[0]
            for other in parts[1:]:
                state = self.s.backend.merge(state, other)
            longest = max(len(r.prompt_ids) + len(r.token_ids) for r in rows)
            if longest - min(map(len, fed)) + max(map(len, fed)) <= state.capacity:  # the padded feed fits
                logits = self.s.backend.extend(state, fed)
                where = {u: i for i, u in enumerate(order)}
                idx = torch.tensor([where[u] for u in owner], device=logits.device)
                if len(owner) != len(order):
                    state = self.s.backend.keep(state, idx)
                return self._merge(rows, state, logits[idx])
        return self._join(rows, [list(k) for k in unique], owner)

    def _pause(self, row: Row) -> Paused | None:
        """Send the call `row` just closed to the sandbox and set the row aside; None (and finish reason
        "tool_limit") when the row may make no more calls."""
        tools = self.s.tools
        if len(row.tool_calls) >= tools.limits.max_calls:
            row.finish_reason = "tool_limit"
            return None
        program = program_of(self.s.decode(row.token_ids))
        if program is None:  # a closing tag with no call open: the model's mistake, answered like a failed program
            from r1lab.sandbox import Result

            future: Future = Future()
            future.set_result(Result(status="failed", stderr="SyntaxError: </tool> closes no <tool>"))
            paused = Paused(row, "", future, self.clock + REENTRY_STEPS)
        else:
            running = self._programs.get(program) if self.share_programs else None
            shared = running is not None
            if running is not None:
                future = running
            else:
                future = tools.submit(program)
                done = self.on_program_done
                if done is not None:
                    future.add_done_callback(lambda _: done())
                if self.share_programs:
                    self._programs[program] = future
            paused = Paused(row, program, future, self.clock + REENTRY_STEPS, shared)
        self.paused.append(paused)
        return paused

    # ------------------------------------------------------------------ internals

    def _controls(self, rows: list[Row]) -> RowControls:
        return RowControls.of(
            [r.params for r in rows], [r.generator for r in rows], self.s.backend.device, order=[r.seq for r in rows]
        )

    def _accept(self, rows: list[Row], logits: torch.Tensor, offset: int, controls: RowControls) -> list[Row]:
        tokens, logps = sample_next(logits, controls)
        tools = self.s.tools
        done, paused, records = [], [], []
        for i, (r, t, lp) in enumerate(zip(rows, tokens.tolist(), logps.tolist())):
            r.token_ids.append(t)
            r.logprobs.append(lp)
            if r.token_mask is not None:
                r.token_mask.append(1)
            if t in r.stop_ids:
                r.finish_reason = "stop"
            elif r.params.stop and self.s.stop_string_hit(r):
                r.finish_reason = "stop"
            elif len(r.token_ids) >= r.max_new:
                r.finish_reason = "length"
            elif tools is not None and tools.closes_call(r.token_ids) and (record := self._pause(r)):
                paused.append(offset + i)
                records.append(record)
            if r.finish_reason:
                done.append(offset + i)
        if paused and getattr(self.s.backend, "take", None):  # the rows that paused keep their cache
            saved = self.s.backend.take(self.state, paused)
            for slot, record in enumerate(records):
                record.saved, record.slot = saved, slot
        finished = [self.rows[i] for i in done]
        self._drop(done + paused)
        return finished

    def _drop(self, idx: list[int]) -> None:
        if not idx:
            return
        self.controls = None
        if len(set(idx)) == len(self.rows):
            self.rows, self.state = [], None
            return
        self.state, order = self.s.backend.drop(self.state, idx)
        self.rows = [self.rows[i] for i in order]


class Sampler:
    """Batched generation for the native model or any `transformers` causal LM; with `tools` (r1lab.tools), rows
    may call a tool mid-reply."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 256,
        eos_ids: Sequence[int] | None = None,
        tools=None,
        reentry: str = "steps",
    ):
        from r1lab.tokenizer import eos_ids as default_eos

        if reentry not in REENTRY:
            raise ValueError(f"reentry must be one of {', '.join(REENTRY)} (got {reentry!r})")
        self.model, self.tokenizer = model, tokenizer
        self.backend = make_backend(model, tokenizer)
        self.max_batch = max_batch
        self.eos_ids = list(eos_ids) if eos_ids is not None else default_eos(tokenizer, getattr(model, "config", None))
        self.tools, self.reentry = tools, reentry
        self.tool_wait = 0.0  # seconds the last generate() waited for programs with nothing else to do

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def stop_string_hit(self, row: Row) -> bool:
        """Does a stop string end within the newest tokens? Only the tail is decoded; on a hit, record where."""
        longest = max(len(s) for s in row.params.stop)
        tail = self.decode(row.token_ids[-(longest + 4) :])
        if not any(s in tail for s in row.params.stop):
            return False
        text = self.decode(row.token_ids)
        row.stop_at = min(i for i in (text.find(s) for s in row.params.stop) if i >= 0)
        return True

    def finish(self, row: Row, prompt_index: int) -> Completion:
        assert row.finish_reason is not None, "finish() takes a row that has finished"
        ids = row.token_ids
        if row.stop_at is not None:
            text = self.decode(ids)[: row.stop_at]
        else:
            text = self.decode(ids[:-1] if row.finish_reason == "stop" else ids)
        return Completion(
            prompt_index,
            text,
            list(ids),
            list(row.logprobs),
            row.finish_reason,
            len(row.prompt_ids),
            None if row.token_mask is None else list(row.token_mask),
            list(row.tool_calls),
        )

    def new_batch(self, **kw) -> Batch:
        return Batch(self, **kw)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams | None = None,
        on_finish: Callable[[Completion], None] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Complete every prompt `params.n` times; results are prompt-major (prompt 0's samples first).
        Rows are admitted up to `max_batch` at a time and refilled as others finish. With `seeds` (one per prompt)
        each prompt samples from its own generator, so its completions do not depend on the prompts beside it.
        With a tool, identical programs of this call's rows run once and share their output."""
        params = (params or SamplingParams()).validate()
        if seeds is not None:
            if len(seeds) != len(prompts):
                raise ValueError(f"seeds gives {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt")
            gens = [torch.Generator(device=self.backend.device).manual_seed(int(s)) for s in seeds]
        else:
            gen = torch.Generator(device=self.backend.device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed())
            gens = [gen] * len(prompts)
        queue = deque((i, self.encode(p)) for i, p in enumerate(prompts))
        per_prompt = max(1, params.n)
        results: dict[tuple[int, int], Completion] = {}
        was_training = self.model.training
        self.model.eval()
        ordered = self.reentry == "steps"
        batch = self.new_batch(share_programs=True)
        try:
            while queue or batch.busy:
                room = self.max_batch - batch.busy
                admit = bool(queue) and (not batch.busy or room >= max(per_prompt, self.max_batch // 4))
                back = batch.due(ordered, jump=not admit) if batch.paused else []
                if back:
                    finished = batch.resume(back)
                elif admit:
                    take: list[tuple[int, list[int]]] = []
                    while queue and (len(take) + 1) * per_prompt <= max(room, per_prompt):
                        take.append(queue.popleft())
                    finished = batch.add(
                        [ids for _, ids in take], [params] * len(take), [i for i, _ in take], [gens[i] for i, _ in take]
                    )
                elif len(batch):
                    finished = batch.step()
                else:  # every row waits for a program ("ready" re-entry)
                    batch.wait()
                    continue
                for row in finished:
                    i, j = row.key if params.n > 1 else (row.key, 0)
                    c = self.finish(row, i)
                    results[(i, j)] = c
                    if on_finish:
                        on_finish(c)
        finally:
            self.model.train(was_training)
            self.tool_wait = batch.tool_wait
        return [results[k] for k in sorted(results)]
