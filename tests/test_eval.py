"""The R1 evaluation protocol: pass@k against brute force, voting, skipping, and the local path end to end."""

from __future__ import annotations

import itertools
import json

import pytest

from r1lab.eval import EvalConfig, evaluate, local_generator, majority_answer, pass_at_k, to_sample
from r1lab.tasks import Problem, get_task


@pytest.mark.parametrize("n, c, k", [(n, c, k) for n in (1, 4, 7) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_equals_brute_force_over_all_subsets(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert abs(pass_at_k(n, c, k) - brute) < 1e-12


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_majority_vote_normalises_and_breaks_ties_by_first_seen():
    assert majority_answer(["12", " 12 ", "7", "7", None]) in ("12", " 12 ")
    assert majority_answer(["7", "12", "12", "7"]) == "7"
    assert majority_answer([None, ""]) is None


def _fake(replies: dict[str, list[str]]):
    """A generator that replays fixed texts: tests the scoring, not a model."""

    def generate(prompts, n, temperature, top_p, seed, max_new_tokens=256):
        if temperature == 0:
            return [[to_sample(replies[p][0], 3)] for p in prompts]
        return [[to_sample(t, 5) for t in replies[p][:n]] for p in prompts]

    return generate


def test_summary_on_a_hand_worked_example():
    probs = [Problem("a", "arithmetic", "What is 1 + 1?", "2"), Problem("b", "arithmetic", "What is 2 + 2?", "4")]
    replies = {
        "What is 1 + 1?": [
            "<think> 1+1=2 </think> <answer> 2 </answer>",
            "<answer> 3 </answer>",
            "<think> x </think> <answer> 2 </answer>",
            "<think> </think> <answer> 5 </answer>",
        ],
        "What is 2 + 2?": ["<answer> 5 </answer>", "<answer> 4 </answer>", "<answer> 5 </answer>", "no answer"],
    }
    res = evaluate(_fake(replies), probs, EvalConfig(task="arithmetic", k=4))
    s = res["summary"]
    assert s["n"] == 2 and s["skipped"] == 0
    assert s["greedy"] == 0.5  # first reply of each: right, wrong
    assert s["pass@1"] == (2 / 4 + 1 / 4) / 2
    assert s["cons@k"] == 0.5  # votes: 2 (right), 5 (wrong)
    assert s["pass@k"]["4"] == 1.0
    assert s["think_share"] == 2 / 8  # "1+1=2" and "x"; empty think blocks do not count
    rec = res["records"][1]
    assert rec["vote"] == "5" and rec["samples"][3]["answer"] is None and rec["samples"][3]["correct"] is False
    json.dumps(res)  # the report is JSON-ready


def test_unjudgeable_gold_is_skipped_and_counted():
    probs = [Problem("a", "gsm8k", "q", "\\frac{"), Problem("b", "gsm8k", "r", "4")]  # the first gold does not parse
    replies = {
        "q\nPlease reason step by step, and put your final answer within \\boxed{}.": ["\\boxed{3}"] * 2,
        "r\nPlease reason step by step, and put your final answer within \\boxed{}.": ["\\boxed{4}"] * 2,
    }
    s = evaluate(_fake(replies), probs, EvalConfig(task="gsm8k", k=2))["summary"]
    assert s["skipped"] == 1 and s["n"] == 1 and s["pass@1"] == 1.0


def test_local_model_end_to_end(tiny_native_dir):
    from r1lab.model.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_native_dir)
    probs = get_task("arithmetic").problems("test", n=3, seed=0)
    res = evaluate(local_generator(model, tok, "r1"), probs, EvalConfig(k=2, max_new_tokens=8))
    assert res["summary"]["n"] + res["summary"]["skipped"] == 3
    assert all(len(r["samples"]) == 2 for r in res["records"] if not r["skipped"])


def test_bad_k_is_named():
    with pytest.raises(ValueError, match="--k must be >= 1"):
        EvalConfig(k=0).validate()
