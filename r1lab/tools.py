"""Tool-integrated reasoning: the one format in which a model calls a Python tool while it thinks, and running it.

A reply calls the tool by writing a program between `<tool>` and `</tool>` inside its thinking. The sampler pauses
that row, runs the program in the sandbox (r1lab.sandbox: no network, no host files, resource limits), appends what
it printed as ` <output> ... </output>` tokens, and the model goes on:

    <think> <tool> print(47*38) </tool> <output> 1786 </output> </think> <answer> 1786 </answer>

The model wrote everything but the output span (from the space before `<output>` through `</output>`): those tokens
are the tool's, so `Completion.token_mask` is 0 there and no loss trains on them. The program is the text between
the tags with its surrounding whitespace taken off (a program that starts on the line after `<tool>` is dedented).
What the tool says is the program's standard output; a program that fails adds the last line of its error (for
example `ZeroDivisionError: division by zero`), and one the sandbox stops says which limit it hit. Any of the
model's tags or special tokens inside the output are broken up by a space (`< /output>`), so the output can never
close itself, open a call or end the reply.

Limits per reply (`ToolLimits`): the number of calls, the tokens of one call's output (longer output is cut and
ends in ` ...`) and of all of them, and the program's time and memory. A call the limits do not allow is not run:
the reply ends right after it, with finish reason "tool_limit" (or "length" when the output would not fit in
max_new_tokens). The tokenizers r1lab trains make the four tags single tokens when their corpus uses them
(r1lab.tokenizer); with any other tokenizer the tags are matched as text.
"""

from __future__ import annotations

import textwrap
from concurrent.futures import Future
from dataclasses import dataclass

from r1lab.config import opt
from r1lab.tokenizer import TAGS, TOOL_TAGS

__all__ = [
    "TOOLS",
    "CALL_START",
    "CALL_END",
    "OUTPUT_START",
    "OUTPUT_END",
    "TOOL_TAGS",
    "ToolLimits",
    "ToolCall",
    "PythonTool",
    "make_tool",
    "program_of",
    "format_output",
    "output_text",
    "tool_spans",
]

TOOLS = ("python",)
CALL_START, CALL_END, OUTPUT_START, OUTPUT_END = TOOL_TAGS  # "<tool>", "</tool>", "<output>", "</output>"


@dataclass
class ToolLimits:
    """What one reply may do with the tool, and what one program may use."""

    max_calls: int = opt(4, "tool calls per reply; a reply that writes one more ends there (finish reason tool_limit)")
    max_output_tokens: int = opt(
        64, "tokens of one call's output, tags included; longer output is cut and ends in ' ...'"
    )
    max_tool_tokens: int = opt(
        256,
        "tool-written tokens per reply in all; a call whose output would pass this ends "
        "the reply (finish reason tool_limit)",
    )
    wall_seconds: float = opt(5.0, "wall-clock seconds per program; the sandbox kills it and all it started")
    cpu_seconds: int = opt(2, "CPU seconds per program")
    memory_mb: int = opt(512, "address space per program process, in MiB")

    def validate(self) -> ToolLimits:
        for name in ("max_calls", "cpu_seconds", "memory_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"tool limit {name} must be >= 1 (got {getattr(self, name)})")
        if self.max_output_tokens < 16:
            raise ValueError(
                f"tool limit max_output_tokens must be >= 16, room for the tags and a short output "
                f"(got {self.max_output_tokens})"
            )
        if self.max_tool_tokens < self.max_output_tokens:
            raise ValueError(
                f"tool limit max_tool_tokens ({self.max_tool_tokens}) must be >= max_output_tokens "
                f"({self.max_output_tokens})"
            )
        if not self.wall_seconds > 0:
            raise ValueError(f"tool limit wall_seconds must be > 0 (got {self.wall_seconds})")
        return self

    def sandbox(self):
        """The sandbox's Limits for one program."""
        from r1lab.sandbox import Limits

        return Limits(
            cpu_seconds=self.cpu_seconds,
            wall_seconds=self.wall_seconds,
            memory_bytes=self.memory_mb << 20,
            output_bytes=64 << 10,
        )


@dataclass
class ToolCall:
    """One call a reply made: its program, what the tool said, and what it cost."""

    program: str
    output: str = ""  # the text between the output tags, as appended
    status: str = ""  # the sandbox's: passed, failed, timeout, memory, output_limit, error, unavailable
    seconds: float = 0.0  # the program's wall time in the sandbox (0 when it shared another row's run)
    tokens: int = 0  # tool-written tokens appended to the reply (0 when the reply ended instead)
    shared: bool = False  # the same program ran once for several rows of one generate() call

    @property
    def failed(self) -> bool:
        """The program raised, hit a limit, or could not run."""
        return self.status != "passed"


def program_of(text: str) -> str | None:
    """The program of the call that `text` ends with (the last `<tool>` before the last `</tool>`), or None when no
    call is open there."""
    end = text.rfind(CALL_END)
    start = text.rfind(CALL_START, 0, end) if end != -1 else -1
    if start == -1:
        return None
    body = text[start + len(CALL_START) : end]
    first, _, rest = body.partition("\n")
    if first.strip():  # the program starts on the tag's line: only that line's leading space goes
        return (first.lstrip() + ("\n" + rest if rest else "")).rstrip()
    return textwrap.dedent(rest).strip()


def output_text(result) -> str:
    """What the tool says of a sandbox Result: the program's standard output, plus the last line of its error when
    it failed, or the limit that stopped it."""
    out = result.stdout.rstrip("\n")
    if result.status == "passed":
        return out
    if result.status == "failed":
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"the program failed ({result.detail})"
        return f"{out}\n{why}" if out else why
    if result.status in ("timeout", "memory", "output_limit"):
        why = f"{result.status}: {result.detail or 'a limit was reached'}"
        return f"{out}\n{why}" if out else why
    return f"the sandbox could not run the program ({result.detail or result.status})"


def format_output(text: str) -> str:
    """The tool's part of the reply: ` <output> text </output>`."""
    return f" {OUTPUT_START} {text} {OUTPUT_END}" if text else f" {OUTPUT_START} {OUTPUT_END}"


def tool_spans(reasoning: str) -> list[tuple[str, str]]:
    """The reasoning cut into ("text" | "call" | "output", piece) spans, tags included in their span: for showing
    a call and its output apart (the web page does the same in JavaScript)."""
    spans, i = [], 0
    while i < len(reasoning):
        starts = [
            (reasoning.find(tag, i), kind, end)
            for tag, kind, end in ((CALL_START, "call", CALL_END), (OUTPUT_START, "output", OUTPUT_END))
        ]
        found = [s for s in starts if s[0] != -1]
        if not found:
            spans.append(("text", reasoning[i:]))
            break
        at, kind, end = min(found)
        if at > i:
            spans.append(("text", reasoning[i:at]))
        close = reasoning.find(end, at)
        stop = len(reasoning) if close == -1 else close + len(end)
        spans.append((kind, reasoning[at:stop]))
        i = stop
    return spans


class PythonTool:
    """Runs the programs of tool calls in the sandbox's shared worker pool and turns their results into the tokens
    appended to a reply. Refuses to start where the sandbox cannot run (SandboxUnavailable names the fix)."""

    name = "python"

    def __init__(self, tokenizer, limits: ToolLimits | None = None, pool=None):
        from r1lab.sandbox import default_pool, require

        self.limits = (limits or ToolLimits()).validate()
        if pool is None:
            require()
            pool = default_pool()
        self.tok, self.pool, self.sandbox_limits = tokenizer, pool, self.limits.sandbox()
        vocab = tokenizer.get_vocab()
        added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
        self.end_id = added.get(CALL_END)  # a single token: the fast check
        # without it, only a token whose text has '>' can complete the closing tag
        self.end_candidates = frozenset(i for t, i in vocab.items() if ">" in t) if self.end_id is None else frozenset()
        specials = list(getattr(tokenizer, "all_special_tokens", []))
        self.protected = sorted(set(TOOL_TAGS + TAGS) | set(added) | set(specials), key=len, reverse=True)

    def closes_call(self, ids: list[int]) -> bool:
        """Did the newest token complete `</tool>`?"""
        if self.end_id is not None:
            return ids[-1] == self.end_id
        if ids[-1] not in self.end_candidates:
            return False
        tail = self.tok.decode(ids[-16:], skip_special_tokens=False)
        return tail.count(CALL_END) > self.tok.decode(ids[-16:-1], skip_special_tokens=False).count(CALL_END)

    def submit(self, program: str) -> Future:
        """Queue the program in the sandbox; returns a Future of its Result at once."""
        return self.pool.submit(program, limits=self.sandbox_limits)

    def escape(self, text: str) -> str:
        """The output with every tag and special token broken up by a space, so that it stays plain text."""
        for tag in self.protected:
            if tag in text:
                text = text.replace(tag, tag[0] + " " + tag[1:])
        return text

    def output_ids(self, result) -> tuple[list[int], str]:
        """The token ids appended for a Result (at most max_output_tokens) and the text between the tags."""
        text = self.escape(output_text(result))
        ids = self._encode(format_output(text))
        limit, kept = self.limits.max_output_tokens, text
        while len(ids) > limit and kept:
            kept = kept[: max(0, int(len(kept) * limit / len(ids)) - 1)]
            text = f"{kept} ..." if kept else "..."
            ids = self._encode(format_output(text))
        return ids, text

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def make_tool(name: str | None, tokenizer, limits: ToolLimits | None = None) -> PythonTool | None:
    """The tool a `--tools` value names ("python"), or None for "" / "none"."""
    if not name or name == "none":
        return None
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}; choose one of {', '.join(TOOLS)} (or none)")
    return PythonTool(tokenizer, limits)
