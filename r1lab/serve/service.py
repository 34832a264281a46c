"""The model behind the API: renders chats with the model's template, checks requests against its context and
vocabulary, turns them into sampling parameters and engine jobs. Used by the HTTP app and the terminal chat.

Everything a request asks for is checked here, before it reaches the running batch, where one bad row would fail
every request in it. `prepare` renders and tokenises, which takes a while for a long prompt: the app runs it in a
worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from r1lab.reasoning import THINK_END, THINK_START, ReasoningStream, split_reasoning
from r1lab.sampler import Sampler, SamplingParams
from r1lab.serve import protocol as P
from r1lab.serve.engine import Engine, Job

DEFAULT_TEMPERATURE = 0.6  # DeepSeek's advice for R1 models (and the R1 evaluation protocol)
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_TOKENS = 4096  # when a request gives none: this, or what is left of the context if less


@dataclass
class Prepared:
    """A validated request, ready for the engine: prompt ids and sampling parameters per prompt."""

    prompts: list[list[int]]
    params: SamplingParams
    prefilled: bool  # the prompt ends inside `<think>`: the completion starts with reasoning

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning_content, content) of a reply: the thinking apart, the answer without R1-Zero's answer tags."""
        return split_reasoning(text, prefilled=self.prefilled, answer_tags=True)

    def stream(self) -> ReasoningStream:
        """`split` for a reply as it streams."""
        return ReasoningStream(prefilled=self.prefilled, answer_tags=True)


class ModelService:
    """One model behind the API: prompt rendering, request checks against its context, and the engine."""

    def __init__(
        self, model, tokenizer, name: str, max_batch: int = 64, default_max_tokens: int = DEFAULT_MAX_TOKENS, tools=None
    ):
        self.tokenizer, self.name = tokenizer, name
        # with a tool (r1lab.tools), replies may call it; rows re-enter as soon as their programs end
        self.sampler = Sampler(model, tokenizer, max_batch=max_batch, tools=tools, reentry="ready")
        self.engine = Engine(self.sampler, max_batch=max_batch)
        self.context, self.vocab_size = self.engine.context, self.engine.vocab_size
        # no token is longer than this, so a text of more than context x this many characters cannot fit
        self.token_chars = max(map(len, tokenizer.get_vocab()))
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())

    # -------------------------------------------------------------- prompts

    def render(self, messages: list[P.ChatMessage]) -> str:
        """The chat as prompt text: the model's own chat template, else DeepSeek-R1's format."""
        for i, m in enumerate(messages):
            if m.role == "assistant" and m.reasoning_content is not None:
                raise P.APIError(400, P.REASONING_IN_INPUT, param=f"messages[{i}].reasoning_content")
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            if getattr(self.tokenizer, "chat_template", None):
                return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            from r1lab.tokenizer import apply_template

            return apply_template(self.tokenizer, turns, "r1")
        except Exception as e:  # jinja errors (e.g. "roles must alternate") are the caller's to fix
            raise P.APIError(400, f"The chat template cannot render these messages: {e}", param="messages") from None

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        """Token ids of a prompt that leaves room for a reply. A text too long for the context is refused before it
        is tokenised whole: by its length in characters, or by the tokens of its first part."""
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise P.APIError(
                    400, f"Token id {bad[0]} is outside this model's vocabulary of {self.vocab_size}.", param=param
                )
            ids = list(prompt)
        else:
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                what = "messages contain" if param == "messages" else "prompt contains"
                raise P.APIError(
                    400,
                    f"The {what} invalid Unicode ({e.reason} at character {e.start}); send UTF-8 text.",
                    param=param,
                ) from None
            if len(prompt) > self.context * self.token_chars:
                self._too_long(
                    param,
                    f"{len(prompt):,} characters, more than {self.context} tokens of at most "
                    f"{self.token_chars} characters can hold",
                )
            # the words before a space tokenise as they do in the whole text: if they alone overflow, so does it
            cut = prompt.rfind(" ", 0, 2 * self.context) if len(prompt) > 2 * self.context else -1
            if cut > 0 and len(head := self._tokenize(prompt[:cut])) >= self.context:
                self._too_long(param, f"more than {len(head):,} tokens (its first {cut:,} characters alone)")
            ids = self._tokenize(prompt)
        if not ids:
            raise P.APIError(400, "The prompt is empty; give at least one token of text.", param=param)
        if len(ids) >= self.context:
            self._too_long(param, f"{len(ids)} tokens, which leaves no room for a reply")
        return ids

    def _tokenize(self, text: str) -> list[int]:
        return self.sampler.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _too_long(self, param: str, what: str):
        raise P.APIError(
            400,
            f"This model's maximum context length is {self.context} tokens, but the "
            f"{'messages render to' if param == 'messages' else 'prompt has'} {what}. Shorten the "
            f"{'messages' if param == 'messages' else 'prompt'}.",
            param=param,
            code="context_length_exceeded",
        )

    def prepare(self, req: P.ChatCompletionRequest | P.CompletionRequest) -> Prepared:
        """Check the model name, render and encode the prompt(s), and turn the request into SamplingParams.
        A max_tokens within the context but beyond what the prompt leaves is clamped (finish_reason "length")."""
        if req.model is not None and req.model != self.name:
            raise P.APIError(
                404,
                f"The model `{req.model}` does not exist; this server serves `{self.name}` (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )
        if req.n > self.engine.max_batch:
            raise P.APIError(
                400,
                f"Invalid 'n': {req.n}. This server decodes at most {self.engine.max_batch} "
                f"sequences at once (--max-batch); ask for n <= {self.engine.max_batch}.",
                param="n",
                code="invalid_value",
            )
        count = 1 if isinstance(req, P.ChatCompletionRequest) else len(req.prompts())
        if count * req.n > 8 * self.engine.max_batch:
            raise P.APIError(
                400,
                f"{count} prompts x n={req.n} is too many choices for one request "
                f"(at most {8 * self.engine.max_batch}); split it.",
                param="prompt",
            )
        if isinstance(req, P.ChatCompletionRequest):
            text = self.render(req.messages)
            prompts = [self.encode(text, "messages")]
            prefilled = text.rstrip().endswith(THINK_START)
        else:
            prompts = [self.encode(p, "prompt") for p in req.prompts()]
            prefilled = False
        max_tokens, field = req.requested_max_tokens()
        if max_tokens is not None and not 1 <= max_tokens <= self.context:
            raise P.APIError(
                400,
                f"Invalid '{field}': {max_tokens}. It must be between 1 and this model's context "
                f"length of {self.context}.",
                param=field,
                code="invalid_value",
            )
        room = self.context - max(len(p) for p in prompts)
        temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
        top_p = DEFAULT_TOP_P if req.top_p is None else req.top_p
        if top_p == 0:  # OpenAI allows 0: only the most likely token
            temperature, top_p = 0.0, 1.0
        top_k = req.top_k if req.top_k is not None and 0 < req.top_k < self.vocab_size else 0  # else: every token
        params = SamplingParams(
            max_new_tokens=min(max_tokens or min(self.default_max_tokens, room), room),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            n=req.n,
            seed=req.seed,
            stop=req.stop_list(),
            stop_token_ids=[] if req.ignore_eos else None,
        )
        return Prepared(prompts, params.validate(), prefilled)

    def jobs(self, prep: Prepared, sink) -> list[Job]:
        jobs = []
        for i, ids in enumerate(prep.prompts):
            gen = None
            if prep.params.seed is not None:
                gen = torch.Generator(device=self.sampler.backend.device)
                gen.manual_seed(prep.params.seed)
            jobs.append(Job(ids, prep.params, sink, gen, choice_offset=i * prep.params.n))
        return jobs

    def reasoning_tokens(self, ids: list[int], has_reasoning: bool) -> int:
        """Generated tokens up to and including the closing `</think>` (all of them if it never closed)."""
        if not has_reasoning or not ids:
            return 0
        decode = self.sampler.decode
        if THINK_END not in decode(ids):
            return len(ids)
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if THINK_END in decode(ids[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return lo
