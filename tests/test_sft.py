"""SFT: packed samples stay apart, the loss falls on replies only, bad data is named by file and line, the held-out
loss is logged, gradient accumulation equals a bigger batch, and an interrupted run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from r1lab.cli import main
from r1lab.model.load import load_model_and_tokenizer
from r1lab.train import sft as S
from r1lab.train.packing import pack
from r1lab.train.run import read_metrics

transformers.logging.set_verbosity_error()

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny transformers Llama with the test tokenizer (its chat template is R1's)."""
    cfg = transformers.LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama") / "model"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _chats(n=24):
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} + {a + 3}?"},
                {"role": "assistant", "content": f"<think>\n{a} plus {a + 3}\n</think>\n\n{2 * a + 3}"},
            ]
        }
        for a in range(n)
    ]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(tmp_path, model_dir, **kw):
    base = dict(
        out=str(tmp_path / "run"),
        model=str(model_dir),
        data=_write(tmp_path / "data.jsonl", _chats()),
        epochs=2,
        seq_len=64,
        rows=2,
        lr=1e-2,
        warmup=1,
        eval_fraction=0.2,
        save_every=3,
        bf16=False,
        device="cpu",
    )
    base.update(kw)
    return S.SFTConfig(**base)


# ----------------------------------------------------------------------------- packing


def _separate_losses(model, ids, mask):
    """Per-token CE of one sample forwarded alone (reference: a plain forward, shifted by hand)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    ce = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    return ce * torch.tensor(mask[1:], dtype=ce.dtype)


@pytest.mark.parametrize("which", ["native", "llama"])
def test_packed_samples_cannot_attend_to_each_other(which, tiny_native_dir, llama_dir):
    model, _ = load_model_and_tokenizer(tiny_native_dir if which == "native" else llama_dir)
    g = torch.Generator().manual_seed(1)
    samples = []
    for n in (9, 5, 14):
        ids = torch.randint(5, 250, (n,), generator=g).tolist()
        samples.append((ids, [0] * 3 + [1] * (n - 3)))
    packed = pack(samples, seq_len=40)
    assert packed.input_ids.shape[0] == 1  # all three share one row
    with torch.no_grad():
        got = S.token_losses(model, packed)
    for i, [(r, at)] in enumerate(packed.places):  # where sample i landed
        ids, mask = samples[i]
        ref = _separate_losses(model, ids, mask)
        assert torch.allclose(got[r, at + 1 : at + len(ids)], ref, atol=1e-5), i
    assert int((got != 0).sum()) == sum(sum(m) for _, m in samples)


def test_a_row_that_let_samples_see_each_other_would_change_the_loss(tiny_native_dir):
    """The check above can fail: attending across samples changes the later sample's losses."""
    model, _ = load_model_and_tokenizer(tiny_native_dir)
    a, b = list(range(10, 20)), list(range(30, 38))
    packed = pack([(a, [1] * 10), (b, [1] * 8)], seq_len=18)
    real = packed.group >= 0
    packed.group[real], packed.segment[real] = 0, 1  # one group, one segment: b sees a
    with torch.no_grad():
        leaky = S.token_losses(model, packed)[0, 11:18]
    assert not torch.allclose(leaky, _separate_losses(model, b, [1] * 8), atol=1e-3)


# ----------------------------------------------------------------------------- label masks


def _learned(tok, sample):
    ids, mask = sample
    return tok.decode([t for t, m in zip(ids, mask) if m]), tok.decode([t for t, m in zip(ids, mask) if not m])


def test_loss_is_on_the_reply_only_and_the_prefilled_think_tag_is_not_repeated(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\n2 plus 3\n</think>\n\n5"},
    ]
    (sample,) = S.chat_samples(tok, msgs, "r1")
    learned, given = _learned(tok, sample)
    assert given == "<｜begin▁of▁sentence｜><｜User｜>What is 2 + 3?<｜Assistant｜><think>\n"
    assert learned == "2 plus 3\n</think>\n\n5<｜end▁of▁sentence｜>"
    ids, mask = sample
    assert mask == sorted(mask)  # one prompt span, then one reply span
    # the prompt tokens are exactly what the sampler encodes at inference time
    from r1lab.tokenizer import render_prompt

    prompt_ids = tok(render_prompt(tok, "What is 2 + 3?", "r1"), add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and mask.index(1) == len(prompt_ids)


def test_every_assistant_turn_is_learned_and_only_those(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    tok.chat_template, saved = CHATML, tok.chat_template
    try:
        samples = S.chat_samples(tok, msgs, "model")
    finally:
        tok.chat_template = saved
    assert len(samples) == 1  # ChatML renders history as it was generated: one sample holds both turns
    ids, mask = samples[0]
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    spans.append(tok.decode(cur)) if cur else None
    assert spans == ["hello<｜end▁of▁sentence｜>", "4<｜end▁of▁sentence｜>"]
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<｜end▁of▁sentence｜>\n<|im_start|>user\nhi")
    # R1's template drops past thinking from the history, so each turn becomes a sample after its own prompt
    r1 = [dict(m) for m in msgs]
    r1[2]["content"] = "<think>\ngreet\n</think>\n\nhello"
    samples = S.chat_samples(tok, r1, "r1")
    assert [_learned(tok, s)[0] for s in samples] == [
        "greet\n</think>\n\nhello<｜end▁of▁sentence｜>",
        "4<｜end▁of▁sentence｜>",
    ]
    assert "greet" not in _learned(tok, samples[1])[1]


def test_prompt_completion_pairs_are_used_as_written(tiny_tokenizer):
    tok = tiny_tokenizer
    (sample,) = S.tokenize_example(tok, {"prompt": "What is 2 + 3?", "completion": " 5"}, "model")
    assert _learned(tok, sample) == (" 5<｜end▁of▁sentence｜>", "What is 2 + 3?")
    conv = {
        "prompt": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "2+2?"},
        ],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    samples = S.tokenize_example(tok, conv, "r1")
    assert [_learned(tok, s)[0] for s in samples] == ["4<｜end▁of▁sentence｜>"]  # prompt turns are not learned


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "hello"}', "needs 'messages'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "no user turn before it"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', r"messages\[0\] must be"),
        ('{"prompt": "a", "completion": 3}', "both be strings"),
        ('{"prompt": "a", "completion": ""}', "empty completion"),
    ],
)
def test_bad_jsonl_lines_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_chats(1)[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        S.read_examples(path)


def test_held_out_split_is_seeded_and_disjoint():
    tr, ev = S.held_out_split(100, 0.1, seed=3)
    assert len(ev) == 10 and not set(tr) & set(ev) and sorted(tr + ev) == list(range(100))
    assert S.held_out_split(100, 0.1, seed=3) == (tr, ev) and S.held_out_split(100, 0.1, seed=4)[1] != ev
    assert S.held_out_split(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    assert len(S.held_out_split(5, 0.01, seed=0)[1]) == 1


# ----------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_logs_the_held_out_loss(tmp_path, llama_dir):
    cfg = _cfg(tmp_path, llama_dir, epochs=4, eval_every=4)
    model, tok, run = S.sft(cfg, progress=False)
    rows = read_metrics(run.metrics_path)
    head = rows[0]
    assert head["step"] == 0 and head["examples"] == 19 and head["held_out_examples"] == 5
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == head["steps"] and losses[-1] < 0.5 * losses[0]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert [s for s, _ in evals] == list(range(4, head["steps"], 4)) + [head["steps"]]
    assert evals[-1][1] < evals[0][1]
    assert {"tokens_per_s", "flops_per_s", "mfu"} <= set(rows[1])
    assert run.done() and (run.dir / "config.yaml").is_file()
    # the written model is the trained one
    back, _ = load_model_and_tokenizer(run.model_dir)
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_gradient_accumulation_equals_one_bigger_batch(tmp_path, llama_dir):
    kw = dict(epochs=1, eval_fraction=0.0, save_every=100, lr=1e-3, warmup=0)
    a, _, _ = S.sft(_cfg(tmp_path / "a", llama_dir, rows=4, grad_accum=1, **kw), progress=False)
    b, _, _ = S.sft(_cfg(tmp_path / "b", llama_dir, rows=2, grad_accum=2, **kw), progress=False)
    c, _, _ = S.sft(_cfg(tmp_path / "c", llama_dir, rows=2, grad_accum=1, **kw), progress=False)
    moved = False
    for (k, x), (_, y), (_, z) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), k
        moved |= not torch.allclose(x, z, atol=1e-6)
    assert moved  # and a different batch size does give different weights


@pytest.mark.parametrize("which", ["native", "llama-lora"])
def test_interrupted_run_resumes_exactly(which, tmp_path, tiny_native_dir, llama_dir, monkeypatch):
    if which == "native":
        kw = dict(model=str(tiny_native_dir))
    else:
        kw = dict(model=str(llama_dir), hf=S.HFOptions(lora_rank=4, lora_alpha=8, lora_dropout=0.1))
    ref, _, _ = S.sft(_cfg(tmp_path / "a", llama_dir, **kw), progress=False)

    real = S.select_rows
    calls = {"n": 0}

    def crash_in_step_5(packed, rows):
        calls["n"] += 1
        if calls["n"] == 5 * 1 + 1:  # one micro-batch per step: the 6th call is step 5 (0-based)
            raise KeyboardInterrupt
        return real(packed, rows)

    monkeypatch.setattr(S, "select_rows", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        S.sft(_cfg(tmp_path / "b", llama_dir, **kw), progress=False)
    monkeypatch.setattr(S, "select_rows", real)
    resumed, _, run = S.sft(_cfg(tmp_path / "b", llama_dir, **kw), progress=False)  # from the step-3 checkpoint
    assert which == "native" or (run.dir / "checkpoint" / "adapter_config.json").is_file()
    sa, sb = ref.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys() and not any("lora" in k for k in sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    steps = [r["step"] for r in read_metrics(run.metrics_path) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # rows after the checkpoint were dropped and logged again


def test_settings_and_data_are_checked_before_training(tmp_path, llama_dir, tiny_native_dir):
    with pytest.raises(ValueError, match="--model is required"):
        S.sft(_cfg(tmp_path, llama_dir, model=""), progress=False)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        S.sft(_cfg(tmp_path, llama_dir, data=str(tmp_path / "nope.jsonl")), progress=False)
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        S.sft(_cfg(tmp_path, llama_dir, template="chatml"), progress=False)
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        S.sft(_cfg(tmp_path, llama_dir, hf=S.HFOptions(lora_rank=-1)), progress=False)
    with pytest.raises(ValueError, match="no training sample .* fits seq_len=8"):
        S.sft(_cfg(tmp_path, llama_dir, seq_len=8), progress=False)
    with pytest.raises(ValueError, match="LoRA and gradient checkpointing apply to transformers models"):
        S.sft(_cfg(tmp_path, tiny_native_dir, hf=S.HFOptions(lora_rank=2)), progress=False)


def test_sft_subcommand_trains_and_reports(tmp_path, llama_dir, capsys):
    data = _write(tmp_path / "d.jsonl", _chats(8))
    code = main(
        [
            "sft",
            "--model",
            str(llama_dir),
            "--data",
            data,
            "--out",
            str(tmp_path / "cli"),
            "--epochs",
            "1",
            "--seq-len",
            "64",
            "--bf16",
            "false",
            "--device",
            "cpu",
            "--eval-fraction",
            "0.25",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and str(tmp_path / "cli" / "model") in out
    assert main(["sft", "--model", str(llama_dir), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
