"""Distillation: rejection reasons counted on hand-built teacher outputs, the written JSONL learned by SFT as R1
replies, and a tiny teacher -> filter -> student run end to end (through the CLI), reused when run again."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import save_hf

from r1lab import distill as D
from r1lab.cli import main
from r1lab.sampler import Completion
from r1lab.tasks import Problem, get_task
from r1lab.train import sft as S
from r1lab.train.run import read_metrics

transformers.logging.set_verbosity_error()


def _c(text, n_tokens=10, finish="stop"):
    return Completion(0, text, list(range(n_tokens)), [0.0] * n_tokens, finish)


SUM = Problem("2+3", "arithmetic", "What is 2 + 3?", "5")
DIFF = Problem("9-4", "arithmetic", "What is 9 - 4?", "5")
BAD_GOLD = Problem("q", "gsm8k", "How many?", "five apples?")


def test_each_rejected_sample_is_counted_under_the_first_test_it_fails():
    B5 = "\\boxed{5}"
    samples = [
        [
            _c(f"2 plus 3 is 5\n</think>\n\n{B5}"),  # kept (the prompt prefilled <think>)
            _c(f"<think>2 plus 3 is 5</think>{B5}"),  # duplicate: the same reply once normalised
            _c(f"2 plus 3 is 5\n</think>\n\n{B5}", finish="length"),  # truncated at max_new_tokens
            _c(B5),  # malformed: no think block
            _c(f"<think>\n2 plus 3 is {B5}"),  # malformed: the thinking never closes
            _c(f"a\n</think>\n\n{B5} </think>"),  # malformed: two closing tags
            _c("add them\n</think>\n\n"),  # malformed: no answer
            _c("2 plus 3 is 6\n</think>\n\n\\boxed{6}"),  # incorrect
            _c("5 without a box\n</think>\n\n5"),  # incorrect: no answer the verifier can read
            _c(f"二加三等于五\n</think>\n\n{B5}"),  # language: Chinese reasoning, English asked for
            _c(f"two plus three is five\n</think>\n\n{B5}", n_tokens=50),
        ],  # too long
        [
            _c("<think> 9 minus 4 </think> <answer> 5 </answer>"),  # kept: R1-Zero's answer tags stay
            _c(f"9-4=5\n</think>\n\n{B5}"),  # kept (no words: language cannot judge)
            _c(f"nine minus four\n</think>\n\n{B5}"),
        ],  # over the per-problem limit
        [_c(f"count\n</think>\n\n{B5}")],  # unjudged: the gold answer does not parse
    ]
    kept, counts = D.filter_samples(
        samples, [SUM, DIFF, BAD_GOLD], language="en", language_threshold=0.9, max_length=40, max_per_problem=2
    )
    assert counts == {
        "problems": 3,
        "candidates": 15,
        "kept": 3,
        "problems_with_kept": 2,
        "rejected": {
            "truncated": 1,
            "malformed": 4,
            "incorrect": 2,
            "unjudged": 1,
            "language": 1,
            "too_long": 1,
            "duplicate": 1,
            "over_limit": 1,
        },
    }
    assert [r["messages"][1]["content"] for r in kept] == [
        f"<think>\n2 plus 3 is 5\n</think>\n\n{B5}",
        "<think>\n9 minus 4\n</think>\n\n<answer> 5 </answer>",
        f"<think>\n9-4=5\n</think>\n\n{B5}",
    ]
    assert kept[0]["messages"][0] == {"role": "user", "content": "What is 2 + 3?"}
    assert (kept[0]["id"], kept[0]["task"]) == ("2+3", "arithmetic")


def test_without_a_cap_or_limit_every_correct_readable_sample_is_kept():
    samples = [[_c("2 plus 3 is 5\n</think>\n\n\\boxed{5}", n_tokens=500), _c("add: 5\n</think>\n\n\\boxed{5}")]]
    kept, counts = D.filter_samples(samples, [SUM])
    assert counts["kept"] == 2 and sum(counts["rejected"].values()) == 0
    with pytest.raises(ValueError, match="2 groups of samples for 1 problems"):
        D.filter_samples(samples * 2, [SUM])


@pytest.mark.parametrize(
    "text, ok",
    [
        ("r\n</think>\n\nA", True),
        ("<think>r</think>A", True),
        ("  <think>\nr\n</think> A", True),
        ("<think></think>A", True),  # an empty think block is still the format
        ("A", False),
        ("<think>r", False),
        ("r</think>", False),
        ("x <think>r</think>A", False),
        ("</think>r<think>A", False),
        ("<think>a<think>b</think>A", False),
    ],
)
def test_well_formed_means_one_closed_think_block_then_an_answer(text, ok):
    assert D.well_formed(text) is ok


def test_the_written_jsonl_round_trips_into_sft(tmp_path, tiny_tokenizer):
    samples = [[_c("2 plus 3 is 5\n</think>\n\n\\boxed{5}")], [_c("<think> 9 minus 4 </think> <answer> 5 </answer>")]]
    kept, counts = D.filter_samples(samples, [SUM, DIFF])
    data, stats = D.write_dataset(kept, counts, tmp_path)
    assert json.loads(stats.read_text()) == counts
    examples = S.read_examples(data)
    assert examples == kept
    tok = tiny_tokenizer
    for ex, reply in zip(
        examples, ["2 plus 3 is 5\n</think>\n\n\\boxed{5}", "9 minus 4\n</think>\n\n<answer> 5 </answer>"]
    ):
        (sample,) = S.tokenize_example(tok, ex, "r1")
        ids, mask = sample
        learned = tok.decode([t for t, m in zip(ids, mask) if m])
        assert learned == reply + "<｜end▁of▁sentence｜>"  # after R1's prefilled "<think>\n"


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    """The conftest's tiny native MoE, taught R1's reply format on one-digit arithmetic by a short SFT: it writes
    well-formed replies and gets some of them right (about 1 in 10), so every filter has work to do."""
    from conftest import tiny_model_config

    from r1lab.model.checkpoint import save_model
    from r1lab.model.deepseek import DeepseekV3

    tok, root = tiny_tokenizer, tmp_path_factory.mktemp("teacher")
    cfg = tiny_model_config(
        len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    save_model(DeepseekV3(cfg), root / "base", tokenizer=tok)
    rows = [
        {
            "messages": [
                {"role": "user", "content": p.prompt},
                {"role": "assistant", "content": f"<think>\n{p.reasoning}\n</think>\n\n\\boxed{{{p.answer}}}"},
            ]
        }
        for p in get_task("arithmetic", max_digits=1).problems("train", n=300, seed=1)
    ]
    _, _, run = S.sft(
        S.SFTConfig(
            out=str(root / "sft"),
            model=str(root / "base"),
            data=_write(root / "t.jsonl", rows),
            template="r1",
            epochs=3,
            seq_len=256,
            rows=2,
            lr=1e-2,
            warmup=5,
            eval_fraction=0,
            bf16=False,
            device="cpu",
        ),
        progress=False,
    )
    return run.model_dir


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_tokenizer):
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
    )
    torch.manual_seed(0)
    return save_hf(transformers.LlamaForCausalLM(cfg), tiny_tokenizer, tmp_path_factory, "student")


def test_a_tiny_teacher_is_distilled_into_a_student_end_to_end(tmp_path, teacher_dir, student_dir, capsys, monkeypatch):
    out = tmp_path / "distill"
    args = [
        "distill",
        "--teacher",
        str(teacher_dir),
        "--student",
        str(student_dir),
        "--out",
        str(out),
        "--tasks",
        "arithmetic",
        "--task-args",
        '{"arithmetic": {"max_digits": 1}}',
        "--problems",
        "16",
        "--k",
        "8",
        "--max-new-tokens",
        "64",
        "--sft.epochs",
        "1",
        "--sft.seq-len",
        "128",
        "--sft.bf16",
        "false",
        "--sft.device",
        "cpu",
        "--sft.eval-fraction",
        "0",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    counts = json.loads((out / "data_stats.json").read_text())
    assert counts["candidates"] == 128 and counts["kept"] > 0 and counts["rejected"]["incorrect"] > 0
    assert counts["kept"] + sum(counts["rejected"].values()) == counts["candidates"]
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == counts["kept"]
    problems = {p.id: p for p in get_task("arithmetic", max_digits=1).problems("train", n=16, seed=0)}
    for r in rows:  # every kept reply is well-formed and right, checked here without the filter's code
        user, reply = r["messages"]
        assert user["content"] == problems[r["id"]].prompt
        assert reply["content"].startswith("<think>\n") and reply["content"].count("</think>") == 1
        assert reply["content"].endswith(f"\\boxed{{{problems[r['id']].answer}}}")
    assert f"kept {counts['kept']} of 128" in printed
    metrics = read_metrics(out / "sft" / "metrics.jsonl")
    assert metrics[0]["train_samples"] == counts["kept"] and any("loss" in r for r in metrics)
    assert (out / "sft" / "model" / "model.safetensors").is_file()

    # run again: the dataset is reused (no teacher) and the finished student is returned
    monkeypatch.setattr(D, "sample_teacher", lambda *a, **k: pytest.fail("sampled the teacher again"))
    cfg = D.DistillConfig(
        teacher=str(teacher_dir),
        student=str(student_dir),
        out=str(out),
        problems=16,
        k=8,
        max_new_tokens=64,
        task_args={"arithmetic": {"max_digits": 1}},
    )
    model, tok, run, again = D.distill(cfg, progress=False)
    assert again == counts and run.done()
    with pytest.raises(ValueError, match="sampled with other settings .*k, temperature"):
        D.distill(D.DistillConfig(**{**vars(cfg), "k": 4, "temperature": 1.0}), progress=False)


def test_distill_settings_are_checked_first(tmp_path):
    ok = dict(teacher="t", student="s", out=str(tmp_path))
    for kw, message in [
        (dict(teacher=""), r"--teacher \(or --teacher-url\) and --student are required"),
        (dict(language="xx"), "unknown language 'xx'"),
        (dict(teacher_template="chatml"), "unknown teacher_template 'chatml'"),
        (dict(k=0), "k must be >= 1"),
        (dict(tasks=["chess"]), "unknown task 'chess'"),
        (dict(sft=S.SFTConfig(template="chatml")), "unknown template 'chatml'"),
    ]:
        with pytest.raises(ValueError, match=message):
            D.distill(D.DistillConfig(**{**ok, **kw}), progress=False)
