"""Chatting with a model trained on the R1-Zero template (what `r1lab pipeline` makes): the server, the terminal chat
and `r1lab chat` render the template the model directory carries, and show the thinking apart from the answer, the
answer without its `<answer>` tags, whole and streamed; an answer sent back as history renders as the model writes a
direct reply. The model memorised its replies (tests/r1zero_chat.py), which are the reference."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest
import torch
from r1zero_chat import ANSWERS, CHATS, FOLLOW_UP, QUESTION, REPLIES, THINKING, r1zero_chat_dir  # noqa: F401

from r1lab.cli import main
from r1lab.model.load import load_model_and_tokenizer
from r1lab.serve.app import BackgroundServer, create_app
from r1lab.serve.service import ModelService
from r1lab.serve.terminal import Printer, TerminalChat
from r1lab.tasks import Problem
from r1lab.tokenizer import BOS, EOS, R1ZERO_PREAMBLE, R1ZERO_TEMPLATE, train_tokenizer
from r1lab.train.pretrain import completion_text

NAME = "r1zero-tiny"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(r1zero_chat_dir):
    with BackgroundServer(create_app(r1zero_chat_dir, model_name=NAME, max_batch=4)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_an_earlier_answer_renders_as_the_direct_reply_the_model_was_trained_on():
    tok = train_tokenizer(["What is 1 + 2? <think> 1 plus 2 </think> <answer> 3 </answer>"], vocab_size=300)
    tok.chat_template = R1ZERO_TEMPLATE
    # the pretraining corpus's form of a direct answer
    direct = completion_text(Problem(id="q", task="add", prompt=QUESTION, answer="85"), direct=True)
    want = f"{BOS}{R1ZERO_PREAMBLE} User: {QUESTION}. Assistant:{direct}{EOS} User: {FOLLOW_UP}. Assistant:"
    for sent_back in ("85", " 85 ", "<answer> 85 </answer>", "<think> 7+8=15 ... </think> <answer> 85 </answer>"):
        chat = [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": sent_back},
            {"role": "user", "content": FOLLOW_UP},
        ]
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == want, sent_back


def test_the_model_directory_carries_the_r1zero_template(r1zero_chat_dir):
    _, tok = load_model_and_tokenizer(r1zero_chat_dir)
    assert tok.chat_template["default"] == R1ZERO_TEMPLATE
    prompt = tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(f"User: {QUESTION}. Assistant:")


def test_reply_is_the_answer_alone_with_the_thinking_in_reasoning_content(client, r1zero_chat_dir):
    r = client.chat.completions.create(model=NAME, messages=CHATS[0], temperature=0, max_tokens=64)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content) == (THINKING[0], ANSWERS[0])
    assert r.choices[0].finish_reason == "stop"
    _, tok = load_model_and_tokenizer(r1zero_chat_dir)
    ids = tok(REPLIES[0] + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.completion_tokens_details.reasoning_tokens == ids.index(tok.convert_tokens_to_ids("</think>")) + 1


def test_streamed_reply_sends_thinking_then_the_answer_and_never_a_tag(client):
    chunks = list(
        client.chat.completions.create(model=NAME, messages=CHATS[0], temperature=0, max_tokens=64, stream=True)
    )
    kinds, reasoning, content = [], "", ""
    for ch in chunks:
        for c in ch.choices:
            if getattr(c.delta, "reasoning_content", None):
                kinds.append("r")
                reasoning += c.delta.reasoning_content
            if c.delta.content:
                kinds.append("c")
                content += c.delta.content
                assert "<" not in c.delta.content and ">" not in c.delta.content, c.delta.content
    assert (reasoning, content) == (THINKING[0], ANSWERS[0])
    assert "".join(kinds).strip("r").strip("c") == "" and kinds[-1] == "c"


def test_the_answer_sent_back_as_history_gets_the_trained_follow_up(client):
    r = client.chat.completions.create(model=NAME, messages=CHATS[1], temperature=0, max_tokens=64)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (THINKING[1], ANSWERS[1])


def test_n_choices_each_split_the_same_way(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        timeout=60,
        json={"messages": CHATS[0], "temperature": 0, "n": 3, "max_tokens": 64},
    )
    assert [(c["message"]["reasoning_content"], c["message"]["content"]) for c in r.json()["choices"]] == [
        (THINKING[0], ANSWERS[0])
    ] * 3


def test_terminal_chat_shows_the_thinking_dimmed_and_the_answer_alone(r1zero_chat_dir):
    model, tok = load_model_and_tokenizer(r1zero_chat_dir)
    service = ModelService(model, tok, "tiny", max_batch=1)
    service.engine.start()
    out = io.StringIO()
    try:
        chat = TerminalChat(service, Printer(out, color=True), temperature=0.0, max_tokens=64)
        first, second = chat.reply(QUESTION), chat.reply(FOLLOW_UP)
    finally:
        service.engine.close()
    assert [(t.reasoning, t.content) for t in (first, second)] == list(zip(THINKING, ANSWERS))
    assert chat.history == CHATS[1] + [{"role": "assistant", "content": ANSWERS[1]}]
    printed = out.getvalue()
    assert "<answer>" not in printed and "</answer>" not in printed and "<think>" not in printed
    plain = printed.replace("\x1b[0m\x1b[2m", "")  # dimmed pieces joined
    for thinking, answer in zip(THINKING, ANSWERS):  # dimmed thinking, then the answer alone on its own line
        assert f"\x1b[2mthinking: {thinking}\x1b[0m\n\n{answer}\n" in plain, plain


def test_r1lab_chat_command_answers_from_the_model_directory(r1zero_chat_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n{FOLLOW_UP}\n/exit\n"))
    assert main(["chat", str(r1zero_chat_dir), "--temperature", "0", "--max-tokens", "64"]) == 0
    out = capsys.readouterr().out
    for thinking, answer in zip(THINKING, ANSWERS):
        assert thinking in out and f"\n\n{answer}\n" in out
    assert "<answer>" not in out and "</think>" not in out


def test_completions_endpoint_returns_the_raw_reply_with_its_tags(client, r1zero_chat_dir):
    _, tok = load_model_and_tokenizer(r1zero_chat_dir)
    prompt = tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=64)
    assert r.choices[0].text == REPLIES[0]
    assert json.loads(r.model_dump_json())["choices"][0]["text"].endswith("</answer>")
