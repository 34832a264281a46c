"""A client for OpenAI-compatible `/chat/completions` endpoints (DeepSeek's API, vLLM, `r1lab serve`) that a long,
paid run can lean on: bounded concurrency, a per-request timeout, retries with backoff, a disk cache, token counts.

Retried: 408, 409, 425, 429 and every 5xx, timeouts, refused or dropped connections, and a 200 whose body is not a
chat completion. The wait doubles from `retry_wait` seconds (with jitter, at most `max_wait`) unless the server's
Retry-After says how long (honoured up to 10 minutes); after `max_retries` retries the run stops with an
`EndpointError`. Other statuses (a wrong key, model or request) are not retried. After the first error that stops
the run no new request starts; those already on the wire finish, and their answers are kept.

The cache holds one file per answered request, `<cache_dir>/<key[:2]>/<key>.json` with key = sha256 of the URL,
the request body and the caller's tag, holding {"url", "body", "tag", "response"}. It is written to a temporary
file, synced and renamed, so a crash leaves the whole answer or none; errors are never cached. A request whose
answer is cached is not sent again, and its tokens are counted as cached, not as paid again.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

from r1lab.reasoning import THINK_END, THINK_START

RETRY_STATUSES = frozenset({408, 409, 425, 429})  # and every 5xx
MAX_RETRY_AFTER = 600.0  # seconds: a server that asks to wait longer is treated as if it asked for this


class EndpointError(ValueError):
    """An endpoint that refused a request or kept failing; the message names the URL, the status and what to do."""


@dataclass
class Reply:
    """One choice of a chat completion and the tokens its request used."""

    reasoning: str | None  # `reasoning_content` (None: the server split off no thinking)
    content: str
    finish_reason: str | None  # "stop", or "length" when max_tokens cut the reply
    prompt_tokens: int = 0
    completion_tokens: int = 0  # the thinking included, as DeepSeek and OpenAI count them
    reasoning_tokens: int | None = None
    cached: bool = False  # answered by an earlier run: not paid for again

    @property
    def text(self) -> str:
        """The reply as a local model writes it: the thinking inline as `<think>\\n...\\n</think>\\n\\n` before the
        answer, so served and local teachers go through the same parsing."""
        if self.reasoning is None:
            return self.content
        return f"{THINK_START}\n{self.reasoning}\n{THINK_END}\n\n{self.content}"


@dataclass
class Usage:
    """Requests and tokens summed over replies."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    def add(self, r: Reply) -> None:
        self.requests += 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self.reasoning_tokens += r.reasoning_tokens or 0

    def cost(self, price_per_mtok: Sequence[float]) -> float | None:
        """Dollars at `price_per_mtok`: one price for every token, or (input, output); None without a price."""
        if not price_per_mtok:
            return None
        p_in, p_out = (price_per_mtok[0], price_per_mtok[-1])
        return (self.prompt_tokens * p_in + self.completion_tokens * p_out) / 1e6


def parse_reply(data) -> Reply:
    """The first choice of a chat-completion body; ValueError when the body is not one. `reasoning_content` (or
    vLLM's newer `reasoning`) holds the thinking when the server splits it off."""
    try:
        choice = data["choices"][0]
        msg = choice["message"]
        content, reasoning = msg.get("content"), msg.get("reasoning_content", msg.get("reasoning"))
        usage = data.get("usage") or {}
        details = usage.get("completion_tokens_details") or {}
        reply = Reply(
            reasoning=reasoning,
            content=content or "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            reasoning_tokens=None if details.get("reasoning_tokens") is None else int(details["reasoning_tokens"]),
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"no chat completion in the body ({type(e).__name__}: {e})") from None
    if not isinstance(reply.content, str) or not isinstance(reply.reasoning, (str, type(None))):
        raise ValueError("message content or reasoning_content is not a string")
    return reply


class ChatClient:
    """Requests to one model at one endpoint. `complete(bodies)` answers a list of request bodies, in order;
    `answered` and `cached` count the tokens of fresh and cached replies, `retried` the retries by cause."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        concurrency: int = 8,
        timeout: float = 600.0,
        max_retries: int = 6,
        retry_wait: float = 1.0,
        max_wait: float = 60.0,
        cache_dir: str | Path | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"the endpoint URL must start with http:// or https:// (got {base_url!r})")
        if concurrency < 1 or timeout <= 0 or max_retries < 0 or retry_wait < 0 or max_wait < 0:
            raise ValueError(
                f"need concurrency >= 1, timeout > 0 and retries, waits >= 0 (got concurrency "
                f"{concurrency}, timeout {timeout}, max_retries {max_retries}, retry_wait {retry_wait})"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.concurrency, self.timeout = concurrency, timeout
        self.max_retries, self.retry_wait, self.max_wait = max_retries, retry_wait, max_wait
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.answered, self.cached = Usage(), Usage()
        self.retried: dict[str, int] = {}
        self._stop: EndpointError | None = None

    def body(self, prompt: str, *, temperature: float, top_p: float, max_tokens: int, seed: int | None) -> dict:
        """One user turn, no system prompt (the R1 protocol), one choice per request: every server supports that."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
        }
        if seed is not None:
            body["seed"] = seed
        return body

    def complete(
        self, bodies: Sequence[dict], tags: Sequence | None = None, on_reply: Callable[[Reply], None] | None = None
    ) -> list[Reply]:
        """One reply per body, in order, from the cache or the endpoint. `tags` (JSON values) join the cache key
        where bodies alone do not tell requests apart; `on_reply` is called as each reply arrives."""
        tags = list(tags) if tags is not None else [None] * len(bodies)
        if len(tags) != len(bodies):
            raise ValueError(f"{len(tags)} tags for {len(bodies)} request bodies; give one tag per body")
        return asyncio.run(self._complete(list(bodies), tags, on_reply))

    def usage(self, price_per_mtok: Sequence[float] = ()) -> dict:
        """JSON-ready token counts: fresh replies (paid by this run), cached ones (paid before), retries."""
        return {
            "url": self.url,
            "model": self.model,
            "answered": {**asdict(self.answered), "cost": self.answered.cost(price_per_mtok)},
            "cached": {**asdict(self.cached), "cost": self.cached.cost(price_per_mtok)},
            "retried": dict(self.retried),
            "price_per_mtok": list(price_per_mtok),
        }

    # -------------------------------------------------------------- requests

    async def _complete(self, bodies: list[dict], tags: list, on_reply) -> list[Reply]:
        import httpx

        self._stop = None
        sem = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:
            jobs = [self._one(client, sem, b, t, on_reply) for b, t in zip(bodies, tags)]
            results = await asyncio.gather(*jobs, return_exceptions=True)
        for r in results:  # a bug (not an endpoint error) keeps its traceback
            if isinstance(r, BaseException) and not isinstance(r, EndpointError):
                raise r
        if self._stop is not None:
            raise self._stop
        return cast("list[Reply]", results)  # no exception is left here, and every request was answered

    async def _one(self, client, sem, body: dict, tag, on_reply) -> Reply | None:
        key = self._key(body, tag)
        reply = self._read_cache(key, body, tag)
        if reply is not None:
            self.cached.add(reply)
        else:
            async with sem:
                try:
                    reply = await self._request(client, body, key, tag)
                except EndpointError as e:
                    self._stop = self._stop or e
                    return None
                if reply is None:  # another request failed: this one was not sent
                    return None
            self.answered.add(reply)
        if on_reply is not None:
            on_reply(reply)
        return reply

    async def _request(self, client, body: dict, key: str, tag) -> Reply | None:
        """The reply to one request, retried as the module says; None when another request stopped the run first."""
        for attempt in range(self.max_retries + 1):
            if self._stop is not None:
                return None
            data, cause, why, wait = await self._attempt(client, body)
            if data is not None:
                self._write_cache(key, body, tag, data)
                return parse_reply(data)
            if attempt == self.max_retries:
                raise EndpointError(
                    f"{self.url} failed {self.max_retries + 1} times in a row for one request, last with {why}; "
                    f"{self.answered.requests} requests were answered"
                    + (
                        f" and are cached in {self.cache_dir}: run the same command again to resume"
                        if self.cache_dir
                        else ""
                    )
                    + " (check that the server is up; --max-retries and --request-timeout give it longer)"
                )
            self.retried[cause] = self.retried.get(cause, 0) + 1
            if wait is None:
                wait = min(self.max_wait, self.retry_wait * 2**attempt) * random.uniform(0.5, 1.0)
            await asyncio.sleep(min(wait, MAX_RETRY_AFTER))
        return None

    async def _attempt(self, client, body: dict) -> tuple[dict | None, str, str, float | None]:
        """One POST: (chat completion body, "", "", None), or (None, cause, why, Retry-After) for a failure worth a
        retry; a refusal raises EndpointError."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:  # the whole request within the timeout, even from a server that sends keep-alive blank lines
            r = await asyncio.wait_for(client.post(self.url, json=body, headers=headers), self.timeout)
        except (httpx.TimeoutException, TimeoutError):
            return None, "timeout", f"no answer within {self.timeout:g} s", None
        except httpx.TransportError as e:
            why = f"the connection failed ({type(e).__name__}: {_one_line(str(e)) or 'closed'})"
            return None, "connection", why, None
        if r.status_code == 200:
            try:
                data = r.json()
                parse_reply(data)
            except ValueError as e:
                return (
                    None,
                    "malformed",
                    f"200 and a body that is not a chat completion ({e}: {_one_line(r.text)[:120]!r})",
                    None,
                )
            return data, "", "", None
        if r.status_code in RETRY_STATUSES or r.status_code >= 500:
            return (
                None,
                str(r.status_code),
                f"status {r.status_code} ({_error_message(r)})",
                retry_after(r.headers.get("retry-after")),
            )
        raise EndpointError(self._refusal(r))

    def _refusal(self, r) -> str:
        msg = _error_message(r)
        if r.status_code in (401, 403):
            return (
                f"{self.url} refused the API key ({r.status_code}: {msg}); pass the right key with --api-key "
                f"(or set OPENAI_API_KEY)"
            )
        if r.status_code == 404:
            return (
                f"{self.url} answered 404 ({msg}); check the model name {self.model!r} and the URL (the base "
                f"URL usually ends in /v1)"
            )
        return f"{self.url} refused the request ({r.status_code}: {msg}); fix the settings it names"

    # -------------------------------------------------------------- cache

    def _key(self, body: dict, tag) -> str:
        blob = json.dumps({"url": self.url, "body": body, "tag": tag}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.cache_dir is not None  # callers check
        return self.cache_dir / key[:2] / f"{key}.json"

    def _read_cache(self, key: str, body: dict, tag) -> Reply | None:
        """The cached reply, or None (no cache, not cached, or a file that is unreadable or for another request)."""
        if self.cache_dir is None:
            return None
        try:
            entry = json.loads(self._path(key).read_text(encoding="utf-8"))
            if (entry["url"], entry["body"], entry["tag"]) != (self.url, body, tag):
                return None
            reply = parse_reply(entry["response"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        reply.cached = True
        return reply

    def _write_cache(self, key: str, body: dict, tag, data: dict) -> None:
        if self.cache_dir is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(
                {"url": self.url, "body": body, "tag": tag, "response": data, "time": time.time()},
                f,
                ensure_ascii=False,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when is not None else None


def _error_message(r) -> str:
    """OpenAI's error message from a response body, else the start of the body."""
    try:
        msg = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = r.text
    return _one_line(str(msg))[:200] or r.reason_phrase or "no message"


def _one_line(text: str) -> str:
    return " ".join(text.split())
