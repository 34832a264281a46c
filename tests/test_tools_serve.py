"""`r1lab serve --tools python`: the server runs the same tool loop as the sampler, and the API returns the call and
its output inside reasoning_content, streamed or not. Driven by the scripted model of test_tools.py."""

from __future__ import annotations

import openai
import pytest
from test_serve_web import browser  # noqa: F401  (the headless Chromium fixture)
from test_tools import Script, ScriptBackend, tok  # noqa: F401  (tok: the tokenizer fixture)

from r1lab import sampler as S
from r1lab.cli import build_parser
from r1lab.sandbox import unavailable
from r1lab.serve.app import BackgroundServer, create_app

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no sandbox here: {unavailable()}")
ASK = [{"role": "user", "content": "run print(47*38) =>"}]


def serve(monkeypatch, tok, tools: str):
    script = Script(tok)
    monkeypatch.setattr(S, "make_backend", lambda model, tokenizer: ScriptBackend(script))
    return BackgroundServer(create_app((script, tok), model_name="script", tools=tools))


def test_served_chat_runs_the_tool_and_returns_the_call_and_its_output_as_reasoning(monkeypatch, tok):
    with serve(monkeypatch, tok, "python") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="script", messages=ASK, temperature=0, max_tokens=80)
        msg = reply.choices[0].message
        assert msg.reasoning_content == "<tool> print(47*38) </tool> <output> 1786 </output>"
        assert msg.content == "1786" and reply.choices[0].finish_reason == "stop"
        reasoning, content = "", ""
        for chunk in client.chat.completions.create(
            model="script", messages=ASK, temperature=0, max_tokens=80, stream=True
        ):
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                content += choice.delta.content or ""
        assert (reasoning, content) == (msg.reasoning_content, msg.content)


def test_without_tools_the_server_runs_nothing(monkeypatch, tok):
    with serve(monkeypatch, tok, "none") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        msg = client.chat.completions.create(model="script", messages=ASK, temperature=0, max_tokens=80)
        assert msg.choices[0].message.reasoning_content == "<tool> print(47*38) </tool>"


def test_serve_and_chat_take_tools_off_by_default_and_say_where_programs_run():
    parser = build_parser()
    for cmd in ("serve", "chat"):
        args = parser.parse_args([cmd, "m"])
        assert args.tools == "none" and args.sandbox is None
        assert parser.parse_args([cmd, "m", "--tools", "python", "--sandbox", "process"]).tools == "python"
    sub = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    help_text = " ".join(sub.format_help().split())
    assert "run on this server, in the sandbox" in help_text and "(off by default)" in help_text


def test_terminal_chat_shows_the_call_and_output_in_the_thinking(monkeypatch, tok):
    import io

    from r1lab.serve.service import ModelService
    from r1lab.serve.terminal import Printer, TerminalChat
    from r1lab.tools import PythonTool

    script = Script(tok)
    monkeypatch.setattr(S, "make_backend", lambda model, tokenizer: ScriptBackend(script))
    service = ModelService(script, tok, "script", max_batch=1, tools=PythonTool(tok))
    service.engine.start()
    try:
        out = io.StringIO()
        turn = TerminalChat(service, Printer(out, color=False), temperature=0).reply("run print(6*7) =>")
    finally:
        service.engine.close()
    assert (turn.reasoning, turn.content) == ("<tool> print(6*7) </tool> <output> 42 </output>", "42")
    assert "thinking: <tool> print(6*7) </tool> <output> 42 </output>\n\n42" in out.getvalue()


@pytest.mark.browser
def test_the_web_page_marks_the_call_and_its_output_inside_the_thinking(monkeypatch, tok, browser, tmp_path):
    with serve(monkeypatch, tok, "python") as server:
        page = browser.new_page(viewport={"width": 900, "height": 600})
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'script'")
        page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
        page.fill("#prompt", ASK[0]["content"])
        page.click("#send")
        page.wait_for_selector(".msg.assistant .meta:not(:empty)", timeout=30_000)
        body = ".msg.assistant .thinking-body"
        assert page.text_content(body) == "<tool> print(47*38) </tool> <output> 1786 </output>"
        assert page.text_content(f"{body} .tool-call") == "<tool> print(47*38) </tool>"
        assert page.text_content(f"{body} .tool-output") == "<output> 1786 </output>"
        assert page.text_content(".msg.assistant .answer") == "1786"
        style = "el => getComputedStyle(el).backgroundColor"
        assert page.eval_on_selector(f"{body} .tool-output", style) != page.eval_on_selector(body, style)
        page.screenshot(path=str(tmp_path / "tool-chat.png"), full_page=True)
        page.close()
