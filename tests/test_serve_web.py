"""The web chat page at `/`, end to end in headless Chromium (Playwright driving the system browser): a typed
message streams back as a thinking block and an answer equal to the sampler's own greedy reply; a model trained on
the R1-Zero template shows its thinking and the answer without tags, over two turns."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from r1zero_chat import ANSWERS, CHATS, FOLLOW_UP, QUESTION, THINKING, r1zero_chat_dir  # noqa: F401

from r1lab.model.load import load_model_and_tokenizer
from r1lab.reasoning import split_reasoning
from r1lab.sampler import Sampler, SamplingParams
from r1lab.serve.app import BackgroundServer, create_app
from r1lab.serve.engine import EngineStats, wait_idle

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("R1LAB_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "sk-web-test"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it (apt-get install -y chromium) or point "
            "R1LAB_CHROMIUM at a Chromium binary"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the browser tests need playwright: pip install playwright (its own browser download is not "
            "needed; the system Chromium is used)"
        )
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # server and browser share the machine
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(tiny_native_dir):
    with BackgroundServer(create_app(tiny_native_dir, api_key=KEY, model_name="tiny-r1", max_batch=8)) as s:
        yield s


@pytest.fixture(scope="module")
def expected(tiny_native_dir):
    """(user message, reasoning, answer): a message whose greedy reply thinks and then answers."""
    model, tok = load_model_and_tokenizer(tiny_native_dir)
    sampler = Sampler(model, tok)
    users = [f"What is {a} + {b}?" for a in range(8) for b in range(8)]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": u}], tokenize=False, add_generation_prompt=True)
        for u in users
    ]
    for u, p in zip(users, prompts):
        text = sampler.generate([p], SamplingParams(max_new_tokens=100, temperature=0))[0].text
        reasoning, content = split_reasoning(text, prefilled=True)
        if reasoning and content:
            return u, reasoning, content
    pytest.fail("no greedy reply of the tiny test model closes its thinking; widen the candidate prompts")


def open_page(browser, server, key: str | None):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(server.url + "/")
    if key:
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny-r1'")
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    page.fill("#max-tokens", "100")
    return page


def test_a_message_streams_back_as_thinking_and_answer(browser, server, expected, tmp_path):
    user, reasoning, answer = expected
    page = open_page(browser, server, KEY)
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)

    page.fill("#prompt", user)
    page.click("#send")
    done = ".msg.assistant .meta:not(:empty)"
    page.wait_for_selector(done, timeout=30_000)
    assert page.inner_text(".msg.user .bubble") == user
    assert page.text_content(".msg.assistant .thinking-body") == reasoning
    assert page.text_content(".msg.assistant .answer") == answer
    assert "Thought for" in page.inner_text(".msg.assistant .thinking summary")
    assert "thinking" in page.inner_text(".msg.assistant .meta")
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

    # the thinking block folds away; the answer stays
    page.click(".msg.assistant .thinking summary")
    assert not page.is_visible(".msg.assistant .thinking-body") and page.is_visible(".msg.assistant .answer")

    # the next turn sends the history: earlier answers, never their reasoning_content
    page.fill("#prompt", "And then?")
    page.press("#prompt", "Enter")
    page.wait_for_function(f"document.querySelectorAll('{done}').length === 2", timeout=30_000)
    assert bodies[-1]["messages"] == [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And then?"},
    ]
    assert bodies[-1]["temperature"] == 0 and bodies[-1]["max_tokens"] == 100 and bodies[-1]["stream"] is True
    page.screenshot(path=str(tmp_path / "chat-two-turns.png"), full_page=True)
    page.close()


def test_the_stop_button_ends_generation_on_the_server(browser, server, tmp_path):
    engine = server.app.state.service.engine
    assert wait_idle(engine)
    engine.stats = stats = EngineStats()
    model = server.app.state.service.sampler.model
    hook = model.register_forward_hook(lambda *a: time.sleep(0.02))  # 200 tokens would take over 4 s
    try:
        page = open_page(browser, server, KEY)
        page.fill("#max-tokens", "200")
        page.fill("#prompt", "Think for a long time.")
        page.click("#send")
        page.wait_for_function(
            "document.querySelector('.msg.assistant .thinking-body').textContent.length > 3", timeout=30_000
        )
        page.click("#stop")
        page.wait_for_selector(".msg.assistant .meta:not(:empty)", timeout=10_000)
        assert "stopped" in page.inner_text(".msg.assistant .meta")
        assert page.is_visible("#send") and not page.is_visible("#stop")
        assert wait_idle(engine, 10)
    finally:
        hook.remove()
    assert stats.cancelled_rows == 1 and stats.finished_rows == 0, stats
    page.close()


def test_errors_show_on_the_page(browser, server, tmp_path):
    page = open_page(browser, server, key=None)  # no API key: the server answers 401
    page.fill("#prompt", "hello")
    page.click("#send")
    page.wait_for_selector(".msg.assistant .error", timeout=10_000)
    assert "API key" in page.inner_text(".msg.assistant .error")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.fill("#prompt", "9 " * 400)  # longer than the model's context: a 400 that says so
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .error').length === 2", timeout=10_000)
    assert "context length" in page.inner_text(".msg.assistant:last-of-type .error")
    page.screenshot(path=str(tmp_path / "errors.png"), full_page=True)
    page.close()


# ----------------------------------------------------------------------------- a model trained on the R1-Zero template


@pytest.fixture(scope="module")
def r1zero_server(r1zero_chat_dir):
    with BackgroundServer(create_app(r1zero_chat_dir, model_name="r1zero-tiny", max_batch=2)) as s:
        yield s


def test_an_r1zero_model_shows_its_thinking_and_the_answer_alone(browser, r1zero_server, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(r1zero_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'r1zero-tiny'")
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    done = ".msg.assistant .meta:not(:empty)"
    for turn, (question, thinking, answer) in enumerate(zip((QUESTION, FOLLOW_UP), THINKING, ANSWERS), start=1):
        page.fill("#prompt", question)
        page.press("#prompt", "Enter")
        page.wait_for_function(f"document.querySelectorAll('{done}').length === {turn}", timeout=30_000)
        reply = page.locator(".msg.assistant").nth(turn - 1)
        assert reply.locator(".thinking-body").text_content() == thinking
        assert reply.locator(".answer").text_content() == answer
    assert bodies[-1]["messages"] == CHATS[1]  # the first answer went back as history, tags and thinking left out
    page.screenshot(path=str(tmp_path / "r1zero-chat.png"), full_page=True)
    page.close()
