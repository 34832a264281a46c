"""Distillation from a served teacher: a real `r1lab serve` process answers, behind an in-test proxy that injects
429, 500 and 503 (with and without Retry-After), a malformed body, or a teacher that stops answering; the teacher
is killed and restarted on its port. Requests are counted where they arrive (the proxy, the server's access log),
not by the client under test."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from test_distill import student_dir, teacher_dir  # noqa: F401  (fixtures: a trained tiny teacher, a student)

from r1lab import distill as D
from r1lab.cli import main
from r1lab.client import ChatClient, EndpointError, Reply, Usage, retry_after
from r1lab.sampler import Completion
from r1lab.tasks import Problem

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the teacher and the proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, port: int, log: Path, timeout: float = 180) -> subprocess.Popen:
    """`r1lab serve MODEL --port PORT` in its own process, its output (with uvicorn's access log) in `log`."""
    env = {**os.environ, "R1LAB_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "r1lab.cli", "serve", str(model_dir), "--port", str(port), "--log-level", "info"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"r1lab serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"r1lab serve did not answer on port {port} within {timeout} s")


def answered_at_server(log: Path) -> int:
    """Chat completions the server answered with 200, from its access log."""
    return sum('"POST /v1/chat/completions HTTP/1.1" 200' in line for line in log.read_text().splitlines())


class Proxy:
    """An HTTP proxy in front of the teacher. `plan(n)` decides what the n-th request (from 1) gets: "forward",
    "malformed" (forwarded, then the body cut in half), or (status, Retry-After or None) answered by the proxy."""

    def __init__(self, upstream: str, plan=lambda n: "forward"):
        self.upstream, self.plan, self.log, self.lock = upstream, plan, [], threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    n = len(proxy.log) + 1
                    entry = {
                        "n": n,
                        "t": time.monotonic(),
                        "body": hashlib.sha256(body).hexdigest(),
                        "auth": self.headers.get("Authorization"),
                    }
                    proxy.log.append(entry)
                action = proxy.plan(n)
                headers = {}
                if action in ("forward", "malformed"):
                    r = httpx.post(
                        proxy.upstream + self.path,
                        content=body,
                        timeout=120,
                        headers={"Content-Type": "application/json"},
                    )
                    status, payload = r.status_code, r.content
                    if action == "malformed":
                        payload = payload[: len(payload) // 2]
                    elif status == 200:
                        entry["response"] = r.json()
                else:
                    status, wait = action
                    if status == "stall":  # no answer for `wait` seconds, then a 504
                        time.sleep(wait)
                        status, wait = 504, None
                    payload = json.dumps({"error": {"message": f"injected {status}", "type": "server_error"}}).encode()
                    if wait is not None:
                        headers["Retry-After"] = wait
                entry["status"], entry["action"] = status, action
                try:
                    self.send_response(status)
                    for k, v in {
                        "Content-Type": "application/json",
                        "Content-Length": str(len(payload)),
                        **headers,
                    }.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up waiting
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answered(self) -> list[dict]:
        return [e for e in self.log if e.get("response") is not None]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def teacher(tiny_native_dir_long, tmp_path_factory):
    """A random tiny model served by `r1lab serve` in its own process: (base URL, model name)."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    proc = start_server(tiny_native_dir_long, port, log)
    yield f"http://127.0.0.1:{port}", Path(tiny_native_dir_long).resolve().name
    proc.kill()
    proc.wait()


def served_cfg(out, url, model, **kw) -> D.DistillConfig:
    base = dict(
        out=str(out),
        teacher_url=url,
        teacher_model=model,
        student="unused",
        problems=4,
        k=3,
        max_new_tokens=8,
        concurrency=3,
        retry_wait=0.01,
        task_args={"arithmetic": {"max_digits": 1}},
    )
    return D.DistillConfig(**{**base, **kw}).validate()


def cache_files(out) -> list[Path]:
    return sorted((Path(out) / "teacher_cache").glob("*/*.json"))


def usage_of(responses: list[dict]) -> dict:
    return {
        "requests": len(responses),
        "prompt_tokens": sum(r["usage"]["prompt_tokens"] for r in responses),
        "completion_tokens": sum(r["usage"]["completion_tokens"] for r in responses),
        "reasoning_tokens": sum(r["usage"]["completion_tokens_details"]["reasoning_tokens"] for r in responses),
    }


# ----------------------------------------------------------------------------- against the real server


def test_429_500_503_and_a_malformed_body_are_retried_and_each_reply_is_kept_once(teacher, tmp_path):
    url, model = teacher
    faults = {
        1: (429, "1"),
        2: (500, None),
        3: (503, None),
        4: "malformed",
        5: (429, formatdate(time.time() + 2, usegmt=True)),
    }
    with Proxy(url, lambda n: faults.get(n, "forward")) as proxy:
        cfg = served_cfg(tmp_path, proxy.url, model, price_per_mtok=[1.0, 4.0])
        problems = D.load_problems(cfg)
        groups, usage = D.sample_served(cfg, problems, progress=False)
        log = list(proxy.log)
        # run again: every reply comes from the cache, nothing is sent, and the tokens count as cached
        again, usage2 = D.sample_served(served_cfg(tmp_path, proxy.url, model), problems, progress=False)
        assert len(proxy.log) == len(log)
        # one more sample per problem: only those 4 are sent
        more, _ = D.sample_served(served_cfg(tmp_path, proxy.url, model, k=4), problems, progress=False)
        assert len(proxy.log) == len(log) + 4 and [[r.text for r in g[:3]] for g in more] == [
            [r.text for r in g] for g in again
        ]

    assert len(log) == 12 + 5 and [e["status"] for e in log[:3]] == [429, 500, 503]
    answered = [e for e in log if e.get("response") is not None]
    assert len(answered) == 12 and len({e["body"] for e in answered}) == 12  # each request answered once
    assert usage["retried"] == {"429": 2, "500": 1, "503": 1, "malformed": 1}
    expected = usage_of([e["response"] for e in answered])
    assert {k: usage["answered"][k] for k in expected} == expected and usage["cached"]["requests"] == 0
    paid = expected["prompt_tokens"] + 4 * expected["completion_tokens"]
    assert usage["answered"]["cost"] == pytest.approx(paid / 1e6)
    # the replies are the server's own answers, the thinking inline
    served = sorted(
        (
            f"<think>\n{c['message']['reasoning_content']}\n</think>\n\n{c['message']['content']}",
            c["finish_reason"],
            e["response"]["usage"]["completion_tokens"],
        )
        for e in answered
        for c in e["response"]["choices"]
    )
    assert sorted((r.text, r.finish_reason, r.completion_tokens) for g in groups for r in g) == served
    assert [len(g) for g in groups] == [3] * 4

    # Retry-After (in seconds, and as a date) was waited for; a 500 without it waited only the short backoff
    def next_try(f):
        return next(e["t"] for e in log if e["n"] > f["n"] and e["body"] == f["body"]) - f["t"]

    waited = {f["n"]: next_try(f) for f in log[:5]}
    assert waited[1] >= 0.95 and waited[5] >= 0.95 and waited[2] < 0.9 and waited[3] < 0.9, waited
    assert len(cache_files(tmp_path)) == 12 + 4
    assert [[r.text for r in g] for g in again] == [[r.text for r in g] for g in groups]
    assert usage2["answered"]["requests"] == 0 and {k: usage2["cached"][k] for k in expected} == expected


def test_a_teacher_that_stops_answering_fails_in_one_line_and_the_rerun_sends_only_the_rest(teacher, tmp_path, capsys):
    url, model = teacher
    out = tmp_path / "run"
    args = [
        "distill",
        "--teacher-url",
        "",
        "--teacher-model",
        model,
        "--student",
        str(tmp_path / "student"),
        "--out",
        str(out),
        "--task-args",
        '{"arithmetic": {"max_digits": 1}}',
        "--problems",
        "4",
        "--k",
        "3",
        "--max-new-tokens",
        "8",
        "--concurrency",
        "2",
        "--max-retries",
        "2",
        "--retry-wait",
        "0.01",
        "--api-key",
        "sk-test-secret",
        "--price-per-mtok",
        "2",
    ]
    with Proxy(url, lambda n: "forward" if n <= 5 else (503, None)) as proxy:
        args[2] = proxy.url
        assert main(args) == 2
        sent = len(proxy.log)
        assert {e["auth"] for e in proxy.log} == {"Bearer sk-test-secret"}
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]  # after the progress bar: the error in one line, no traceback
        assert "Traceback" not in err and line.startswith("r1lab distill: ")
        assert f"{proxy.url}/chat/completions failed 3 times in a row" in line and "status 503 (injected 503)" in line
        assert f"cached in {out / 'teacher_cache'}: run the same command again to resume" in line
        assert len(cache_files(out)) == 5 and "sk-test-secret" not in (out / "config.yaml").read_text()

        proxy.plan = lambda n: "forward"  # the teacher is back: only the 7 requests never answered are sent
        assert main(args) == 2  # a random teacher: sampled to the end, nothing passes the filters
        assert len(proxy.log) == sent + 12 - 5 and len(proxy.answered()) == 5 + 7
        rerun = [e["response"] for e in proxy.answered()[5:]]
    assert "no teacher sample passed the filters (12 candidates" in capsys.readouterr().err
    usage = json.loads((out / "data_stats.json").read_text())["teacher_usage"]
    assert usage["answered"]["requests"] == 7 and usage["cached"]["requests"] == 5
    assert usage["answered"]["completion_tokens"] == usage_of(rerun)["completion_tokens"]
    assert usage["answered"]["cost"] == pytest.approx(
        2 * sum(usage_of(rerun)[k] for k in ("prompt_tokens", "completion_tokens")) / 1e6
    )
    assert sent >= 5 + 3  # the failing request was tried 3 times


def test_a_request_unanswered_within_the_timeout_is_sent_again(teacher, tmp_path):
    url, model = teacher
    with Proxy(url, lambda n: ("stall", 6) if n == 1 else "forward") as proxy:
        cfg = served_cfg(tmp_path, proxy.url, model, problems=1, k=1, concurrency=1, request_timeout=2.0)
        (replies,), usage = D.sample_served(cfg, D.load_problems(cfg), progress=False)
        log = list(proxy.log)
    assert usage["retried"] == {"timeout": 1} and len(replies) == 1 and len(log) == 2
    assert log[0]["body"] == log[1]["body"] and 2 <= log[1]["t"] - log[0]["t"] < 5


def test_a_wrong_model_name_or_key_is_refused_at_once_without_retries(teacher, tmp_path):
    url, model = teacher
    with Proxy(url) as proxy:
        with pytest.raises(
            EndpointError,
            match=r"answered 404 \(The model `nope` does not exist.*check the model "
            r"name 'nope' and the URL",
        ):
            D.sample_served(served_cfg(tmp_path, proxy.url, "nope", concurrency=1), [_p()], progress=False)
        assert [e["status"] for e in proxy.log] == [404]
    with Proxy(url, lambda n: (401, None)) as proxy:
        with pytest.raises(EndpointError, match="refused the API key .*pass the right key with --api-key"):
            D.sample_served(served_cfg(tmp_path, proxy.url, model, concurrency=1), [_p()], progress=False)
        assert len(proxy.log) == 1
    assert cache_files(tmp_path) == []


def test_eval_of_an_endpoint_shares_the_client_and_its_retries(teacher, tmp_path, capsys):
    url, model = teacher
    with Proxy(url, lambda n: (503, None) if n == 2 else "forward") as proxy:
        report = tmp_path / "eval.json"
        assert (
            main(
                [
                    "eval",
                    model,
                    "--base-url",
                    proxy.url,
                    "--task-args",
                    '{"max_digits": 1}',
                    "--limit",
                    "2",
                    "--k",
                    "2",
                    "--max-new-tokens",
                    "8",
                    "--concurrency",
                    "2",
                    "--out",
                    str(report),
                ]
            )
            == 0
        )
        answered = [e["response"]["choices"][0]["message"] for e in proxy.answered()]
    assert len(proxy.log) == 2 * 2 + 2 + 1 and len(answered) == 6  # k samples and a greedy one per problem, a retry
    records = json.loads(report.read_text())["records"]
    replies = [s for r in records for s in r["samples"] + [r["greedy"]]]
    assert sorted((s["reasoning"], s["content"]) for s in replies) == sorted(
        (m["reasoning_content"], m["content"]) for m in answered
    )


def _p():
    return Problem("2+3", "arithmetic", "What is 2 + 3?", "5")


# ----------------------------------------------------------------------------- slow: a trained teacher, kills


@pytest.mark.slow  # trains the teacher (~25 s), starts a server (~20 s), samples 144 replies and trains a student
def test_a_served_teacher_is_distilled_end_to_end_and_writes_what_the_local_teacher_writes(
    teacher_dir, student_dir, tmp_path, capsys
):
    port, log = free_port(), tmp_path / "serve.log"
    proc = start_server(teacher_dir, port, log)
    try:
        url, name = f"http://127.0.0.1:{port}/v1", Path(teacher_dir).resolve().name
        # greedy, one sample per problem: the served teacher's records are the local teacher's, byte for byte
        common = dict(
            student=str(student_dir),
            problems=16,
            k=1,
            temperature=0.0,
            max_new_tokens=64,
            task_args={"arithmetic": {"max_digits": 1}},
        )
        local_cfg = D.DistillConfig(teacher=str(teacher_dir), out=str(tmp_path / "local"), **common)
        served_cfg_ = D.DistillConfig(teacher_url=url, teacher_model=name, out=str(tmp_path / "greedy"), **common)
        problems = D.load_problems(local_cfg)
        local_samples = D.sample_teacher(local_cfg, problems, progress=False)
        served_samples = D.sample_served(served_cfg_, problems, progress=False)[0]

        def replies(groups):  # per sample: how it ended, and the reply as R1's format writes it when well-formed
            return [(s.finish_reason, D.well_formed(s.text) and D.r1_message(s.text)) for g in groups for s in g]

        assert replies(served_samples) == replies(local_samples)
        assert sum(bool(m) for _, m in replies(local_samples)) >= 8  # most replies are well-formed
        local = D.filter_samples(local_samples, problems)
        assert local[1]["kept"] > 0 and D.filter_samples(served_samples, problems) == local

        out = tmp_path / "distill"
        assert (
            main(
                [
                    "distill",
                    "--teacher-url",
                    url,
                    "--teacher-model",
                    name,
                    "--student",
                    str(student_dir),
                    "--out",
                    str(out),
                    "--task-args",
                    '{"arithmetic": {"max_digits": 1}}',
                    "--problems",
                    "16",
                    "--k",
                    "8",
                    "--max-new-tokens",
                    "64",
                    "--price-per-mtok",
                    "0.55,2.19",
                    "--sft.epochs",
                    "1",
                    "--sft.seq-len",
                    "128",
                    "--sft.bf16",
                    "false",
                    "--sft.device",
                    "cpu",
                    "--sft.eval-fraction",
                    "0",
                ]
            )
            == 0
        )
        assert answered_at_server(log) == 16 + 128
    finally:
        proc.kill()
        proc.wait()
    printed = capsys.readouterr().out
    counts = json.loads((out / "data_stats.json").read_text())
    assert counts["candidates"] == 128 and counts["kept"] > 0 and counts["rejected"]["incorrect"] > 0
    problems = {p.id: p for p in D.load_problems(D.DistillConfig(problems=16, task_args=common["task_args"]))}
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    for r in rows:  # every kept reply is well-formed and right, checked here without the filter's code
        user, reply = r["messages"]
        assert user["content"] == problems[r["id"]].prompt
        assert reply["content"].startswith("<think>\n") and reply["content"].count("</think>") == 1
        assert reply["content"].endswith(f"\\boxed{{{problems[r['id']].answer}}}")
    usage = counts["teacher_usage"]
    assert usage["answered"]["requests"] == 128 and usage["cached"]["requests"] == 0
    assert usage["answered"]["cost"] == pytest.approx(
        (0.55 * usage["answered"]["prompt_tokens"] + 2.19 * usage["answered"]["completion_tokens"]) / 1e6
    )
    assert f"kept {counts['kept']} of 128" in printed and D.usage_line(usage) in printed
    print(
        f"greedy: {sum(bool(m) for _, m in replies(local_samples))} of 16 well-formed and {local[1]['kept']} kept "
        f"from both teachers; T=0.6: kept {counts['kept']} of 128; {D.usage_line(usage)}"
    )
    assert (out / "sft" / "model" / "model.safetensors").is_file()


def _in_thread(fn, *args, **kw):
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn, *args, **kw)
    pool.shutdown(wait=False)
    return future


def _wait_for_cache(out, n: int, future, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(cache_files(out)) < n:
        assert not future.done() and time.monotonic() < deadline, "the run ended before the teacher was killed"
        time.sleep(0.02)


@pytest.mark.slow  # three server starts (~20 s each on two busy cores)
def test_a_teacher_killed_mid_run_is_retried_through_its_restart_or_the_rerun_resumes_from_the_cache(
    tiny_native_dir_long, tmp_path
):
    port, logs = free_port(), [tmp_path / f"serve{i}.log" for i in range(3)]
    url, name = f"http://127.0.0.1:{port}/v1", Path(tiny_native_dir_long).resolve().name
    total = 8 * 4
    proc = start_server(tiny_native_dir_long, port, logs[0])
    try:
        # killed and restarted on its port within the retries: the run goes through
        cfg = served_cfg(
            tmp_path / "a", url, name, problems=8, k=4, max_new_tokens=48, concurrency=2, max_retries=8, retry_wait=0.5
        )
        run = _in_thread(D.sample_served, cfg, D.load_problems(cfg), progress=False)
        _wait_for_cache(cfg.out, 6, run)
        proc.kill()
        proc.wait()
        killed_at = len(cache_files(cfg.out))
        proc = start_server(tiny_native_dir_long, port, logs[1])
        groups, usage = run.result(timeout=300)
        assert sum(map(len, groups)) == total and len(cache_files(cfg.out)) == total
        assert usage["retried"].get("connection", 0) >= 1 and usage["answered"]["requests"] == total
        assert killed_at < total and total <= answered_at_server(logs[0]) + answered_at_server(logs[1]) <= total + 2
        print(
            f"restart: killed with {killed_at} of {total} cached; retried {usage['retried']}; answered by the two "
            f"servers {answered_at_server(logs[0])} + {answered_at_server(logs[1])}"
        )

        # killed and not back within the retries: one clear error; after a restart the rerun sends only the rest
        cfg = served_cfg(
            tmp_path / "b", url, name, problems=8, k=4, max_new_tokens=48, concurrency=2, max_retries=2, retry_wait=0.1
        )
        run = _in_thread(D.sample_served, cfg, D.load_problems(cfg), progress=False)
        _wait_for_cache(cfg.out, 6, run)
        proc.kill()
        proc.wait()
        with pytest.raises(
            EndpointError,
            match=f"{url}/chat/completions failed 3 times in a row for one request, "
            f"last with the connection failed .*run the same command again to "
            f"resume",
        ):
            run.result(timeout=120)
        cached = len(cache_files(cfg.out))
        proc = start_server(tiny_native_dir_long, port, logs[2])
        groups, usage = D.sample_served(cfg, D.load_problems(cfg), progress=False)
        assert answered_at_server(logs[2]) == total - cached and 6 <= cached < total
        assert usage["cached"]["requests"] == cached and usage["answered"]["requests"] == total - cached
        assert sum(map(len, groups)) == total
        print(
            f"no restart: {cached} of {total} cached when the run stopped; the rerun sent {answered_at_server(logs[2])}"
        )
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- without a server


SERVED_TEXTS = [  # what a local teacher wrote after R1's prefilled "<think>\n"; each reason at least once
    ("2 plus 3 is 5\n</think>\n\n\\boxed{5}", "stop"),
    ("<think>2 plus 3 is 5</think>\\boxed{5}", "stop"),
    ("2 plus 3 is 5\n</think>\n\n\\boxed{5}", "length"),
    ("\\boxed{5}", "stop"),
    ("<think>\n2 plus 3 is \\boxed{5}", "stop"),
    ("a\n</think>\n\n\\boxed{5} </think>", "stop"),
    ("add them\n</think>\n\n", "stop"),
    ("2 plus 3 is 6\n</think>\n\n\\boxed{6}", "stop"),
    ("二加三等于五\n</think>\n\n\\boxed{5}", "stop"),
    ("  plus: 5  \n</think>\n\n  \\boxed{5}  ", "stop"),
    ("</think>\\boxed{5}", "stop"),
]


def test_a_served_reply_becomes_the_same_record_as_the_local_text_it_was_split_from():
    """The server splits a local text into reasoning_content and content (its own code); the reply rebuilt from them
    is filtered and written exactly as the local text."""
    from r1lab.serve.service import Prepared

    split = Prepared([], None, prefilled=True).split
    local = [[Completion(0, t, list(range(10)), [0.0] * 10, f) for t, f in SERVED_TEXTS]]
    served = [[Reply(*split(t), f, completion_tokens=10) for t, f in SERVED_TEXTS]]
    for kw in ({}, {"max_per_problem": 1}, {"max_length": 5}):
        assert D.filter_samples(served, [_p()], **kw) == D.filter_samples(local, [_p()], **kw)
    kept, counts = D.filter_samples(served, [_p()])
    assert counts["kept"] == 3 and all(
        v > 0 for k, v in counts["rejected"].items() if k not in ("unjudged", "too_long", "over_limit")
    )
    assert kept[1]["messages"][1]["content"] == "<think>\nplus: 5\n</think>\n\n\\boxed{5}"


@pytest.mark.parametrize("value, seconds", [("2", 2.0), ("0.5", 0.5), ("-3", 0.0), (None, None), ("soon", None)])
def test_retry_after_is_read_as_seconds(value, seconds):
    assert retry_after(value) == seconds


def test_retry_after_is_read_as_an_http_date():
    assert 8 < retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10
    assert retry_after(formatdate(time.time() - 10, usegmt=True)) == 0


def test_tokens_are_priced_with_one_price_or_input_and_output_prices():
    u = Usage(requests=2, prompt_tokens=1_000_000, completion_tokens=3_000_000, reasoning_tokens=2_000_000)
    assert u.cost([]) is None and u.cost([0.5]) == pytest.approx(2.0) and u.cost([0.5, 2.0]) == pytest.approx(6.5)


def test_a_served_teacher_run_line_counts_paid_and_cached_tokens():
    c = ChatClient("http://h/v1", "m")
    c.answered.add(Reply("r", "a", "stop", 10, 20, 15))
    c.cached.add(Reply("r", "a", "stop", 1, 2, None))
    c.retried["503"] = 2
    line = D.usage_line(c.usage([1000.0, 2000.0]))
    assert line == (
        "teacher m: 1 requests answered (10 prompt + 20 completion tokens (15 reasoning), $0.0500); "
        "1 cached, not re-paid (1 prompt + 2 completion tokens, $0.0050); retried 2 x 503"
    )


def test_served_teacher_settings_are_checked_first(tmp_path):
    ok = dict(teacher_url="http://127.0.0.1:1/v1", teacher_model="m", student="s", out=str(tmp_path))
    for kw, message in [
        (dict(teacher="t"), "are two teachers; give one"),
        (dict(teacher_model=""), "--teacher-model is required with --teacher-url"),
        (dict(teacher_url="localhost:8000"), "must start with http:// or https://"),
        (dict(concurrency=0), "--concurrency must be >= 1"),
        (dict(request_timeout=0.0), "--request-timeout must be > 0"),
        (dict(price_per_mtok=[1.0, 2.0, 3.0]), "one price or input,output"),
    ]:
        with pytest.raises(ValueError, match=message):
            D.distill(D.DistillConfig(**{**ok, **kw}), progress=False)


def test_a_served_r1zero_teacher_is_judged_and_taught_in_its_own_format():
    """r1lab serve gives an R1-Zero model's answer without its <answer> tags (chat clients see the answer alone);
    with --teacher-template r1zero the reply is put back in the format, so the verifier finds the answer and the
    student learns the tags (without it, every such reply was rejected as incorrect)."""
    from r1lab.client import Reply
    from r1lab.distill import as_r1zero, filter_samples
    from r1lab.tasks import Problem

    served = Reply(reasoning="7+8=15, write 5 carry 1. 4+3+1=8, write 8. so 85", content="85", finish_reason="stop")
    fixed = as_r1zero(served)
    assert fixed.text == " <think> 7+8=15, write 5 carry 1. 4+3+1=8, write 8. so 85 </think> <answer> 85 </answer>"
    problem = Problem("47+38", "arithmetic", "What is 47 + 38?", "85", meta={"a": 47, "op": "+", "b": 38})
    for reply, kept in ((served, 0), (fixed, 1)):
        reply.token_ids = [0] * 20
        assert filter_samples([[reply]], [problem])[1]["kept"] == kept
    assert as_r1zero(Reply(reasoning=None, content="85", finish_reason="stop")).text == "85"  # no thinking: as is
