"""The OpenAI wire format the server speaks: validated request bodies, response and chunk bodies, the error body.

Requests are pydantic models that ignore unknown fields (clients send many we do not use). Every error leaves the
server as OpenAI's `{"error": {"message", "type", "param", "code"}}`, so clients raise their usual exceptions.
Responses follow the DeepSeek reasoner convention: `reasoning_content` (the thinking) beside `content`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

import r1lab

MAX_STOP = 4  # OpenAI accepts up to 4 stop sequences
MAX_STOP_CHARS = 256  # per stop sequence: the sampler decodes that many tokens back at every step to look for it
MAX_N = 16  # choices per request; each is a row in the running batch (and at most --max-batch)
MAX_MESSAGES = 10_000  # messages per chat, prompts per completion request: a count checked before the items are,
MAX_PROMPTS = 2_048  # so a body of a million tiny items fails at once instead of holding the event loop
FINGERPRINT = f"r1lab-{r1lab.__version__}"

REASONING_IN_INPUT = (
    "The reasoning_content is an intermediate result for display purposes only and will not be "
    "included in the context for inference. Please remove the reasoning_content from your API "
    "request before sending it again."
)


class APIError(Exception):
    """An error answered to the client with an HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic/FastAPI validation errors: the first error, named by its field path."""
    if not errors:
        return "The request body is invalid.", None
    e = errors[0]
    loc = [x for x in e.get("loc", ()) if x != "body"]
    # drop pydantic's union-branch labels ("str", "list[str]", "function-after[...]") from the path
    loc = [x for x in loc if isinstance(x, int) or not any(c in str(x) for c in "[]") and x not in ("str", "int")]
    param = "".join(f"[{x}]" if isinstance(x, int) else (f".{x}" if i else str(x)) for i, x in enumerate(loc)) or None
    if e.get("type") == "json_invalid":
        ctx = (e.get("ctx") or {}).get("error", "")
        return (
            f"We could not parse the JSON body of your request ({ctx}). The body must be a JSON object; "
            "check quoting and commas.",
            None,
        )
    if e.get("type") == "missing":
        if param is None:
            return "The request body is empty; send a JSON object.", None
        return f"Missing required parameter: '{param}'.", param
    if param is None:
        return f"The request body must be a JSON object ({e.get('msg', 'invalid')}).", None
    got = e.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) <= 80 else type(got).__name__
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    return f"Invalid value for '{param}': {msg} (got {shown}).", param


# ----------------------------------------------------------------------------- requests


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None
    reasoning_content: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v):
        """A string, or OpenAI's content parts of type "text" (joined): this server reads text only."""
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("content must be a string or a list of text parts")
        for part in v:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, not {kind!r}"
                )
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p["text"] for p in self.content)


class StreamOptions(_Body):
    include_usage: StrictBool = False


Stop = str | list[str] | None
Seed = Annotated[StrictInt, Field(ge=-(1 << 63), le=(1 << 64) - 1)]


class SamplingFields(_Body):
    """The sampling parameters both endpoints share. `top_k` and `ignore_eos` are extensions (as in vLLM): top_k 0
    or -1 is off, and a top_k at or above the vocabulary size keeps every token, as off does."""

    model: str | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    max_tokens: StrictInt | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    seed: Seed | None = None
    stop: Stop = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"stop sequences may have at most {MAX_STOP_CHARS} characters")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _few_enough(cls, v):
        if isinstance(v, list) and len(v) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} messages are allowed (got {len(v)})")
        return v

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(value, its field name): max_completion_tokens wins over the deprecated max_tokens."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        """A string, a list of strings, a list of token ids, or a list of token-id lists; never empty lists."""
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("prompt must be a string, a non-empty list of strings, or token ids")
        if not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed in one request (got {len(v)})")
        if all(isinstance(x, str) for x in v):
            return v
        if all(type(x) is int for x in v):
            return v
        if all(isinstance(x, list) and x and all(type(t) is int for t in x) for x in v):
            return v
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids, or a list of non-empty "
            "token-id lists (not a mix)"
        )

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[int(x) for x in p]]  # type: ignore[arg-type]  # one prompt as token ids
        return [x for x in p if not isinstance(x, int)]

    def requested_max_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict:
    u: dict = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning_tokens is not None:
        u["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return u


def chat_completion(rid: str, model: str, choices: list[dict], usage_: dict, created: int | None = None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
        "usage": usage_,
    }


def chat_choice(index: int, reasoning: str | None, content: str, finish_reason: str) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": content, "reasoning_content": reasoning},
        "logprobs": None,
        "finish_reason": finish_reason,
    }


def chat_chunk(
    rid: str, model: str, created: int, choices: list[dict], usage_: dict | None = None, with_usage_field: bool = False
) -> dict:
    c = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
    }
    if usage_ is not None or with_usage_field:
        c["usage"] = usage_
    return c


def chunk_choice(index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def text_completion(
    rid: str, model: str, choices: list[dict], usage_: dict | None, created: int, chunk: bool = False
) -> dict:
    c = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
    }
    if not chunk or usage_ is not None:
        c["usage"] = usage_
    return c


def text_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def model_card(name: str, created: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "r1lab", "max_model_len": context}


def sse(data: Any) -> bytes:
    import json

    # ASCII only: generated text can hold U+2028, U+2029 or U+0085, which line readers built on str.splitlines
    # (httpx's aiter_lines among them) take for line ends, cutting the JSON of a chunk in two
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
