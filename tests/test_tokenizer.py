"""Trained tokenizers: special tokens, single-token tags, digits, and templates that transformers renders the same."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from r1lab.tokenizer import ASSISTANT, BOS, EOS, R1ZERO_PREAMBLE, TAGS, USER, render_prompt, train_tokenizer


def test_trained_tokenizer_has_r1_tokens_and_splits_digits(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.bos_token == BOS and tok.eos_token == EOS and tok.pad_token is not None
    for tag in TAGS:
        assert len(tok(tag, add_special_tokens=False).input_ids) == 1, tag
    ids = tok("12345", add_special_tokens=False).input_ids
    assert [tok.decode([i]) for i in ids] == list("12345")
    text = "<think> 47 + 38 </think> <answer> 85 </answer>"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_vocab_size_is_respected_and_validated():
    tok = train_tokenizer(["abc def " * 50] * 20, vocab_size=300)
    assert len(tok) <= 300
    with pytest.raises(ValueError, match="vocab_size must be >="):
        train_tokenizer(["x"], vocab_size=100)


def test_saved_tokenizer_renders_the_same_prompts_in_transformers(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    for name in ("r1", "r1zero"):
        assert render_prompt(loaded, "What is 2 + 2?", name) == render_prompt(tiny_tokenizer, "What is 2 + 2?", name)
    # the default template of the saved tokenizer is the R1 chat format
    assert loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render_prompt(
        tiny_tokenizer, "What is 2 + 2?", "r1"
    )
    assert loaded.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, chat_template="r1zero"
    ) == render_prompt(tiny_tokenizer, "What is 2 + 2?", "r1zero")


def test_r1_template_opens_the_thinking_and_drops_past_reasoning(tiny_tokenizer):
    p = render_prompt(tiny_tokenizer, "hi", "r1", system="Be brief.")
    assert p == f"{BOS}Be brief.{USER}hi{ASSISTANT}<think>\n"
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nsecret\n</think>\n\nA"},
        {"role": "user", "content": "b"},
    ]
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "secret" not in text and f"{ASSISTANT}A{EOS}{USER}b{ASSISTANT}<think>\n" in text


def test_r1zero_template_is_the_papers_table_1(tiny_tokenizer):
    p = render_prompt(tiny_tokenizer, "What is 2 + 2?", "r1zero")
    assert p == f"{BOS}{R1ZERO_PREAMBLE} User: What is 2 + 2?. Assistant:"
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in R1ZERO_PREAMBLE


def test_unknown_template_is_an_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown template"):
        render_prompt(tiny_tokenizer, "x", "chatml")
