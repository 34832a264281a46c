"""Split a completion into its reasoning (the `<think>` block) and its content (the reply after it).

The serving API fills `reasoning_content` / `content` from this; rewards and evaluation take the answer from
the content. Both forms R1 produces are handled: `<think>...</think>answer`, and `...</think>answer` when the
chat template prefilled `<think>` in the prompt (DeepSeek-R1's does), so the completion has no opening tag.
With `answer_tags=True` (what a chat shows) the R1-Zero format's `<answer> ... </answer>` tags are taken out of
the content too, so ` <think> 7+8=15 </think> <answer> 15 </answer>` splits into ("7+8=15", "15").

Whitespace: reasoning and content are stripped at both ends; whitespace inside them is kept as written.
"""

from __future__ import annotations

__all__ = ["split_reasoning", "ReasoningStream"]

THINK_START = "<think>"
THINK_END = "</think>"
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"


def split_reasoning(
    text: str, start: str = THINK_START, end: str = THINK_END, *, prefilled: bool = False, answer_tags: bool = False
) -> tuple[str | None, str]:
    """(reasoning, content). The first closing tag ends the reasoning. No tags: (None, text). A closing tag with no
    opening one: what precedes it is reasoning. An opening tag that never closes: all of it is reasoning, content "".
    Text before an opening tag is kept at the start of the reasoning. `prefilled=True` says the prompt ended with
    the opening tag, so an unclosed completion is all reasoning even without any tag. `answer_tags=True` also
    takes the first `<answer>` of the content and the first `</answer>` after it out (see `strip_answer_tags`)."""
    if not start or not end:
        raise ValueError(f"reasoning tags must be non-empty (got start={start!r}, end={end!r})")
    reasoning, content = _split(text, start, end, prefilled)
    return reasoning, strip_answer_tags(content) if answer_tags else content


def strip_answer_tags(content: str) -> str:
    """The content without its R1-Zero answer tags: the first `<answer>` and the first `</answer>` after it are
    removed, and the rest is stripped. Text around the tags stays (a reply that strays from the format hides
    nothing); a `</answer>` with no opening tag before it is ordinary text."""
    i = content.find(ANSWER_START)
    if i == -1:
        return content
    rest = content[i + len(ANSWER_START) :]
    j = rest.find(ANSWER_END)
    if j != -1:
        rest = rest[:j] + rest[j + len(ANSWER_END) :]
    return (content[:i] + rest).strip()


def _split(text: str, start: str, end: str, prefilled: bool) -> tuple[str | None, str]:
    if prefilled and not text.lstrip().startswith(start):
        text = start + text
    i_start, i_end = text.find(start), text.find(end)
    if i_start != -1 and (i_end == -1 or i_start < i_end):
        prefix, body = text[:i_start], text[i_start + len(start) :]
        j = body.find(end)
        if j == -1:
            return (prefix + body).strip(), ""
        return (prefix + body[:j]).strip(), body[j + len(end) :].strip()
    if i_end != -1:
        return text[:i_end].strip(), text[i_end + len(end) :].strip()
    return None, text.strip()


class ReasoningStream:
    """Incremental `split_reasoning` for streamed text: `feed(delta)` returns (reasoning_delta, content_delta) and
    holds back a possibly partial tag and trailing whitespace until the next delta decides them; `finish()` flushes.
    A tag the split takes out never shows in a delta, not even in part.

    The concatenated deltas equal `split_reasoning(whole, prefilled=..., answer_tags=...)` when the completion
    starts with the opening tag, has no tags, or `prefilled=True`. Without `prefilled`, text that does not open with
    the tag is streamed as content at once (a streamer cannot wait for a closing tag that may never come)."""

    def __init__(
        self, start: str = THINK_START, end: str = THINK_END, *, prefilled: bool = False, answer_tags: bool = False
    ):
        if not start or not end:
            raise ValueError(f"reasoning tags must be non-empty (got start={start!r}, end={end!r})")
        self.start, self.end, self.prefilled = start, end, prefilled
        # the answer tags still to take out of the content, in order (none once both are gone)
        self._answer_tags = [ANSWER_START, ANSWER_END] if answer_tags else []
        self._section = "before"  # before -> reasoning -> content
        self._buf = ""  # text received but not yet classified
        self._ws = ""  # trailing whitespace of the current section, held back
        self._begun = {"reasoning": False, "content": False}

    @property
    def in_reasoning(self) -> bool:
        return self._section == "reasoning" or (self._section == "before" and self.prefilled)

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        out: dict[str, list[str]] = {"reasoning": [], "content": []}
        while True:
            if self._section == "before":
                head = self._buf.lstrip()
                if head.startswith(self.start):
                    self._buf, self._section = head[len(self.start) :], "reasoning"
                    continue
                if self.start.startswith(head):  # still possibly the opening tag (or only whitespace so far)
                    break
                self._section = "reasoning" if self.prefilled else "content"
                continue
            tag = self.end if self._section == "reasoning" else next(iter(self._answer_tags), None)
            if tag is not None and tag in self._buf:
                text, self._buf = self._buf.split(tag, 1)
                self._emit(text, out)
                if self._section == "reasoning":
                    self._ws, self._section = "", "content"
                else:  # an answer tag: the content goes on, whitespace around the tag included
                    self._answer_tags.pop(0)
                continue
            keep = _partial_tag_suffix(self._buf, tag) if tag else 0
            text, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
            self._emit(text, out)
            break
        return "".join(out["reasoning"]), "".join(out["content"])

    def finish(self) -> tuple[str, str]:
        """Flush what was held back: a partial tag that never completed is ordinary text."""
        out: dict[str, list[str]] = {"reasoning": [], "content": []}
        if self._section == "before":
            self._section = "reasoning" if self.prefilled else "content"
        self._emit(self._buf, out)
        self._buf = self._ws = ""
        return "".join(out["reasoning"]), "".join(out["content"])

    def _emit(self, text: str, out: dict) -> None:
        full = self._ws + text
        if not self._begun[self._section]:
            full = full.lstrip()
        body = full.rstrip()
        self._ws = full[len(body) :]
        if body:
            self._begun[self._section] = True
            out[self._section].append(body)


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
