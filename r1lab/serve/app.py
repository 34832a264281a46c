"""The OpenAI-compatible server: `create_app` builds a FastAPI app around one model and its batching engine.

Endpoints: `POST /v1/chat/completions` (the thinking in `reasoning_content`, the answer in `content`; plain or
SSE), `POST /v1/completions` (raw text), `GET /v1/models`, `GET /health`, and the web chat page at `/`. The same
API paths also answer without the `/v1` prefix, as DeepSeek's do. Request handlers validate, render the chat
template and tokenise (in a worker thread), and hand a `Job` to the engine; tokens come back through a per-request
asyncio queue.

What a client may cost the server is bounded (`ServerLimits`): the request head and body must arrive in time, the
body is capped, connections are counted, and only known Host names are answered (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from r1lab.reasoning import ReasoningStream
from r1lab.serve import protocol as P
from r1lab.serve.engine import Event, Job
from r1lab.serve.limits import ServerLimits
from r1lab.serve.service import DEFAULT_MAX_TOKENS, ModelService, Prepared

log = logging.getLogger("r1lab.serve")

STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
OPEN_PATHS = ("/", "/health", "/favicon.ico")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
MAX_HEAD_BYTES = 16 * 1024  # request line and headers (h11's default, fixed here)


# ----------------------------------------------------------------------------- plumbing


class _Sink:
    """Receives engine events on the engine thread and queues them on the request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()

    def __call__(self, events: list[Event]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, events)

    async def next(self, timeout: float | None = None) -> list[Event]:
        """Every event queued so far (at least one): a slow reader gets fewer, larger chunks."""
        events = list(await asyncio.wait_for(self.queue.get(), timeout))
        while not self.queue.empty():
            events += self.queue.get_nowait()
        return events


class _CancellingStream(StreamingResponse):
    """A streaming response that stops its generation however the stream ends (done, error, client gone)."""

    def __init__(self, content, on_close):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _BearerAuth:
    """ASGI middleware: API paths need `Authorization: Bearer KEY`, compared in constant time."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not _is_open(scope["path"]):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            problem = None
            if not header:
                problem = (
                    "You didn't provide an API key. Send it in the Authorization header: "
                    "'Authorization: Bearer YOUR_KEY'.",
                    None,
                )
            elif scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                problem = (
                    "Incorrect API key provided. Use the key the server was started with (--api-key).",
                    "invalid_api_key",
                )
            if problem:
                body = P.error_body(problem[0], code=problem[1])
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimits:
    """ASGI middleware: a request body must arrive whole within `timeout` seconds and hold at most `max_bytes`
    (else 408 / 413 in OpenAI's error shape, and the connection closes). The app then reads it from memory."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(413, self._too_large(int(declared)), scope, receive, send)
            return
        chunks, size, more = [], 0, True
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            while more:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size, more = size + len(chunks[-1]), message.get("more_body", False)
                if size > self.max_bytes:
                    await _refuse(413, self._too_large(None), scope, receive, send)
                    return
        except asyncio.TimeoutError:
            message = (
                f"The request body did not arrive within {self.timeout:g} s (got {size:,} bytes); send it "
                "at once, or start the server with a longer --body-timeout."
            )
            await _refuse(408, message, scope, receive, send)
            return
        body = b"".join(chunks)

        async def replay():
            nonlocal body
            if body is None:
                return await receive()  # after the body: the client's disconnect, when it comes
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        await self.app(scope, replay, send)

    def _too_large(self, size: int | None) -> str:
        got = f" ({size:,} bytes)" if size is not None else ""
        return (
            f"The request body is too large{got}: this server accepts at most {self.max_bytes:,} bytes. Shorten "
            "the request, or start the server with a larger --max-body-mb."
        )


class _HostCheck(TrustedHostMiddleware):
    """Starlette's Host allow-list, answering in OpenAI's error shape, with IP literals allowed when the server listens
    on every interface. It defeats DNS rebinding, where a page on a name the attacker controls re-points that name at
    this machine: its requests carry that name as their Host. An IP literal means the browser addressed this server
    by number, and so is same-origin with it."""

    def __init__(self, app, allowed_hosts: list[str], any_ip: bool):
        super().__init__(app, allowed_hosts, www_redirect=False)
        self.any_ip = any_ip

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allow_any:  # the app serves no websockets
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        host = _host_name(header)
        if host is not None and self._allows(host):
            await self.app(scope, receive, send)
            return
        message = (
            f"This server does not answer to the Host {header!r}; it answers to "
            f"{', '.join(self.allowed_hosts)}{' and IP addresses' if self.any_ip else ''}. Start it with "
            f"--allowed-host {host or 'NAME'} to answer to that name too."
        )
        await _refuse(400, message, scope, receive, send)

    def _allows(self, host: str) -> bool:
        if self.any_ip and _is_ip(host):
            return True
        return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in self.allowed_hosts)


def _host_name(header: str) -> str | None:
    """The name in a Host header, lowercased, without port or IPv6 brackets; None if it is not one."""
    m = _HOST.fullmatch(header)
    if m is None or (m["ipv6"] is not None and not _is_ip(m["ipv6"])):
        return None
    return (m["ipv6"] or m["name"]).lower()


_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\s:/\\@?#\[\]]+))(?::[0-9]{1,5})?")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def allowed_host_names(bind_host: str, extra=()) -> tuple[list[str], bool]:
    """(Host names the server answers to, whether any IP literal is also answered) for a server bound to
    `bind_host`: localhost, the bound name or address, this machine's name when bound to every interface, `extra`."""
    wildcard = bind_host in WILDCARD_HOSTS
    names = list(LOCAL_HOSTS) + [socket.gethostname() if wildcard else bind_host] + list(extra)
    names = [n.strip().strip("[]").lower() for n in names]
    return list(dict.fromkeys(n for n in names if n)), wildcard


async def _refuse(status: int, message: str, scope, receive, send) -> None:
    """Answer a client error in OpenAI's shape and close the connection (the rest of its request is not read)."""
    body = P.error_body(message, code={408: "timeout", 413: "request_too_large"}.get(status))
    await JSONResponse(body, status, headers={"Connection": "close"})(scope, receive, send)


class _HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head: a connection whose request line and headers are
    not complete `header_timeout` seconds after it opened (or after the first byte of a later request) is closed, with
    a 408 if part of a head came. uvicorn closes idle keep-alive connections, but not one whose head trickles in."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._stop_head_timer()

    def connection_lost(self, exc) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/static/")


def _error(status: int, body: dict) -> JSONResponse:
    return JSONResponse(body, status)


# ----------------------------------------------------------------------------- the app


def create_app(
    model_source,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 64,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    limits: ServerLimits | None = None,
    tools: str = "none",
) -> FastAPI:
    """The server for a model directory or a `(model, tokenizer)` pair. The engine thread starts with the app
    (its lifespan) and stops with it. `app.state.service` exposes the model service and its engine;
    `app.state.limits` the limits that `server_config` applies to the connections. `tools="python"` lets replies
    call the Python tool, its programs run in the sandbox on this machine (r1lab.tools)."""
    from r1lab.tools import make_tool

    limits = (limits or ServerLimits()).validate()
    if isinstance(model_source, (tuple, list)):
        lm, tokenizer = model_source
        default_name = Path(str(getattr(lm.config, "name_or_path", "") or "")).name
    else:
        from r1lab.model.load import load_model_and_tokenizer

        lm, tokenizer = load_model_and_tokenizer(model_source, device=device, dtype=dtype)
        default_name = Path(str(model_source)).resolve().name
    service = ModelService(
        lm,
        tokenizer,
        model_name or default_name or "r1lab",
        max_batch=max_batch,
        default_max_tokens=default_max_tokens,
        tools=make_tool(tools, tokenizer),
    )

    @asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.engine.close)

    app = FastAPI(title="r1lab", version=P.FINGERPRINT, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service, app.state.limits = service, limits
    app.add_middleware(_BodyLimits, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)
    if api_key:  # added last, so it runs first: an unauthenticated client's body is never read
        app.add_middleware(_BearerAuth, key=api_key)

    # -------------------------------------------------------------- errors: always OpenAI's body, never a crash

    @app.exception_handler(P.APIError)
    async def _api_error(request, exc: P.APIError):
        return _error(exc.status, exc.body())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = P.validation_message(list(exc.errors()))
        if param is None and "json" not in request.headers.get("content-type", ""):
            message += " Send the body as JSON with the header 'Content-Type: application/json'."
        return _error(400, P.error_body(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        known = {
            404: f"Unknown path {request.url.path}; the API is under /v1 (GET /v1/models).",
            405: f"Method {request.method} is not allowed on {request.url.path}.",
        }
        message = known.get(exc.status_code, str(exc.detail))
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            message = (
                "We could not parse the JSON body of your request: it is not UTF-8 JSON, or it nests too "
                "deeply. Send a JSON object."
            )
        return _error(exc.status_code, P.error_body(message, code={404: "not_found"}.get(exc.status_code)))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        message = f"The server had an error while processing your request ({type(exc).__name__})."
        return _error(500, P.error_body(message, type="server_error"))

    # -------------------------------------------------------------- routes

    @app.get("/health")
    async def health():
        ok = service.engine.alive
        body = {"status": "ok" if ok else "engine stopped", "model": service.name, **service.engine.load()}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/v1/models")
    @app.get("/models", include_in_schema=False)
    async def models():
        return {"object": "list", "data": [P.model_card(service.name, service.created, service.context)]}

    @app.get("/v1/models/{model_id:path}")
    @app.get("/models/{model_id:path}", include_in_schema=False)
    async def model(model_id: str):
        if model_id != service.name:
            raise P.APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return P.model_card(service.name, service.created, service.context)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions", include_in_schema=False)
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        prep = await asyncio.to_thread(service.prepare, body)  # rendering and tokenising a long chat takes a while
        if body.stream:
            return _stream_chat(service, prep, body)
        return await _complete_chat(service, prep, request)

    @app.post("/v1/completions")
    @app.post("/completions", include_in_schema=False)
    async def completions(body: P.CompletionRequest, request: Request):
        prep = await asyncio.to_thread(service.prepare, body)
        if body.stream:
            return _stream_text(service, prep, body)
        return await _complete_text(service, prep, request)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ----------------------------------------------------------------------------- non-streaming


async def _collect(service: ModelService, prep: Prepared, request: Request) -> list[Event] | None:
    """Run the request's jobs to the end; the finishing Event of every choice, in choice order. None if the
    client disconnected (its rows are cancelled)."""
    sink = _Sink()
    jobs = service.jobs(prep, sink)
    total = len(jobs) * prep.params.n
    done: dict[int, Event] = {}
    try:
        for job in jobs:
            service.engine.submit(job)
        checked = time.monotonic()
        while len(done) < total:
            try:
                events = await sink.next(timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                events = []
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                if await request.is_disconnected():
                    return None
                checked = time.monotonic()
            for ev in events:
                if ev.finish_reason == "error":
                    raise P.APIError(500, f"Generation failed: {ev.error}", type="server_error")
                if ev.finish_reason:
                    done[ev.choice] = ev
    finally:
        for job in jobs:
            service.engine.cancel(job.id)
    return [done[c] for c in range(total)]


def _final(ev: Event) -> tuple[str, list[int], str]:
    """(whole text, every generated id, finish reason) of a choice's last event, which carries all three."""
    assert ev.full_text is not None and ev.token_ids is not None and ev.finish_reason is not None
    return ev.full_text, ev.token_ids, ev.finish_reason


async def _complete_chat(service: ModelService, prep: Prepared, request: Request):
    finals = await _collect(service, prep, request)
    if finals is None:
        return JSONResponse(P.error_body("client disconnected"), 499)
    choices, completion, reasoning_total = [], 0, 0
    for ev in finals:
        text, ids, finish_reason = _final(ev)
        reasoning, content = prep.split(text)
        choices.append(P.chat_choice(ev.choice, reasoning, content, finish_reason))
        completion += len(ids)
        reasoning_total += service.reasoning_tokens(ids, reasoning is not None)
    usage = P.usage(len(prep.prompts[0]), completion, reasoning_total)
    return P.chat_completion(P.new_id("chatcmpl"), service.name, choices, usage)


async def _complete_text(service: ModelService, prep: Prepared, request: Request):
    finals = await _collect(service, prep, request)
    if finals is None:
        return JSONResponse(P.error_body("client disconnected"), 499)
    choices, completion = [], 0
    for ev in finals:
        text, ids, finish_reason = _final(ev)
        choices.append(P.text_choice(ev.choice, text, finish_reason))
        completion += len(ids)
    usage = P.usage(sum(len(p) for p in prep.prompts), completion)
    return P.text_completion(P.new_id("cmpl"), service.name, choices, usage, int(time.time()))


# ----------------------------------------------------------------------------- streaming


def _stream(service: ModelService, prep: Prepared, render) -> StreamingResponse:
    """SSE response around `render(events_iterator)`; the jobs are submitted when the stream starts and cancelled
    when it ends for any reason."""
    jobs: list[Job] = []

    async def body():
        sink = _Sink()
        jobs.extend(service.jobs(prep, sink))
        for job in jobs:
            service.engine.submit(job)
        total, finished = len(jobs) * prep.params.n, 0

        async def events():
            nonlocal finished
            while finished < total:
                batch = await sink.next()
                finished += sum(1 for ev in batch if ev.finish_reason)
                yield batch

        try:
            async for chunk in render(events()):
                yield chunk
        except _StreamFailed as e:
            yield P.sse(P.error_body(str(e), type="server_error"))
        yield P.sse("[DONE]")

    def close():
        for job in jobs:
            service.engine.cancel(job.id)

    return _CancellingStream(body(), close)


class _StreamFailed(Exception):
    pass


def _stream_chat(service: ModelService, prep: Prepared, req: P.ChatCompletionRequest) -> StreamingResponse:
    rid, created, n = P.new_id("chatcmpl"), int(time.time()), prep.params.n
    with_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choice: dict | None = None, usage=None) -> bytes:
        return P.sse(P.chat_chunk(rid, service.name, created, [choice] if choice else [], usage, with_usage))

    async def render(events):
        splitters = [prep.stream() for _ in range(n)]
        for j in range(n):
            yield chunk(P.chunk_choice(j, {"role": "assistant", "content": ""}))
        completion = reasoning_total = 0
        async for batch in events:
            for j, (reasoning, content, ev) in _merge(batch, splitters).items():
                if ev is not None and ev.finish_reason == "error":
                    raise _StreamFailed(f"Generation failed: {ev.error}")
                if reasoning:
                    yield chunk(P.chunk_choice(j, {"reasoning_content": reasoning}))
                if content:
                    yield chunk(P.chunk_choice(j, {"content": content}))
                if ev is not None:
                    has_reasoning = prep.split(ev.full_text)[0] is not None
                    completion += len(ev.token_ids)
                    reasoning_total += service.reasoning_tokens(ev.token_ids, has_reasoning)
                    yield chunk(P.chunk_choice(j, {}, ev.finish_reason))
        if with_usage:
            yield chunk(None, P.usage(len(prep.prompts[0]), completion, reasoning_total))

    return _stream(service, prep, render)


def _merge(batch: list[Event], splitters: list[ReasoningStream]) -> dict[int, tuple[str, str, Event | None]]:
    """Per choice: the reasoning and content text of these events (in order), and the finishing event if any."""
    out: dict[int, tuple[str, str, Event | None]] = {}
    for ev in batch:
        r, c, fin = out.get(ev.choice, ("", "", None))
        s = splitters[ev.choice]
        dr, dc = s.feed(ev.text)
        r, c = r + dr, c + dc
        if ev.finish_reason:
            dr, dc = s.finish()
            r, c, fin = r + dr, c + dc, ev
        out[ev.choice] = (r, c, fin)
    return out


def _stream_text(service: ModelService, prep: Prepared, req: P.CompletionRequest) -> StreamingResponse:
    rid, created = P.new_id("cmpl"), int(time.time())
    with_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def render(events):
        completion = 0
        async for batch in events:
            for ev in batch:
                if ev.finish_reason == "error":
                    raise _StreamFailed(f"Generation failed: {ev.error}")
                if ev.text or ev.finish_reason:
                    choice = P.text_choice(ev.choice, ev.text, ev.finish_reason)
                    yield P.sse(P.text_completion(rid, service.name, [choice], None, created, chunk=True))
                if ev.finish_reason:
                    completion += len(ev.token_ids)
        if with_usage:
            prompt_tokens = sum(len(p) for p in prep.prompts)
            usage = P.usage(prompt_tokens, completion)
            yield P.sse(P.text_completion(rid, service.name, [], usage, created, chunk=True))

    return _stream(service, prep, render)


# ----------------------------------------------------------------------------- running it


def server_config(app: FastAPI, host: str, port: int, log_level: str = "info", graceful_shutdown_s: int = 3):
    """uvicorn's settings for `app` bound to host:port, with the app's `ServerLimits` on its connections: the
    request-head deadline (our h11 protocol), keep-alive, the connection limit, and the Host allow-list for `host`."""
    import uvicorn

    limits: ServerLimits = app.state.limits
    names, any_ip = allowed_host_names(host, limits.allowed_hosts)
    return uvicorn.Config(
        _HostCheck(app, names, any_ip),
        host=host,
        port=port,
        log_level=log_level,
        # uvicorn calls `http` to make each connection's protocol: a factory works, though it annotates a class
        http=functools.partial(_HeadTimeoutH11, header_timeout=limits.header_timeout),  # type: ignore[arg-type]
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive,  # type: ignore[arg-type]  # annotated int; used as seconds (float)
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_graceful_shutdown=graceful_shutdown_s,
    )


class BackgroundServer:
    """Serve an app with uvicorn on a background thread (tests, benchmarks, notebooks): `with BackgroundServer(app)
    as s: s.url`. Port 0 picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(server_config(app, host, port, log_level, graceful_shutdown_s=2))
        self.app, self.host = app, host
        self.thread = threading.Thread(target=self.server.run, name="r1lab-uvicorn", daemon=True)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def check_listen(host: str, port: int) -> None:
    """Bind host:port once as uvicorn will (same family, SO_REUSEADDR), so that a --host this machine does not have
    or a --port in use is one line before the model loads, not uvicorn's log lines and exit status 1 or 3 after."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            raise ValueError(
                f"--host {host!r} is not an address of this machine ({e.strerror}); use 127.0.0.1 "
                "(this machine only) or 0.0.0.0 (every interface)"
            ) from None
        except OSError as e:
            hint = (
                "stop what listens there, or pick another --port (0: any free one)"
                if e.errno == errno.EADDRINUSE
                else "check --host and --port"
            )
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); {hint}") from None


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 64,
    device="cpu",
    dtype=torch.float32,
    log_level: str = "info",
    limits: ServerLimits | None = None,
    tools: str = "none",
) -> None:
    """`r1lab serve`: load the model, print where to find it, serve until interrupted."""
    import uvicorn

    limits = (limits or ServerLimits()).validate()
    check_listen(host, port)
    app = create_app(
        model_dir,
        api_key=api_key,
        model_name=model_name,
        max_batch=max_batch,
        device=device,
        dtype=dtype,
        limits=limits,
        tools=tools,
    )
    name = app.state.service.name
    shown = "localhost" if host in WILDCARD_HOSTS else f"[{host}]" if ":" in host else host
    names, any_ip = allowed_host_names(host, limits.allowed_hosts)
    print(
        f"r1lab: serving {name} (context {app.state.service.context} tokens, up to {max_batch} rows per step)\n"
        f"  web chat  http://{shown}:{port}/\n"
        f"  API       http://{shown}:{port}/v1   (OpenAI-compatible; model name {json.dumps(name)})\n"
        f"  answers to Host {', '.join(names)}{' and IP addresses' if any_ip else ''} (more: --allowed-host NAME)"
        + ("\n  API key required: Authorization: Bearer ..." if api_key else "")
        + (f"\n  tool: {tools} (replies' programs run in the sandbox on this machine)" if tools != "none" else ""),
        flush=True,
    )
    uvicorn.Server(server_config(app, host, port, log_level)).run()
