"""Reward functions: accuracy, R1-Zero format, DAPO overlong, language consistency, weighted sums, registry."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from r1lab.rewards import (
    FORMAT_MAX_CHARS,
    RewardError,
    accuracy,
    completion_text,
    format_reward,
    get_reward,
    language_consistency,
    list_rewards,
    overlong,
    script_words,
    weighted_sum,
)
from r1lab.tasks import get_task

REPO = Path(__file__).resolve().parents[1]


def conv(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# --- accuracy -----------------------------------------------------------------------------------------------


def test_accuracy_scores_right_wrong_missing_and_unjudgeable():
    completions = [
        "<think>7+8=15</think> <answer>15</answer>",  # right
        "<think>7+8=16</think> <answer>16</answer>",  # wrong
        "<think>7+8=15, so \\boxed{15}",  # never finished thinking: no answer
        "I don't know",  # no answer
        "<think>x</think> <answer>15</answer>",  # gold cannot be parsed
        "\\boxed{\\frac{1}{2}}",  # R1-style boxed, no tags
    ]
    gold = ["15", "15", "15", "15", "???", "0.5"]
    assert accuracy(completions, answer=gold) == [1.0, 0.0, 0.0, 0.0, None, 1.0]


def test_accuracy_accepts_conversations_and_ignores_unknown_columns():
    out = accuracy(
        [conv("<answer>85</answer>"), conv("<answer>84</answer>")],
        answer=["85", "85"],
        prompts=["What is 47 + 38?"] * 2,
        completion_ids=[[1], [2]],
        something_else=[0, 0],
    )
    assert out == [1.0, 0.0]


def test_accuracy_with_a_task_column_uses_the_task_check():
    # countdown: any valid expression is right, not only the stored one; math-verify alone would reject these
    completions = [
        "<think>...</think><answer>3*(25-5)</answer>",
        "<answer>(25-5)*5</answer>",
        "<answer>(25-5)*3</answer>",
        "<answer>12</answer>",
    ]
    meta = [{"numbers": [3, 5, 25], "target": 60}] * 3 + [None]
    out = accuracy(completions, answer=["(25-5)*3"] * 3 + ["12"], task=["countdown"] * 3 + ["arithmetic"], meta=meta)
    assert out == [1.0, 0.0, 1.0, 1.0]
    # without meta the countdown check reads the numbers and target off the gold expression
    assert accuracy(["<answer>3*(25-5)</answer>"], answer=["(25-5)*3"], task=["countdown"]) == [1.0]


def test_accuracy_on_generated_problems_agrees_with_each_task_check():
    for name in ("arithmetic", "countdown", "linear"):
        problems = get_task(name).problems("train", 20)
        completions = [f"<think>{p.reasoning}</think> <answer>{p.answer}</answer>" for p in problems]
        assert (
            accuracy(
                completions, answer=[p.answer for p in problems], task=[name] * 20, meta=[p.meta for p in problems]
            )
            == [1.0] * 20
        )


def test_accuracy_column_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        accuracy(["a", "b"], answer=["1"])


# --- format -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>7+8=15</think> <answer>15</answer>", 1.0),
        ("\n<think>\nstep\n</think>\n<answer>\n15\n</answer>\n", 1.0),
        ("<think></think><answer>15</answer>", 1.0),  # an empty think block is well-formed (a direct answer)
        ("step\n</think>\n<answer>15</answer>", 1.0),  # prefilled <think>
        ("<think>a</think><think>b</think><answer>15</answer>", 0.0),  # two think blocks
        ("<think>a</think>", 0.0),  # no answer
        ("<think>a</think><answer></answer>", 0.0),  # empty answer
        ("<think>a</think><answer>15</answer> and more", 0.0),  # text after the answer
        ("Sure! <think>a</think><answer>15</answer>", 0.0),  # text before the thinking
        ("<think>a</think> so: <answer>15</answer>", 0.0),  # text between
        ("<think>a <answer>1</answer></think><answer>15</answer>", 0.0),  # answer tags inside the thinking
        ("<answer>15</answer>", 0.0),  # no thinking
        ("<think>never closed <answer>15</answer>", 0.0),
        ("15", 0.0),
    ],
)
def test_format_reward_follows_the_r1_zero_template(text, expected):
    assert format_reward([text]) == [expected]
    assert format_reward([conv(text)]) == [expected]


def reference_format(text: str) -> float:
    """The template check as a lazy regex (what format_reward was): exact, but quadratic on repeated tags."""
    text = text.strip()
    text = text if text.startswith("<think>") else "<think>" + text
    m = re.fullmatch(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", text, re.DOTALL)
    return float(
        m is not None
        and m.group(2).strip() != ""
        and not any(t in m.group(1) + m.group(2) for t in ("<think>", "</think>", "<answer>", "</answer>"))
    )


def test_format_reward_agrees_with_the_template_regex_on_random_replies():
    tags = ["<think>", "</think>", "<answer>", "</answer>", "<think", "answer>"]
    rng = random.Random(0)

    def soup(n):  # mostly text and spaces, sometimes a tag
        return "".join(
            rng.choice(tags) if rng.random() < 0.05 else rng.choice([" ", "\n", "a", "15"])
            for _ in range(rng.randint(0, n))
        )

    def shaped():  # the template's skeleton, each part sometimes dropped
        parts = [soup(1), "<think>", soup(4), "</think>", soup(1), "<answer>", soup(4), "</answer>", soup(1)]
        return "".join(p for p in parts if rng.random() < 0.95)

    texts = [soup(12) for _ in range(3000)] + [shaped() for _ in range(3000)]
    expected = [reference_format(t) for t in texts]
    assert 300 < sum(expected) < len(texts) - 300  # both verdicts well represented
    assert format_reward(texts) == expected


# Replies RL produces at long lengths; the lazy regex took 8 s on 192 KB of a repeated template.
DEGENERATE_REPLIES = [
    "<think>a</think><answer>",
    "<think>",
    "</think>",
    "<answer>",
    "<think></think>\n<answer>x",
    "\\boxed{",
    "{",
]


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


@pytest.mark.parametrize("unit", DEGENERATE_REPLIES)
def test_format_and_accuracy_rewards_are_linear_time_on_degenerate_replies(unit):
    # 16x the text costs under 64x the time (linear: 16x, quadratic: 256x; the 20 ms term absorbs timer noise on a
    # busy machine), and a 1 MB reply is scored in well under a second
    small, large = (unit * (n // len(unit)) for n in (1 << 16, 1 << 20))
    assert (
        min(seconds(format_reward, [large]) for _ in range(5))
        < 64 * min(seconds(format_reward, [small]) for _ in range(5)) + 0.02
    )
    assert seconds(format_reward, [large]) < 1.0
    assert seconds(accuracy, [large, "<think>" + large], ["5", "5"]) < 1.0


def test_format_reward_scores_replies_over_its_cap_zero():
    def reply(chars):
        return "<think>" + "x" * (chars - len("<think></think><answer>5</answer>")) + "</think><answer>5</answer>"

    assert len(reply(FORMAT_MAX_CHARS)) == FORMAT_MAX_CHARS
    assert format_reward([reply(FORMAT_MAX_CHARS), reply(FORMAT_MAX_CHARS + 1)]) == [1.0, 0.0]


# --- overlong -----------------------------------------------------------------------------------------------


def test_overlong_follows_dapo_soft_punishment():
    # DAPO eq. 13 with L_max = 10, L_cache = 4: free up to 6 tokens, linear to -1 at 10, -1 beyond
    reward = overlong(max_len=10, cache_len=4)
    lengths = [0, 6, 7, 8, 9, 10, 11, 50]
    expected = [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert reward(["x"] * len(lengths), completion_ids=[[0] * n for n in lengths]) == expected
    assert reward.__name__ == "overlong"


def test_overlong_errors_without_token_ids_or_with_bad_lengths():
    with pytest.raises(ValueError, match="completion_ids"):
        overlong()(["x"])
    with pytest.raises(ValueError, match="cache_len=20"):
        overlong(max_len=10, cache_len=20)
    with pytest.raises(ValueError, match="has 1 values for 2"):
        overlong()(["a", "b"], completion_ids=[[1]])


# --- language consistency -----------------------------------------------------------------------------------


def test_language_consistency_is_the_share_of_reasoning_words_in_the_target_script():
    completions = [
        "<think>First add the units, then carry.</think><answer>5</answer>",  # 6 English words
        "<think>我们 compute the sum</think><answer>5</answer>",  # 2 Han characters + 3 English words
        "<think>Let x = \\frac{a}{b} and y = 2</think>",  # LaTeX commands and variables are not words
        "<think>7+8=15</think><answer>15</answer>",  # no words: cannot judge
        "Привет world",  # no think block: the whole text
    ]
    assert language_consistency(completions) == [1.0, 3 / 5, 1.0, None, 0.5]
    assert language_consistency(completions[1:2], language="zh") == [2 / 5]
    assert language_consistency(completions[1:2], language=["zh"]) == [2 / 5]


def test_script_words_counts_unspaced_scripts_by_character():
    assert script_words("日本語 text と カナ") == ["CJK", "CJK", "CJK", "LATIN", "HIRAGANA", "KATAKANA", "KATAKANA"]
    assert script_words("x + y = z, café") == ["LATIN"]


def test_language_consistency_rejects_unknown_languages():
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        language_consistency(["hi"], language="klingon")
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        get_reward("language", language="xx")


def test_reasoning_content_of_api_messages_counts_as_thinking():
    message = {"role": "assistant", "reasoning_content": "think in English", "content": "<answer>5</answer>"}
    assert completion_text([message]) == "<think>think in English</think><answer>5</answer>"
    assert format_reward([[message]]) == [1.0]
    with pytest.raises(TypeError, match="list of"):
        completion_text(["not a dict"])


# --- weighted sums ------------------------------------------------------------------------------------------


def test_weighted_sum_adds_weighted_terms_and_skips_none():
    a = lambda completions, **kw: [1.0, None, None, 0.0]
    b = lambda completions, **kw: [0.5, 1.0, None, 1.0]
    total = weighted_sum([a, b], [2.0, 0.5])
    assert total(["w", "x", "y", "z"]) == [2.25, 0.5, None, 0.5]
    assert weighted_sum([a, b])(["w", "x", "y", "z"]) == [1.5, 1.0, None, 1.0]


def test_weighted_sum_of_real_rewards_passes_columns_through():
    total = weighted_sum([accuracy, format_reward, overlong(max_len=8, cache_len=4)], [1.0, 0.1, 1.0])
    out = total(
        ["<think>x</think><answer>3</answer>", "<answer>4</answer>"],
        answer=["3", "3"],
        completion_ids=[[0] * 4, [0] * 6],
    )
    assert out == pytest.approx([1.1, -0.5])
    assert total.__name__ == "1*accuracy+0.1*format_reward+1*overlong"


def test_weighted_sum_errors():
    with pytest.raises(ValueError, match="2 functions but 1 weights"):
        weighted_sum([accuracy, format_reward], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum([])
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        weighted_sum([lambda c, **kw: [1.0]])(["a", "b"])


# --- registry -----------------------------------------------------------------------------------------------


def test_get_reward_by_name_and_with_parameters():
    assert set(list_rewards()) == {"accuracy", "format", "overlong", "language", "code", "code_fraction"}
    assert get_reward("accuracy") is accuracy and get_reward("format") is format_reward
    assert get_reward("overlong", max_len=4, cache_len=2)(["x"], completion_ids=[[0] * 3]) == [-0.5]
    assert get_reward("language", language="zh")(["<think>我们 sum</think>"]) == [2 / 3]
    assert get_reward(accuracy) is accuracy
    with pytest.raises(ValueError, match="unknown reward 'acc'.*accuracy.*file.py:function"):
        get_reward("acc")
    with pytest.raises(TypeError, match="'format' does not take"):
        get_reward("format", weight=2)


def test_get_reward_loads_a_user_function_from_a_file():
    reward = get_reward(f"{REPO / 'examples' / 'my_reward.py'}:concise_correct")
    out = reward(["<answer>5</answer>", "<answer>6</answer>", "<answer>5</answer>"], answer=["5", "5", "???"])
    assert out[0] == pytest.approx(1 - 0.5 * 18 / 400) and out[1] == pytest.approx(-0.5 * 18 / 400)
    assert out[2] is None


def test_get_reward_from_a_relative_path(tmp_path, monkeypatch):
    (tmp_path / "r.py").write_text("def length(completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    assert get_reward("r.py:length")(["abc"]) == [3.0]


def test_get_reward_file_errors_say_what_is_wrong(tmp_path):
    f = tmp_path / "rewards_file.py"
    f.write_text("THRESHOLD = 3\n\ndef mine(completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(FileNotFoundError, match="reward file 'nope/missing.py' not found"):
        get_reward("nope/missing.py:f")
    with pytest.raises(RewardError, match="has no function 'theirs'; it defines mine"):
        get_reward(f"{f}:theirs")
    with pytest.raises(RewardError, match="THRESHOLD is a int, not a function"):
        get_reward(f"{f}:THRESHOLD")
    with pytest.raises(ValueError, match="not a Python function name"):
        get_reward(f"{f}:not-a-name")
    with pytest.raises(TypeError, match="cannot be passed to a reward from a file"):
        get_reward(f"{f}:mine", max_len=3)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('import-time failure')\n")
    with pytest.raises(
        RewardError, match=r"failed to import: RuntimeError: import-time failure \(.*broken.py line 1\)"
    ):
        get_reward(f"{broken}:f")
