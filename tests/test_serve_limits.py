"""What one client can do to the server (issue 15, part 4): a request's sampling fields are checked before they reach
the running batch, so a bad request fails alone; bodies are capped and read in bounded time; a large prompt is
tokenised off the event loop; stalled connections are closed; connections are counted; only known Host names are
answered; and client errors leave no traceback in the server's log.

The in-process server uses short limits (one second to send a head or a body) over the tiny test model given a long
context (65,536 positions), so that a prompt near the limit takes a noticeable while to tokenise."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from conftest import REPO, tiny_model_config

from r1lab.cli import main
from r1lab.model.deepseek import DeepseekV3
from r1lab.reasoning import split_reasoning
from r1lab.sampler import Sampler, SamplingParams
from r1lab.serve.app import BackgroundServer, _HostCheck, allowed_host_names, create_app
from r1lab.serve.engine import EngineStats, wait_idle
from r1lab.serve.limits import ServerLimits

NAME = "tiny-long"
MAX_BATCH = 4
LIMITS = ServerLimits(
    max_body_mb=2, header_timeout=1.0, body_timeout=1.0, max_connections=24, allowed_hosts=("chat.example.org",)
)
USER = [{"role": "user", "content": "What is 12 + 30?"}]
GOOD = {"messages": USER, "temperature": 0, "max_tokens": 120, "ignore_eos": True}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def long_model(tiny_tokenizer):
    tok = tiny_tokenizer
    cfg = tiny_model_config(
        len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=65536,
    )
    torch.manual_seed(0)
    return DeepseekV3(cfg).eval(), tok


@pytest.fixture(scope="module")
def good_reply(long_model):
    """The reference: the sampler's own greedy reply to GOOD, computed before any server runs."""
    model, tok = long_model
    prompt = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    return (
        Sampler(model, tok)
        .generate([prompt], SamplingParams(max_new_tokens=120, temperature=0, stop_token_ids=[]))[0]
        .text
    )


@pytest.fixture(scope="module")
def server(long_model, good_reply):
    with BackgroundServer(create_app(long_model, model_name=NAME, max_batch=MAX_BATCH, limits=LIMITS)) as s:
        yield s


@pytest.fixture()
def engine(server):
    engine = server.app.state.service.engine
    assert wait_idle(engine)
    engine.stats = EngineStats()
    return engine


def post(server, body, path="/v1/chat/completions", client: httpx.Client | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (client or httpx).post(
        server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60
    )


class SlowStream(threading.Thread):
    """A streamed greedy generation running in the background, each decode step slowed so others happen meanwhile."""

    def __init__(self, server, body: dict, step_s: float = 0.02):
        super().__init__(daemon=True)
        self.server, self.body, self.reasoning, self.content, self.finish = server, body, "", "", None
        self.hook = server.app.state.service.sampler.model.register_forward_hook(lambda *a: time.sleep(step_s))
        self.started = threading.Event()

    def run(self):
        try:
            with httpx.stream(
                "POST", self.server.url + "/v1/chat/completions", json={**self.body, "stream": True}, timeout=120
            ) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    self.started.set()
                    for c in json.loads(line[6:])["choices"]:
                        self.reasoning += c["delta"].get("reasoning_content") or ""
                        self.content += c["delta"].get("content") or ""
                        self.finish = c["finish_reason"] or self.finish
        finally:
            self.started.set()

    def __enter__(self):
        self.start()
        assert self.started.wait(60)
        return self

    def __exit__(self, *exc):
        self.join(120)
        self.hook.remove()

    def untouched(self, reply: str) -> bool:
        """Did it stream exactly the sampler's reply, to the end?"""
        reasoning, content = split_reasoning(reply, prefilled=True, answer_tags=True)
        return (self.reasoning, self.content, self.finish) == (reasoning or "", content, "length")


# ----------------------------------------------------------------------------- sampling fields


HOSTILE = [
    # (body or raw bytes, path, param the 400 names)
    ({"messages": USER, "top_k": 1e30}, "/v1/chat/completions", "top_k"),
    ({"messages": USER, "top_k": -2}, "/v1/chat/completions", "top_k"),
    ({"messages": USER, "n": MAX_BATCH + 1}, "/v1/chat/completions", "n"),
    ({"messages": USER, "n": MAX_BATCH + 1, "stream": True}, "/v1/chat/completions", "n"),
    ({"prompt": "hi", "n": MAX_BATCH + 1, "stream": True}, "/v1/completions", "n"),
    ({"messages": USER, "seed": 2**64}, "/v1/chat/completions", "seed"),
    ({"messages": USER, "seed": -(2**63) - 1}, "/v1/chat/completions", "seed"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "/v1/chat/completions", "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', "/v1/chat/completions", "top_p"),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
        "/v1/chat/completions",
        "temperature",
    ),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}', "/v1/chat/completions", "max_tokens"),
    ({"messages": USER, "max_tokens": 10**30}, "/v1/chat/completions", "max_tokens"),
    ({"messages": USER, "temperature": 1e308}, "/v1/chat/completions", "temperature"),
    ({"messages": USER, "stop": ["x" * 300]}, "/v1/chat/completions", "stop"),
    ({"prompt": [10**30]}, "/v1/completions", "prompt"),
    ({"prompt": [[1]] * 3000}, "/v1/completions", "prompt"),
    ({"messages": USER * 10_001}, "/v1/chat/completions", "messages"),
]


def test_hostile_sampling_fields_fail_alone_while_a_good_generation_completes_untouched(server, engine, good_reply):
    with SlowStream(server, GOOD) as good, httpx.Client() as client:
        answers = [(post(server, body, path, client), param) for body, path, param in HOSTILE]
        still_running = good.is_alive()
    for (r, param), (body, _, _) in zip(answers, HOSTILE):
        assert r.status_code == 400, (body if isinstance(body, bytes) else str(body)[:120], r.text)
        assert r.json()["error"]["param"] == param, r.json()
    assert still_running, "the good generation ended before the hostile requests were all answered"
    assert good.untouched(good_reply), (good.reasoning, good.content, good.finish)
    assert engine.stats.failed_jobs == 0 and engine.stats.cancelled_rows == 0, engine.stats


def test_top_k_beyond_64_bits_keeps_every_token_and_other_generations_go_on(server, engine, good_reply):
    seeded = {"messages": USER, "temperature": 1.0, "top_p": 1.0, "seed": 5, "max_tokens": 20, "ignore_eos": True}
    with SlowStream(server, GOOD) as good:
        huge = post(server, {**seeded, "top_k": 10**30})  # beyond 64 bits: at or above the vocabulary is "off"
        vocab = post(server, {**seeded, "top_k": len(server.app.state.service.tokenizer)})
    off = post(server, {**seeded, "top_k": 0})
    assert huge.status_code == vocab.status_code == off.status_code == 200, (huge.text, vocab.text)
    assert (
        huge.json()["choices"][0]["message"]
        == vocab.json()["choices"][0]["message"]
        == off.json()["choices"][0]["message"]
    )
    assert good.untouched(good_reply), (good.reasoning, good.content, good.finish)
    assert engine.stats.failed_jobs == 0


def test_n_above_max_batch_is_a_400_naming_n_streamed_or_not(server, engine):
    for stream in (False, True):
        r = post(server, {"messages": USER, "n": MAX_BATCH + 1, "stream": stream})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
        err = r.json()["error"]
        assert err["param"] == "n" and f"n <= {MAX_BATCH}" in err["message"] and "--max-batch" in err["message"]
    r = post(server, {"messages": USER, "n": MAX_BATCH, "max_tokens": 2})  # n = --max-batch is served
    assert r.status_code == 200 and len(r.json()["choices"]) == MAX_BATCH
    assert engine.stats.failed_jobs == 0


def test_a_prompt_whose_prefill_fails_fails_alone(server, engine, good_reply):
    """A prefill that runs out of memory (simulated: an embedding hook raising on long inputs) fails its own request;
    the rows already running are untouched."""
    model = server.app.state.service.sampler.model

    def oom(module, args, out):
        if args[0].shape[-1] > 100:
            raise RuntimeError("simulated out of memory")

    with SlowStream(server, GOOD) as good:
        hook = model.model.embed_tokens.register_forward_hook(oom)
        try:
            r = post(server, {"messages": [{"role": "user", "content": "1 + 2 " * 60}], "max_tokens": 5})
        finally:
            hook.remove()
        still_running = good.is_alive()
    assert still_running, "the good generation ended before the failing prefill"
    assert r.status_code == 500 and "simulated out of memory" in r.json()["error"]["message"]
    assert good.untouched(good_reply), (good.reasoning, good.content, good.finish)
    assert engine.stats.failed_jobs == 1


# ----------------------------------------------------------------------------- request size


def test_a_body_over_the_cap_is_a_413_declared_or_streamed(server):
    cap = LIMITS.max_body_bytes
    r = post(server, b"x" * (cap + 1))
    assert r.status_code == 413 and f"{cap:,} bytes" in r.json()["error"]["message"], r.text
    assert "--max-body-mb" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(cap // 65536 + 2):
            yield b" " * 65536

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_text_that_cannot_fit_the_context_is_refused_before_tokenising(server, monkeypatch):
    service = server.app.state.service
    calls = []
    real = type(service.tokenizer).__call__
    monkeypatch.setattr(
        type(service.tokenizer), "__call__", lambda self, text, **kw: calls.append(len(text)) or real(self, text, **kw)
    )
    too_many_chars = "x" * (service.context * service.token_chars + 1)  # by its length alone
    r = post(server, {"messages": [{"role": "user", "content": too_many_chars}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "characters" in r.json()["error"]["message"] and calls == []
    digits = "1 " * 600_000  # by the tokens of its first part
    r = post(server, {"messages": [{"role": "user", "content": digits}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert calls and max(calls) <= 2 * service.context < len(digits), calls


def test_health_stays_responsive_while_a_large_request_is_tokenised(server):
    """A prompt near the size limit is rendered and tokenised in a worker thread (prepared on the event loop, as
    before, /health waited 0.75 s here for the whole tokenisation)."""
    text = " plus" * 260_000  # 1.3M characters of about 5 per token: tokenised whole, then too long
    done, took = threading.Event(), {}

    def large():
        t = time.perf_counter()
        took["status"] = post(server, {"messages": [{"role": "user", "content": text}]}).status_code
        took["s"] = time.perf_counter() - t
        done.set()

    latencies = []
    with httpx.Client(base_url=server.url) as c:
        c.get("/health")
        threading.Thread(target=large, daemon=True).start()
        time.sleep(0.05)
        while not done.wait(0.01):
            t = time.perf_counter()
            assert c.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t)
    assert took["status"] == 400
    assert took["s"] > 0.5, f"the large request took only {took['s']:.2f} s: make it larger for this test to show"
    assert len(latencies) >= 10 and max(latencies) < 0.25, (took, max(latencies), len(latencies))


# ----------------------------------------------------------------------------- slow clients and connections


def _closed(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it stayed open `within` seconds."""
    sock.settimeout(within)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return got


def test_stalled_connections_are_closed_after_the_header_timeout(server):
    socks = [socket.create_connection((server.host, server.port)) for _ in range(64)]
    for i, s in enumerate(socks):
        if i % 2:  # half send part of a request head and stall; the rest send nothing
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    t0 = time.monotonic()
    answers = [_closed(s, LIMITS.header_timeout + 3 - (time.monotonic() - t0)) for s in socks]
    elapsed = time.monotonic() - t0
    for s in socks:
        s.close()
    assert all(a is not None for a in answers), f"{sum(a is None for a in answers)} of 64 still open"
    assert elapsed < LIMITS.header_timeout + 2
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers[1::2]) and all(a == b"" for a in answers[0::2])
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_body_that_trickles_in_gets_a_408_after_the_body_timeout(server):
    s = socket.create_connection((server.host, server.port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"messa'
    )
    t0 = time.monotonic()
    got = _closed(s, LIMITS.body_timeout + 3)
    s.close()
    assert got is not None and got.startswith(b"HTTP/1.1 408"), got
    assert LIMITS.body_timeout - 0.1 < time.monotonic() - t0 < LIMITS.body_timeout + 2
    body = json.loads(got.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "timeout" and "--body-timeout" in body["error"]["message"]


def test_connections_beyond_the_limit_get_503_until_stalled_ones_are_closed(server):
    socks = [socket.create_connection((server.host, server.port)) for _ in range(LIMITS.max_connections)]
    time.sleep(0.2)
    try:
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        answers = [_closed(s, LIMITS.header_timeout + 3) for s in socks]
        for s in socks:
            s.close()
    assert all(a is not None for a in answers)
    assert httpx.get(server.url + "/health").status_code == 200


# ----------------------------------------------------------------------------- Host names


@pytest.mark.parametrize(
    "host,status",
    [
        ("127.0.0.1", 200),
        ("localhost", 200),
        ("LOCALHOST:80", 200),
        ("[::1]:8000", 200),
        ("chat.example.org", 200),
        ("evil.example", 400),
        ("localhost.evil.example", 400),
        ("evil.example@localhost", 400),
        ("192.168.1.5", 400),
        ("", 400),
        ("[zz]", 400),
    ],
)
def test_only_the_bound_and_allowed_host_names_are_answered(server, host, status):
    r = httpx.get(server.url + "/health", headers={"Host": host})
    assert r.status_code == status, r.text
    if status == 400:
        assert "--allowed-host" in r.json()["error"]["message"]


def test_ip_literals_are_answered_when_bound_to_every_interface():
    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def statuses(app, hosts):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
            return [(await c.get("/", headers={"Host": h})).status_code for h in hosts]

    hosts = ["192.168.1.5:8000", "[fe80::1]", "localhost", "evil.example", "mine.lan"]
    assert asyncio.run(statuses(_HostCheck(ok, *allowed_host_names("0.0.0.0")), hosts)) == [200, 200, 200, 400, 400]
    assert asyncio.run(statuses(_HostCheck(ok, *allowed_host_names("127.0.0.1", ["mine.lan"])), hosts)) == [
        400,
        400,
        200,
        400,
        200,
    ]
    assert asyncio.run(statuses(_HostCheck(ok, *allowed_host_names("127.0.0.1", ["*.lan"])), hosts)) == [
        400,
        400,
        200,
        400,
        200,
    ]
    assert asyncio.run(statuses(_HostCheck(ok, *allowed_host_names("127.0.0.1", ["*"])), hosts)) == [200] * 5
    assert socket.gethostname().lower() in allowed_host_names("::")[0]


# ----------------------------------------------------------------------------- the command


def test_serve_refuses_bad_limit_flags(tiny_native_dir, capsys):
    for flag, value in [
        ("--max-body-mb", "0"),
        ("--header-timeout", "nan"),
        ("--body-timeout", "-1"),
        ("--max-connections", "0"),
    ]:
        assert main(["serve", str(tiny_native_dir), flag, value]) == 2
        assert flag in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_errors_leave_no_traceback_in_the_server_log(tiny_native_dir, tmp_path):
    """`r1lab serve` with the limit flags, in its own process: every kind of client error, then its whole log."""
    port, log_path = _free_port(), tmp_path / "serve.log"
    env = {**os.environ, "R1LAB_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "r1lab.cli",
        "serve",
        str(tiny_native_dir),
        "--port",
        str(port),
        "--max-batch",
        "2",
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
        "--max-body-mb",
        "0.05",
        "--max-connections",
        "16",
        "--allowed-host",
        "chat.example.org",
        "--api-key",
        "sk-log",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        _every_client_error(url, port, {"Authorization": "Bearer sk-log"})
        assert httpx.get(url + "/health", headers={"Host": "chat.example.org"}).status_code == 200
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": USER, "max_tokens": 3},
            timeout=60,
            headers={"Authorization": "Bearer sk-log"},
        )
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    log = log_path.read_text()
    assert any("answers to Host" in line and "chat.example.org" in line for line in log.splitlines()), log
    for status in (" 400", " 401", " 404", " 405", " 408", " 413"):  # the log holds the requests' lines
        assert any(status in line for line in log.splitlines() if "HTTP/1.1" in line), (status, log)
    assert "Traceback" not in log and "Exception" not in log, log


def _every_client_error(url: str, port: int, auth: dict) -> None:
    chat = url + "/v1/chat/completions"
    assert httpx.post(chat, json={"messages": USER}).status_code == 401
    bad = [
        b'{"messages": [',
        b"",
        b"[1]",
        b'{"messages": []}',
        b'{"messages": "hi"}',
        b'{"messages": [{"role": "user", "content": "x"}], "top_k": 1e30}',
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        b'{"messages": [{"role": "user", "content": "x"}], "n": 3}',
        b'{"messages": [{"role": "user", "content": "x"}], "n": 3, "stream": true}',
        b'{"messages": [{"role": "user", "content": "' + b"7 " * 400 + b'"}]}',
        b'{"prompt": [999999]}',
        b"[" * 5000 + b"]" * 5000,
    ]
    for body in bad:
        path = chat if b"prompt" not in body else url + "/v1/completions"
        r = httpx.post(path, content=body, headers={"Content-Type": "application/json", **auth})
        assert r.status_code == 400, (body, r.text)
    assert httpx.post(chat, content=b"x" * 60_000, headers=auth).status_code == 413
    assert httpx.post(chat, json={"messages": USER, "model": "gpt-4o"}, headers=auth).status_code == 404
    assert httpx.get(chat, headers=auth).status_code == 405
    assert httpx.get(url + "/health", headers={"Host": "evil.example"}).status_code == 400
    with httpx.stream(
        "POST",
        chat,
        json={"messages": USER, "max_tokens": 200, "stream": True, "ignore_eos": True},
        headers=auth,
        timeout=60,
    ) as r:  # a client that leaves mid-stream
        next(r.iter_lines())
    raw = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n",  # head too large
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # head never ends
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
        + auth["Authorization"].encode()
        + b"\r\nContent-Length: 50\r\n\r\n{",
    ]  # body never ends
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in raw]
    for s, data in zip(socks, raw):
        s.sendall(data)
    for s in socks:
        assert _closed(s, 5) is not None
        s.close()
