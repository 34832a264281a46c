"""A model directory like the one `r1lab pipeline` leaves: the R1-Zero template is its chat template, and the model
writes R1-Zero replies. A tiny DeepSeek-V3 memorises two replies (a question, and a follow-up that sends the first
answer back as history), so tests can chat with it end to end. Tests import the fixture:
`from r1zero_chat import r1zero_chat_dir`.
"""

from __future__ import annotations

import pytest
import torch

QUESTION, FOLLOW_UP = "What is 47 + 38?", "And 85 + 5?"
THINKING = ("7+8=15, write 5 carry 1. 4+3+1=8, so 85", "5+5=10, write 0 carry 1. 8+1=9, so 90")
ANSWERS = ("85", "90")
# what the model learns to write after "Assistant:", in the format r1lab's pretraining corpus uses
REPLIES = tuple(f" <think> {t} </think> <answer> {a} </answer>" for t, a in zip(THINKING, ANSWERS))
CHATS = (
    [{"role": "user", "content": QUESTION}],
    [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": FOLLOW_UP},
    ],
)


def r1zero_tokenizer():
    from r1lab.tokenizer import R1ZERO_PREAMBLE, carry_template, train_tokenizer

    tok = train_tokenizer([R1ZERO_PREAMBLE] * 20 + [QUESTION, FOLLOW_UP, *REPLIES] * 20, vocab_size=400)
    return carry_template(tok, "r1zero")  # as the trainers save it


def train_r1zero_chat_model(path, max_steps: int = 600):
    """Fit a tiny model to the two replies (loss on the reply tokens only) until greedy decoding writes them."""
    from conftest import tiny_model_config

    from r1lab.model.checkpoint import save_model
    from r1lab.model.deepseek import DeepseekV3
    from r1lab.sampler import Sampler, SamplingParams

    tok = r1zero_tokenizer()
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [(encode(p), encode(r + tok.eos_token)) for p, r in zip(prompts, REPLIES)]
    cfg = tiny_model_config(
        len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=1024,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), tok.pad_token_id)
    labels = torch.full((len(pairs), width), -100)
    for i, (p, r) in enumerate(pairs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) - 1 : len(p) + len(r) - 1] = torch.tensor(r)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sampler = Sampler(model, tok)
    for step in range(max_steps):
        loss = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.03 and step % 10 == 0:
            model.eval()
            outs = sampler.generate(prompts, SamplingParams(max_new_tokens=64, temperature=0))
            model.train()
            if [o.text for o in outs] == list(REPLIES) and all(o.finish_reason == "stop" for o in outs):
                model.eval()
                return save_model(model, path, tokenizer=tok)
    pytest.fail(f"the tiny model did not learn the R1-Zero replies in {max_steps} steps (loss {loss.item():.3f})")


@pytest.fixture(scope="session")
def r1zero_chat_dir(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_r1zero_chat_model(tmp_path_factory.mktemp("r1zero-chat") / "model")
    finally:
        torch.set_num_threads(before)
