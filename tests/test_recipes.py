"""The r1 and distill recipes end to end on tiny settings: stage directories, an eval per stage, summary keys and the
three-arm comparison (SFT distillation, on-policy distillation, GRPO) at about equal wall time; a bad recipe name is
named."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from tiny import TINY_MODEL

import r1lab.distill as D
from r1lab.cli import main
from r1lab.recipes import RECIPES

STUDENT = dict(
    num_hidden_layers=1,
    hidden_size=24,
    intermediate_size=48,
    num_attention_heads=2,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
)


def _argv(out, recipe):
    return [
        "pipeline",
        "--recipe",
        recipe,
        "--out",
        str(out),
        "--task-args",
        '{"min_digits": 1, "max_digits": 1}',
        "--pretrain.steps",
        "4",
        "--pretrain.rows",
        "2",
        "--pretrain.seq-len",
        "128",
        "--pretrain.eval-problems",
        "4",
        "--pretrain.model",
        json.dumps(TINY_MODEL),
        "--pretrain.vocab-size",
        "400",
        "--pretrain.bf16",
        "false",
        "--grpo.steps",
        "2",
        "--grpo.prompts-per-step",
        "4",
        "--grpo.num-generations",
        "4",
        "--grpo.max-new-tokens",
        "24",
        "--grpo.bf16",
        "false",
        "--eval.limit",
        "8",
        "--eval.k",
        "2",
        "--eval.max-new-tokens",
        "24",
        "--r1.cold-start-problems",
        "16",
        "--r1.rl-steps",
        "2",
        "--r1.rejection-problems",
        "16",
        "--r1.final-rl-steps",
        "2",
        "--r1.sft-epochs",
        "1",
        "--r1.sft-rows",
        "4",
        "--distill.student",
        json.dumps(STUDENT),
        "--distill.pretrain-steps",
        "4",
        "--distill.problems",
        "16",
        "--distill.sft-epochs",
        "1",
        "--distill.sft-rows",
        "4",
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One r1zero run that both recipes build on."""
    out = tmp_path_factory.mktemp("recipes") / "run"
    assert main(_argv(out, "r1zero")) == 0
    return out


@pytest.fixture()
def worked_teacher(monkeypatch):
    """The real teacher's samples plus, per problem, one worked solution and one wrong answer: a tiny model that
    passes the filters by itself would need minutes of pretraining, and the stages need data to go on."""
    real = D.sample_teacher

    def sample_teacher(cfg, problems, progress=True):
        groups = real(cfg, problems, progress)
        for g, p in zip(groups, problems):
            for answer in (p.answer, str(int(p.answer) + 1)):
                text = f" <think> {p.reasoning} </think> <answer> {answer} </answer>"
                g.append(SimpleNamespace(text=text, token_ids=[0] * len(text.split()), finish_reason="stop"))
        return groups

    monkeypatch.setattr(D, "sample_teacher", sample_teacher)


def _headline_ok(h):
    assert 0 <= h["pass@1"] <= 1 and 0 <= h["greedy"] <= 1 and 0 <= h["think_share"] <= 1, h


def test_r1_recipe_runs_four_evaluated_stages_and_reports(run_dir, worked_teacher, capsys):
    assert main(_argv(run_dir, "r1")) == 0
    out = capsys.readouterr().out
    assert "[4/4]" in out and "The R1 recipe in miniature" in out
    r1 = run_dir / "r1"
    summary = json.loads((r1 / "summary.json").read_text())
    assert list(summary["stages"]) == ["base", "r1zero", "cold_start", "reasoning_rl", "rejection_sft", "final_rl"]
    for h in summary["stages"].values():
        _headline_ok(h)
    for stage, model in [
        ("cold_start", "cold_start/sft/model"),
        ("reasoning_rl", "reasoning_rl/model"),
        ("rejection_sft", "rejection_sft/sft/model"),
        ("final_rl", "final_rl/model"),
    ]:
        assert (r1 / model / "config.json").is_file(), stage
        ev = json.loads((r1 / f"eval_{stage}.json").read_text())
        assert ev["summary"]["pass@1"] == summary["stages"][stage]["pass@1"] and ev["summary"]["n"] == 8
    base = json.loads((run_dir / "eval_base.json").read_text())["summary"]
    assert summary["stages"]["base"]["pass@1"] == base["pass@1"]  # the same held-out eval as r1zero
    for name in ("cold_start", "rejection_sft"):
        d = summary["data"][name]
        rows = (r1 / name / "data.jsonl").read_text().splitlines()
        assert d["kept"] == len(rows) >= 1 and d["kept"] <= d["passed"] <= d["candidates"]
        reply = json.loads(rows[0])["messages"][-1]["content"]
        assert reply.startswith(" <think> ") and "</think> <answer>" in reply  # the r1zero format
    cold = [json.loads(r)["messages"][-1]["content"] for r in (r1 / "cold_start/data.jsonl").read_text().splitlines()]
    assert all(not c.startswith(" <think> </think>") for c in cold)  # cold-start replies all reason
    g = json.loads((r1 / "reasoning_rl" / "metrics.jsonl").read_text().splitlines()[0])
    assert "reward/language/mean" in g  # the language-consistency reward of stage 2
    for f in ("report.md", "report.html", "plots/stages.png", "config.yaml", "timings.json"):
        assert (r1 / f).exists(), f
    assert "data:image/png;base64," in (r1 / "report.html").read_text()

    mtime = (r1 / "final_rl" / "model" / "model.safetensors").stat().st_mtime
    assert main(_argv(run_dir, "r1")) == 0  # resumes: every stage found finished
    assert (r1 / "final_rl" / "model" / "model.safetensors").stat().st_mtime == mtime
    assert json.loads((r1 / "summary.json").read_text())["stages"] == summary["stages"]


def test_distill_recipe_compares_three_arms_at_equal_time(run_dir, worked_teacher, capsys):
    assert main(_argv(run_dir, "distill")) == 0
    out = capsys.readouterr().out
    assert "Distillation vs RL" in out and "SFT distillation minus GRPO" in out
    assert "on-policy distillation minus GRPO" in out and "SFT distillation minus on-policy distillation" in out
    d = run_dir / "distill"
    summary = json.loads((d / "summary.json").read_text())
    assert list(summary["stages"]) == ["teacher", "student_base", "distilled", "onpolicy", "student_rl"]
    for h in summary["stages"].values():
        _headline_ok(h)
    student = json.loads((d / "student_pretrain" / "model" / "config.json").read_text())
    assert student["first_k_dense_replace"] == student["num_hidden_layers"] == 1  # dense
    assert student["hidden_size"] == 24
    assert summary["student"]["params_total"] < summary["teacher"]["params_active"]  # smaller than the teacher
    for model in ("distilled/sft/model", "onpolicy/model", "student_rl/model"):
        assert (d / model / "config.json").is_file(), model
    pairs = [(c["first"], c["second"]) for c in summary["comparisons"]]
    assert pairs == [("distilled", "student_rl"), ("onpolicy", "student_rl"), ("distilled", "onpolicy")]
    for c in summary["comparisons"]:
        assert c["first_pass@1"] == summary["stages"][c["first"]]["pass@1"]
        assert c["second_pass@1"] == summary["stages"][c["second"]]["pass@1"]
        assert c["winner"] in ("first", "second", "neither") and c["problems"] == 8
        assert abs(c["difference"] - (c["first_pass@1"] - c["second_pass@1"])) < 1e-9
    arms = summary["arms"]
    assert arms["distilled"]["samples"] >= 1
    onpolicy = [json.loads(r) for r in (d / "onpolicy" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward_mean"] is None and r["teacher_reverse_kl"] is not None for r in onpolicy)  # no reward
    budget = arms["distilled"]["wall_seconds"]
    for arm in ("onpolicy", "student_rl"):  # each ran until the SFT arm's wall time was spent, and no further
        a = arms[arm]
        assert a["steps"] >= 1 and (a["train_seconds"] >= budget - 0.2 or a["steps"] == 1000), a
        rows = [json.loads(r) for r in (d / arm / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == a["steps"] and all(r["total_seconds"] < budget for r in rows[:-1]), (arm, rows, budget)
    for f in (
        "report.md",
        "report.html",
        "plots/stages.png",
        "plots/student_rl/reward_mean.png",
        "plots/onpolicy/teacher_reverse_kl.png",
    ):
        assert (d / f).exists(), f
    assert "The arms compared on the same problems" in (d / "report.md").read_text()


def test_a_bad_recipe_name_is_named_with_the_choices(tmp_path, capsys):
    assert RECIPES == ("r1zero", "r1", "distill")
    assert main(["pipeline", "--recipe", "r2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "recipe must be one of r1zero, r1, distill (got 'r2')" in err
    assert not (tmp_path / "x").exists()  # refused before any stage ran


# ----------------------------------------------------------------------------- the pieces


def test_kept_replies_are_written_exactly_as_the_base_model_was_pretrained():
    from r1lab.distill import r1_message
    from r1lab.recipes.stages import r1zero_reply
    from r1lab.tasks import get_task
    from r1lab.train.pretrain import completion_text

    for p in get_task("arithmetic", max_digits=2).problems("train", n=5, seed=0):
        for direct in (False, True):
            sampled = completion_text(p, direct)  # what a model pretrained on this format samples
            assert r1zero_reply(r1_message(sampled)) == sampled


def _record(pid, reasoning):
    return {
        "id": pid,
        "messages": [
            {"role": "user", "content": pid},
            {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n<answer> 1 </answer>"},
        ],
    }


def test_the_longest_reasoning_is_kept_per_problem_in_problem_order():
    from r1lab.recipes.stages import select_longest

    kept = [_record("a", "x"), _record("a", "xxx"), _record("b", ""), _record("a", "xx"), _record("b", "y")]
    reasoning = lambda rs: [(r["id"], r["messages"][1]["content"].split("\n")[1]) for r in rs]  # noqa: E731
    assert reasoning(select_longest(kept, 2)) == [("a", "xxx"), ("a", "xx"), ("b", "y"), ("b", "")]
    assert reasoning(select_longest(kept, 1)) == [("a", "xxx"), ("b", "y")]
    assert reasoning(select_longest([_record("b", "")], 1, need_reasoning=True)) == []


def test_the_comparison_is_paired_over_problems_and_says_when_it_cannot_tell():
    from r1lab.recipes.report import verdict
    from r1lab.recipes.stages import compare

    def result(values):
        recs = [{"id": str(i), "pass@1": v, "skipped": False} for i, v in enumerate(values)]
        return {"summary": {"pass@1": sum(values) / len(values)}, "records": recs}

    a, b = [1.0, 1.0, 0.5, 1.0, 0.0, 1.0], [0.0, 0.5, 0.5, 0.0, 0.0, 0.5]
    c = dict(first="distilled", second="student_rl", **compare(result(a), result(b)))
    diffs = [x - y for x, y in zip(a, b)]  # reference: the paired t-style interval by hand
    mean = sum(diffs) / 6
    sd = (sum((d - mean) ** 2 for d in diffs) / 5) ** 0.5
    assert c["difference"] == pytest.approx(mean) and c["interval95"] == pytest.approx(1.96 * sd / 6**0.5)
    assert c["winner"] == "first" and "SFT distillation is ahead" in verdict(c)
    assert compare(result(b), result(a))["winner"] == "second"
    tie = dict(
        first="onpolicy", second="student_rl", **compare(result([1.0, 0.0, 1.0, 0.0]), result([0.0, 1.0, 0.0, 1.0]))
    )
    assert tie["winner"] == "neither" and "no clear difference" in verdict(tie)


def test_the_report_shows_first_the_replies_that_rl_turned_from_wrong_to_right(tmp_path):
    from r1lab.recipes.report import _examples

    def record(i, correct):
        return {"prompt": f"p{i}", "gold": str(i), "greedy": {"text": f" reply {i} {correct}", "correct": correct}}

    base = [record(0, True), record(1, False), record(2, False), record(3, False)]
    final = [record(0, True), record(1, False), record(2, True), record(3, True)]
    for name, records in (("eval_base.json", base), ("eval_final.json", final)):
        (tmp_path / name).write_text(json.dumps({"records": records}))
    titles = [t for t, _ in _examples(tmp_path, n=2)]
    assert titles == [
        "p2 (gold 2), base model",
        "p2 (gold 2), after RL",
        "p3 (gold 3), base model",
        "p3 (gold 3), after RL",
    ]
    (tmp_path / "eval_final.json").write_text(json.dumps({"records": base}))  # nothing learned: the first problems
    assert [t for t, _ in _examples(tmp_path, n=1)] == ["p0 (gold 0), base model", "p0 (gold 0), after RL"]
