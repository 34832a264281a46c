"""Splitting completions into reasoning and content, whole and streamed."""

from __future__ import annotations

import random

import pytest

from r1lab.reasoning import ReasoningStream, split_reasoning


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>7+8=15</think><answer>15</answer>", ("7+8=15", "<answer>15</answer>")),
        ("<think>\nstep one\nstep two\n</think>\n\nThe answer is 4.", ("step one\nstep two", "The answer is 4.")),
        # the R1 chat template prefilled "<think>\n": the completion starts inside the reasoning
        ("7+8=15, write 5\n</think>\n\n\\boxed{15}", ("7+8=15, write 5", "\\boxed{15}")),
        ("Just the answer: 4", (None, "Just the answer: 4")),
        ("  \n Just the answer  \n", (None, "Just the answer")),
        ("<think>I was cut off mid-", ("I was cut off mid-", "")),
        ("<think></think>5", ("", "5")),
        ("<think> a </think> b </think> c", ("a", "b </think> c")),  # the first closing tag ends the reasoning
        ("<think>a</think>b<think>c</think>d", ("a", "b<think>c</think>d")),
        ("Sure. <think>a</think>b", ("Sure. a", "b")),  # text before the tag is kept, in the reasoning
        ("", (None, "")),
    ],
)
def test_split_reasoning_hand_worked_cases(text, expected):
    assert split_reasoning(text) == expected


def test_prefilled_completion_without_any_tag_is_all_reasoning():
    assert split_reasoning("still thinking", prefilled=True) == ("still thinking", "")
    assert split_reasoning("thought</think>answer", prefilled=True) == ("thought", "answer")
    assert split_reasoning("<think>repeated tag</think>answer", prefilled=True) == ("repeated tag", "answer")


def test_custom_tags_and_empty_tags():
    assert split_reasoning("[r]x[/r]y", start="[r]", end="[/r]") == ("x", "y")
    assert split_reasoning("<think>x</think>y", start="[r]", end="[/r]") == (None, "<think>x</think>y")
    with pytest.raises(ValueError, match="non-empty.*start=''"):
        split_reasoning("x", start="", end="</think>")
    with pytest.raises(ValueError, match="non-empty"):
        ReasoningStream(end="")


def _stream(text: str, sizes: list[int], prefilled: bool = False) -> tuple[str, str]:
    stream, reasoning, content, i = ReasoningStream(prefilled=prefilled), [], [], 0
    for n in sizes:
        r, c = stream.feed(text[i : i + n])
        reasoning.append(r)
        content.append(c)
        i += n
    r, c = stream.finish()
    return "".join(reasoning + [r]), "".join(content + [c])


STREAMED = [
    "<think>\n7+8=15, write 5 carry 1.\n4+3+1=8 </think>\n\n<answer> 85 </answer>",
    "<think>a < b and c <thin </think> x </thin y",
    "<think>\n\n</think>\n\nthe answer",
    "  <think>never closed <",
    "no tags at all, just < and > signs",
    "<thi",
    "",
]


@pytest.mark.parametrize("text", STREAMED)
def test_streamed_deltas_add_up_to_the_whole_split_for_every_chunking(text):
    reasoning, content = split_reasoning(text)
    expected = (reasoning or "", content)
    assert _stream(text, [1] * len(text)) == expected
    rng = random.Random(0)
    for _ in range(30):
        sizes = [rng.randint(1, 6) for _ in range(len(text))]
        assert _stream(text, sizes) == expected


@pytest.mark.parametrize("text", ["thinking\n</think>\n\nanswer", "cut off in the middle </thi", "<think>x</think>y"])
def test_prefilled_stream_matches_prefilled_split(text):
    reasoning, content = split_reasoning(text, prefilled=True)
    assert _stream(text, [1] * len(text), prefilled=True) == (reasoning, content)
    assert _stream(text, [3] * len(text), prefilled=True) == (reasoning, content)


def test_stream_sends_reasoning_before_the_tag_is_complete_and_holds_back_only_a_possible_tag():
    s = ReasoningStream(prefilled=True)
    assert s.in_reasoning
    assert s.feed("7+8=15 ") == ("7+8=15", "")  # the trailing space waits: it may end the reasoning
    assert s.feed("so 15</th") == (" so 15", "")  # "</th" may be the closing tag
    assert s.feed("ink>\n") == ("", "")
    assert not s.in_reasoning
    assert s.feed("15") == ("", "15")
    assert s.finish() == ("", "")


# ----------------------------------------------------------------------------- R1-Zero's answer tags


@pytest.mark.parametrize(
    "text,expected",
    [
        # what a model trained on the R1-Zero template writes after "Assistant:"
        (
            " <think> 7+8=15, write 5 carry 1. 4+3+1=8, so 85 </think> <answer> 85 </answer>",
            ("7+8=15, write 5 carry 1. 4+3+1=8, so 85", "85"),
        ),
        (" <think> </think> <answer> 85 </answer>", ("", "85")),
        ("<answer> 85 </answer>", (None, "85")),  # no thinking at all
        (" <think> so 85 </think> <answer> 8", ("so 85", "8")),  # cut off inside the answer
        (" <think> still going", ("still going", "")),  # cut off while thinking
        (" <think> a </think> so <answer> 85 </answer> done", ("a", "so  85  done")),  # text around the tags stays
        (" <think> a </think> 85 </answer>", ("a", "85 </answer>")),  # a closing tag alone is text
        (" <think> a </think> <answer> 1 </answer> <answer> 2 </answer>", ("a", "1  <answer> 2 </answer>")),
        ("<think> a <answer> 85 </answer>", ("a <answer> 85 </answer>", "")),  # answer tags inside thinking stay
    ],
)
def test_answer_tags_are_split_out_of_the_content(text, expected):
    assert split_reasoning(text, answer_tags=True) == expected
    assert split_reasoning(text) == (expected[0], split_reasoning(text)[1])  # without the flag: content as written
    assert "<answer>" in split_reasoning(" <think> a </think> <answer> 85 </answer>")[1]


def test_prefilled_r1_reply_with_answer_tags_splits_the_same():
    assert split_reasoning("7+8=15\n</think>\n\n<answer>15</answer>", prefilled=True, answer_tags=True) == (
        "7+8=15",
        "15",
    )
    assert split_reasoning("7+8=15\n</think>\n\nThe answer is 15.", prefilled=True, answer_tags=True) == (
        "7+8=15",
        "The answer is 15.",
    )


ANSWERED = [
    " <think> 7+8=15, write 5 carry 1. 4+3+1=8, so 85 </think> <answer> 85 </answer>",
    " <think> </think> <answer> 85 </answer>",
    "<answer>85</answer>",
    " <think> a </think> so <answer> 8<5 </answer> done </answ",
    " <think> a </think> <answer> </ans </answer>",
    " <think> a </think> <answe",
    " <think> a </think> 85 </answer> <answer> 1",
]


@pytest.mark.parametrize("text", ANSWERED)
def test_streamed_answer_deltas_add_up_to_the_whole_split_and_never_show_a_tag(text):
    """Every chunking of the text: the deltas shown so far are always a prefix of the whole split's parts."""
    want = split_reasoning(text, answer_tags=True)
    rng = random.Random(0)
    for trial in range(40):
        sizes = [1] * len(text) if trial == 0 else [rng.randint(1, 6) for _ in range(len(text))]
        stream, reasoning, content, i = ReasoningStream(answer_tags=True), "", "", 0
        for n in sizes:
            r, c = stream.feed(text[i : i + n])
            i += n
            reasoning, content = reasoning + r, content + c
            # what was shown so far is a prefix of the final split: no piece of a removed tag ever showed
            assert (want[0] or "").startswith(reasoning) and want[1].startswith(content), (text, sizes)
        r, c = stream.finish()
        assert (reasoning + r, content + c) == (want[0] or "", want[1]), (text, sizes)
