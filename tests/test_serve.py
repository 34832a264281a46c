"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP: replies equal the sampler's
own generation split by `split_reasoning`; bad input gets a 4xx that names it; requests share decode steps."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time

import httpx
import openai
import pytest
import torch

from r1lab.cli import main
from r1lab.model.load import load_model_and_tokenizer
from r1lab.reasoning import ReasoningStream, split_reasoning
from r1lab.sampler import Sampler, SamplingParams
from r1lab.serve.app import BackgroundServer, _merge, create_app
from r1lab.serve.engine import EngineStats, Event, TextTracker, wait_idle
from r1lab.serve.service import ModelService
from r1lab.serve.terminal import Printer, TerminalChat

KEY = "sk-test-r1lab"
NAME = "tiny-r1"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Server, clients and reference sampler share this process: two intra-op threads on a shared 2-core machine
    collapse under contention (DESIGN.md), one does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(tiny_native_dir):
    app = create_app(tiny_native_dir, api_key=KEY, model_name=NAME, max_batch=16)
    with BackgroundServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def engine(server):
    return server.app.state.service.engine


@pytest.fixture(scope="module")
def ref(tiny_native_dir):
    """An independent model + sampler: the reference every reply is compared against."""
    model, tok = load_model_and_tokenizer(tiny_native_dir)
    return Sampler(model, tok), tok


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat_text(tok, user: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def greedy(ref, prompt: str, max_new_tokens: int, **kw):
    sampler, _ = ref
    return sampler.generate([prompt], SamplingParams(max_new_tokens=max_new_tokens, temperature=0, **kw))[0]


@pytest.fixture(scope="module")
def thinking_prompt(ref):
    """A user message whose greedy reply (random weights) closes its thinking and then answers: it exercises
    both reasoning_content and content with the real model."""
    sampler, tok = ref
    users = [f"What is {a} + {b}?" for a in range(8) for b in range(8)]
    outs = sampler.generate([chat_text(tok, u) for u in users], SamplingParams(max_new_tokens=100, temperature=0))
    for u, o in zip(users, outs):
        reasoning, content = split_reasoning(o.text, prefilled=True)
        if "</think>" in o.text and reasoning and content:
            return u
    pytest.fail("no greedy reply of the tiny test model closes its thinking; widen the candidate prompts")


def post(server, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=headers, timeout=kw.pop("timeout", 60), **kw)


def fresh_stats(engine) -> EngineStats:
    assert wait_idle(engine)
    engine.stats = EngineStats()
    return engine.stats


# ----------------------------------------------------------------------------- replies


def test_chat_reply_is_the_greedy_completion_split_into_reasoning_and_content(client, ref, thinking_prompt):
    _, tok = ref
    want = greedy(ref, chat_text(tok, thinking_prompt), 100)
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": thinking_prompt}], temperature=0, max_tokens=100
    )
    reasoning, content = split_reasoning(want.text, prefilled=True)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content) == (reasoning, content)
    assert reasoning and content
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.object == "chat.completion" and r.model == NAME
    think_end = tok.convert_tokens_to_ids("</think>")
    assert r.usage.prompt_tokens == len(tok(chat_text(tok, thinking_prompt), add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == want.token_ids.index(think_end) + 1


def test_streamed_chat_rebuilds_the_plain_reply_reasoning_first(client, thinking_prompt):
    kw = dict(model=NAME, messages=[{"role": "user", "content": thinking_prompt}], temperature=0, max_tokens=100)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    kinds, reasoning, content, finish = [], "", "", None
    for ch in chunks[1:-1]:
        assert ch.object == "chat.completion.chunk" and ch.id == chunks[0].id
        d = ch.choices[0].delta
        if getattr(d, "reasoning_content", None):
            kinds.append("r")
            reasoning += d.reasoning_content
        if d.content:
            kinds.append("c")
            content += d.content
        finish = ch.choices[0].finish_reason or finish
    assert "".join(kinds).strip("r").strip("c") == "", "reasoning deltas must all come before content deltas"
    assert (reasoning, content) == (plain.choices[0].message.reasoning_content, plain.choices[0].message.content)
    assert finish == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_stream_ends_with_done_and_carries_no_usage_unless_asked(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {KEY}"},
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True, "ignore_eos": True},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    bodies = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert all("usage" not in b for b in bodies)
    assert bodies[-1]["choices"][0]["finish_reason"] == "length"


def test_text_completion_matches_the_sampler_on_the_raw_prompt(client, ref):
    want = greedy(ref, "What is 12 + 30?", 24)
    r = client.completions.create(model=NAME, prompt="What is 12 + 30?", temperature=0, max_tokens=24)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.token_ids)
    streamed = client.completions.create(
        model=NAME, prompt="What is 12 + 30?", temperature=0, max_tokens=24, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text


def test_n_choices_are_the_samplers_n_samples_with_summed_usage(client, ref):
    sampler, tok = ref
    want = sampler.generate([chat_text(tok, "hi")], SamplingParams(max_new_tokens=20, temperature=1.0, n=2, seed=7))
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], n=2, seed=7, temperature=1.0, top_p=1.0, max_tokens=20
    )
    assert [c.index for c in r.choices] == [0, 1]
    got = [(c.message.reasoning_content, c.message.content) for c in r.choices]
    assert got == [split_reasoning(w.text, prefilled=True) for w in want]
    assert r.usage.completion_tokens == sum(len(w.token_ids) for w in want)


def test_seed_makes_sampling_reproducible_even_among_other_requests(server, client):
    kw = dict(
        model=NAME, messages=[{"role": "user", "content": "What is 3 + 4?"}], temperature=1.0, top_p=0.9, max_tokens=30
    )
    alone = client.chat.completions.create(**kw, seed=123).choices[0].message
    other = client.chat.completions.create(**kw, seed=124).choices[0].message
    assert (alone.reasoning_content, alone.content) != (other.reasoning_content, other.content)

    async def crowd():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        jobs = [c.chat.completions.create(**{**kw, "seed": 1000 + i}) for i in range(5)]
        jobs.insert(2, c.chat.completions.create(**kw, seed=123))
        return await asyncio.gather(*jobs)

    crowded = asyncio.run(crowd())[2].choices[0].message
    assert (crowded.reasoning_content, crowded.content) == (alone.reasoning_content, alone.content)


def test_stop_string_ends_the_reply_before_it_streamed_or_not(client, ref):
    want = greedy(ref, "What is 5 + 9?", 40, stop_token_ids=[])
    start = next(i for i in range(6, 30) if "\ufffd" not in want.text[i : i + 3] and want.text[i : i + 3].strip())
    stop = want.text[start : start + 3]
    expected = want.text[: want.text.find(stop)]
    kw = dict(
        model=NAME,
        prompt="What is 5 + 9?",
        temperature=0,
        max_tokens=40,
        stop=[stop, "never-seen"],
        extra_body={"ignore_eos": True},
    )
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_ends_the_reply_with_finish_reason_length(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "hi"}], temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw, max_tokens=7)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    r = client.chat.completions.create(**kw, max_tokens=50, max_completion_tokens=3)  # the newer field wins
    assert r.usage.completion_tokens == 3


def test_models_lists_the_served_model_and_health_is_open(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == NAME


# ----------------------------------------------------------------------------- refusals


def test_previous_reasoning_content_in_the_input_is_rejected(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=NAME,
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello", "reasoning_content": "the user greets me"},
                {"role": "user", "content": "and?"},
            ],
        )
    assert "reasoning_content" in e.value.message and e.value.param == "messages[1].reasoning_content"


def test_answers_of_earlier_turns_are_accepted_without_their_reasoning(client):
    r = client.chat.completions.create(
        model=NAME,
        max_tokens=5,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "and?"}]},
        ],
    )
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Basic " + KEY, "Bearer " + KEY + "x", "Bearer"])
def test_api_key_is_required_on_the_api(server, auth):
    headers = {"Authorization": auth} if auth else {}
    r = httpx.get(server.url + "/v1/models", headers=headers)
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "API key" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message


USER = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # (path, body, param named in the error or None, words the message must contain)
    ("/v1/chat/completions", b'{"messages": [', None, "parse the JSON"),
    ("/v1/chat/completions", b"", None, "empty"),
    ("/v1/chat/completions", b"[1, 2]", None, "JSON object"),
    ("/v1/chat/completions", b"\xff\xfe\x00", None, "JSON"),
    ("/v1/chat/completions", b"[" * 50000 + b"]" * 50000, None, "parse the JSON"),
    ("/v1/chat/completions", {"messages": []}, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages", "list"),
    ("/v1/chat/completions", {"messages": [None]}, "messages[0]", "object"),
    ("/v1/chat/completions", {}, "messages", "Missing"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content",
        "image_url",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages", "Unicode"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "7 " * 400}]}, "messages", "context length"),
    ("/v1/chat/completions", {"messages": USER, "temperature": "hot"}, "temperature", "number"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        "temperature",
        "finite",
    ),
    ("/v1/chat/completions", {"messages": USER, "temperature": 3}, "temperature", "2"),
    ("/v1/chat/completions", {"messages": USER, "top_p": 1.5}, "top_p", "1"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0}, "max_tokens", "between 1 and"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 10**9}, "max_tokens", "context length of 256"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2.5}, "max_tokens", "integer"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": -1}, "max_completion_tokens", "between"),
    ("/v1/chat/completions", {"messages": USER, "n": 0}, "n", "greater than or equal to 1"),
    ("/v1/chat/completions", {"messages": USER, "n": "2"}, "n", "integer"),
    ("/v1/chat/completions", {"messages": USER, "seed": 2**70}, "seed", "less than"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ("/v1/chat/completions", {"messages": USER, "stop": [""]}, "stop", "non-empty"),
    ("/v1/chat/completions", {"messages": USER, "stream": "yes"}, "stream", "boolean"),
    ("/v1/chat/completions", {"messages": USER, "stream": True, "stream_options": 3}, "stream_options", "object"),
    ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
    ("/v1/completions", {"prompt": []}, "prompt", "non-empty"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt", "not a mix"),
    ("/v1/completions", {"prompt": [10**6]}, "prompt", "vocabulary"),
    ("/v1/completions", {"prompt": [-1]}, "prompt", "vocabulary"),
    ("/v1/completions", {"prompt": "x", "n": 99}, "n", "16"),
]


@pytest.mark.parametrize(
    "path,body,param,words", BAD_REQUESTS, ids=[f"{p.split('/v1/')[-1]}-{i}" for i, (p, *_) in enumerate(BAD_REQUESTS)]
)
def test_bad_request_gets_a_400_that_names_the_problem(server, path, body, param, words):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and words in err["message"], err


def test_unknown_fields_are_ignored(server):
    r = post(
        server,
        "/v1/chat/completions",
        {
            "messages": USER,
            "max_tokens": 3,
            "frequency_penalty": 0.5,
            "logit_bias": {"5": 1},
            "user": "me",
            "tools": [],
        },
    )
    assert r.status_code == 200


def test_unknown_paths_and_methods_answer_in_the_openai_error_shape(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/v1/nope", headers=headers).json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions", headers=headers)
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"]


def test_server_still_serves_after_every_bad_request(server, client, engine):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert engine.alive and engine.stats.failed_jobs == 0
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- batching and cancellation


def test_concurrent_requests_share_decode_steps(server, engine):
    stats = fresh_stats(engine)
    clients, tokens = 8, 40

    async def go():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(
            *[
                c.chat.completions.create(
                    model=NAME,
                    messages=[{"role": "user", "content": f"What is {i} + {i}?"}],
                    max_tokens=tokens,
                    temperature=1.0,
                    extra_body={"ignore_eos": True},
                )
                for i in range(clients)
            ]
        )

    replies = asyncio.run(go())
    assert all(r.usage.completion_tokens == tokens for r in replies)
    assert stats.max_jobs_in_step >= 4, stats  # several requests decoded in one forward
    assert stats.steps < clients * tokens * 0.6, stats  # one at a time would need clients * tokens


def test_a_disconnecting_stream_stops_its_generation(server, engine):
    stats = fresh_stats(engine)
    body = {"messages": USER, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    assert wait_idle(engine, 10)
    assert stats.cancelled_rows == 1 and stats.finished_rows == 0, stats
    assert stats.tokens < 200


def test_a_disconnecting_plain_request_stops_its_generation(server, engine):
    stats = fresh_stats(engine)
    model = server.app.state.service.sampler.model
    hook = model.register_forward_hook(lambda *a: time.sleep(0.01))  # 200 tokens now take over 2 s
    try:
        with pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 200, "ignore_eos": True}, timeout=0.4)
        assert wait_idle(engine, 10)
    finally:
        hook.remove()
    assert stats.cancelled_rows == 1 and stats.finished_rows == 0, stats
    assert stats.tokens < 200


@pytest.mark.parametrize("fail_at", [1, 3], ids=["prefill", "decode"])
def test_a_failing_step_fails_its_requests_and_the_server_goes_on(server, client, engine, fail_at):
    fresh_stats(engine)
    model = server.app.state.service.sampler.model
    calls = {"n": 0}

    def boom(*_):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("simulated device error")

    hook = model.register_forward_hook(boom)
    try:
        r = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 20, "ignore_eos": True})
    finally:
        hook.remove()
    assert r.status_code == 500 and "simulated device error" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    assert client.chat.completions.create(model=NAME, messages=USER, max_tokens=3).usage.completion_tokens <= 3


# ----------------------------------------------------------------------------- streaming pieces, scripted


@pytest.mark.parametrize("prefilled", [True, False])
def test_streamed_reasoning_split_equals_the_whole_split_for_any_chunking(prefilled):
    rng = random.Random(0)
    texts = [
        "7+8 is 15.\n</think>\n\nThe answer is 15.",
        "no end tag, still thinking",
        "</think>answer only",
        "a </thi b </think> c </think> d",
        "x\n\n</think>",
        "  lead </think>  trail  ",
        "",
    ]
    if not prefilled:
        texts = ["<think>" + t for t in texts] + ["plain answer, no tags"]
    for text in texts:
        want = split_reasoning(text, prefilled=prefilled)
        for _ in range(40):
            cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6)))) if text else []
            pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            events = [Event(0, p, i + 1) for i, p in enumerate(pieces)]
            events[-1].finish_reason = "stop"
            splitter, reasoning, content = [ReasoningStream(prefilled=prefilled)], "", ""
            for a, b in _batches(events, rng):
                r, c, _ = _merge(events[a:b], splitter)[0]
                reasoning, content = reasoning + r, content + c
            assert (reasoning, content) == (want[0] or "", want[1]), (text, pieces)


def _batches(events, rng):
    i = 0
    while i < len(events):
        j = min(len(events), i + rng.randint(1, 3))
        yield i, j
        i = j


def test_text_tracker_never_streams_the_start_of_a_stop_string():
    rng = random.Random(1)
    decode = lambda ids: "".join(chr(t) for t in ids)  # one character per token
    for _ in range(200):
        text = "".join(rng.choice("abc") for _ in range(30))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(2, 4)))]
        hit = text.find(stops[0])
        final = text if hit < 0 else text[:hit]
        ids = [ord(c) for c in (text if hit < 0 else text[: hit + len(stops[0])])]
        tracker, sent = TextTracker(decode, stops), ""
        for k in range(1, len(ids)):  # the sampler finishes the row on the token that completes the stop string
            sent += tracker.push(ids[:k])
            assert final.startswith(sent), (text, stops, sent)
        sent += tracker.finish(final)
        assert sent == final


# ----------------------------------------------------------------------------- terminal chat and CLI


def test_terminal_chat_streams_dimmed_thinking_then_the_answer(tiny_native_dir, ref, thinking_prompt):
    _, tok = ref
    want = split_reasoning(greedy(ref, chat_text(tok, thinking_prompt), 100).text, prefilled=True)
    model, tok = load_model_and_tokenizer(tiny_native_dir)
    service = ModelService(model, tok, "tiny", max_batch=1)
    service.engine.start()
    out = io.StringIO()
    try:
        chat = TerminalChat(service, Printer(out, color=True), temperature=0.0, max_tokens=100)
        turn = chat.reply(thinking_prompt)
    finally:
        service.engine.close()
    assert (turn.reasoning, turn.content) == want
    printed = out.getvalue()
    assert "\x1b[2m" in printed  # the thinking is dimmed
    assert printed.index("thinking") < printed.rindex(want[1][:5])  # and shown before the answer
    assert chat.history == [{"role": "user", "content": thinking_prompt}, {"role": "assistant", "content": want[1]}]


def test_terminal_chat_reports_a_too_long_message_and_goes_on(tiny_native_dir):
    model, tok = load_model_and_tokenizer(tiny_native_dir)
    out = io.StringIO()
    chat = TerminalChat(ModelService(model, tok, "tiny", max_batch=1), Printer(out, color=False))
    turn = chat.reply("9 " * 400)
    assert turn.finish_reason == "error" and "context length" in out.getvalue() and chat.history == []


def test_cli_serve_and_chat_reject_bad_flags(tiny_native_dir, capsys):
    assert main(["serve", str(tiny_native_dir), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["chat", str(tiny_native_dir), "--max-tokens", "0"]) == 2
    assert "--max-tokens" in capsys.readouterr().err
    assert main(["serve", "/nonexistent/model-dir"]) == 2
    assert "nonexistent" in capsys.readouterr().err


def test_engine_rejects_more_samples_than_rows(ref):
    from r1lab.serve.engine import Engine, Job

    engine = Engine(ref[0], max_batch=2)
    with pytest.raises(ValueError, match="n=3"):
        engine.submit(Job([1, 2], SamplingParams(n=3), lambda ev: None))
    with pytest.raises(ValueError, match="max_batch"):
        Engine(ref[0], max_batch=0)


def test_streamed_chunks_stay_one_line_whatever_the_model_writes():
    """Generated text with Unicode line separators must not split an SSE data line for splitlines-based readers."""
    import httpx

    from r1lab.serve.protocol import sse

    text = "a\u2028b\u2029c\x85d\re\nf"
    frame = sse({"choices": [{"delta": {"content": text}}]}).decode()
    decoder = httpx._decoders.LineDecoder()
    lines = [line for line in decoder.decode(frame) + decoder.flush() if line]
    assert len(lines) == 1 and json.loads(lines[0][len("data: ") :])["choices"][0]["delta"]["content"] == text
