"""`r1lab chat`: a conversation with a local model in the terminal, streamed, with the thinking shown dimmed.

It runs the same engine and request checks as the server (no HTTP in between). Ctrl-C stops a reply; `/new`
starts over; `/exit` or Ctrl-D leaves. Styling comes from `rich` when installed, else plain ANSI codes on a TTY.
"""

from __future__ import annotations

import queue
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from r1lab.serve import protocol as P
from r1lab.serve.service import ModelService
from r1lab.tools import tool_spans

HELP = "Type a message. /new starts a new conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply."
TOOL_STYLES = {"text": "dim", "call": "cyan", "output": "green"}


class Printer:
    """Writes dimmed, bold or plain text: through rich when available, else raw ANSI codes (none if not a TTY)."""

    def __init__(self, out: TextIO | None = None, color: bool | None = None):
        self.out = out or sys.stdout
        color = self.out.isatty() if color is None else color
        try:
            from rich.console import Console

            self.console: Console | None = Console(
                file=self.out,
                force_terminal=color,
                no_color=not color,
                highlight=False,
                soft_wrap=True,
                color_system="standard" if color else None,
            )
        except ImportError:
            self.console = None
        self.color = color

    def write(self, text: str, style: str = "") -> None:
        if not text:
            return
        if self.console is not None:
            self.console.print(text, style=style or None, end="", markup=False, emoji=False)
        else:
            codes = {"dim": "\x1b[2m", "bold": "\x1b[1m", "red": "\x1b[31m", "cyan": "\x1b[36m", "green": "\x1b[32m"}
            if self.color and style in codes:
                text = codes[style] + text + "\x1b[0m"
            self.out.write(text)
        self.out.flush()


@dataclass
class Turn:
    reasoning: str
    content: str
    tokens: int
    finish_reason: str  # "stop", "length", "interrupted" or "error"


@dataclass
class TerminalChat:
    """A conversation: its history (answers only, as the API expects) and the settings of each reply."""

    service: ModelService
    printer: Printer
    temperature: float = 0.6
    max_tokens: int | None = None
    seed: int | None = None
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def reply(self, text: str) -> Turn:
        """Send one user message, print the streamed reply, and add both to the history."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": text})
        try:
            req = P.ChatCompletionRequest(
                messages=messages, temperature=self.temperature, max_tokens=self.max_tokens, seed=self.seed
            )
            prep = self.service.prepare(req)
        except P.APIError as e:
            self.printer.write(f"error: {e.message}\n", "red")
            return Turn("", "", 0, "error")
        events: queue.Queue = queue.Queue()
        (job,) = self.service.jobs(prep, events.put)
        splitter = prep.stream()
        reasoning: list[str] = []
        content: list[str] = []
        tokens, finish = 0, None
        started = time.perf_counter()
        self.service.engine.submit(job)
        try:
            while finish is None:
                try:
                    batch = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                for ev in batch:
                    if ev.finish_reason == "error":
                        self.printer.write(f"\nerror: {ev.error}\n", "red")
                        return Turn("".join(reasoning), "".join(content), ev.tokens, "error")
                    r, c = splitter.feed(ev.text)
                    if ev.finish_reason:
                        r2, c2 = splitter.finish()
                        r, c, finish = r + r2, c + c2, ev.finish_reason
                    self._show(r, c, reasoning, content)
                    tokens = ev.tokens
        except KeyboardInterrupt:
            self.service.engine.cancel(job.id)
            finish = "interrupted"
        seconds = time.perf_counter() - started
        note = {"length": ", cut off at max tokens", "interrupted": ", stopped"}.get(finish, "")
        self.printer.write(f"\n[{tokens} tokens, {seconds:.1f} s{note}]\n\n", "dim")
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(content)}]
        return Turn("".join(reasoning), "".join(content), tokens, finish)

    def _show(self, r: str, c: str, reasoning: list[str], content: list[str]) -> None:
        if r:
            if not reasoning:
                self.printer.write("thinking: ", "dim")
            start = sum(map(len, reasoning))
            reasoning.append(r)
            at = 0
            for kind, piece in tool_spans("".join(reasoning)):  # a tool call and its output stand out
                if at + len(piece) > start:
                    self.printer.write(piece[max(0, start - at) :], TOOL_STYLES[kind])
                at += len(piece)
        if c:
            if not content:
                self.printer.write("\n\n" if reasoning else "")
            content.append(c)
            self.printer.write(c)

    def loop(self, read: Callable[[str], str] = input) -> None:
        """Read messages until /exit or end of input."""
        self.printer.write(HELP + "\n\n", "dim")
        while True:
            try:
                text = read("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                self.printer.write("\n")
                return
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/new":
                self.history.clear()
                self.printer.write("(new conversation)\n\n", "dim")
                continue
            self.reply(text)


def run_chat(
    model_dir: str,
    temperature: float = 0.6,
    max_tokens: int | None = None,
    seed: int | None = None,
    system: str | None = None,
    device="cpu",
    dtype=None,
    tools: str = "none",
) -> None:
    """`r1lab chat MODEL_DIR`: load the model and talk to it until the user leaves (with `tools="python"`, replies
    may call the Python tool; programs run in the sandbox)."""
    import torch

    from r1lab.model.load import load_model_and_tokenizer
    from r1lab.tools import make_tool

    model, tok = load_model_and_tokenizer(model_dir, device=device, dtype=dtype or torch.float32)
    service = ModelService(model, tok, name=str(model_dir), max_batch=1, tools=make_tool(tools, tok))
    service.engine.start()
    try:
        chat = TerminalChat(
            service, Printer(), temperature=temperature, max_tokens=max_tokens, seed=seed, system=system
        )
        chat.loop()
    finally:
        service.engine.close()
