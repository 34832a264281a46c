"""--report-to: each tracker, offline through its own library, holds the rows of metrics.jsonl, the resolved config,
sample tables and the final evaluation, read back with that library's own reader (TensorBoard's EventAccumulator,
MLflow's client on a local file store, W&B's offline run file parsed into its own protobuf records); a resume sends
no row twice; a tracker that cannot start is a one-line error before training."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import TINY_MODEL as TINY

from r1lab import config as C
from r1lab import trackers as T
from r1lab.config import ConfigError
from r1lab.train import grpo as GR
from r1lab.train import pretrain as P
from r1lab.train.run import read_metrics

ALL = ["tensorboard", "wandb", "mlflow"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B in offline mode and MLflow on a local file store under tmp_path; nothing written outside it."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x keeps its file store behind this switch
    yield tmp_path
    fresh_wandb()


def fresh_wandb() -> None:
    """W&B reads its settings (WANDB_MODE, ...) once per process, at its first run: start over for the next test."""
    import wandb

    wandb.teardown()


def pretrain_cfg(out, **kw):
    base = dict(
        out=str(out),
        steps=6,
        rows=2,
        seq_len=192,
        warmup=2,
        eval_every=100,
        eval_problems=3,
        log_every=1,
        save_every=3,
        model=TINY,
        vocab_size=400,
        bf16=False,
        task_args={"arithmetic": {"max_digits": 2}},
    )
    return P.PretrainConfig(**{**base, **kw})


def grpo_cfg(out, model_dir, **kw):
    base = dict(
        out=str(out),
        model=str(model_dir),
        steps=3,
        prompts_per_step=3,
        num_generations=4,
        max_new_tokens=8,
        template="r1",
        bf16=False,
        save_every=2,
        eval_every=2,
        eval_problems=4,
        task_args={"arithmetic": {"max_digits": 1}},
    )
    return GR.GRPOConfig(**{**base, **kw})


def expected(rows: list[dict]) -> dict[str, dict[int, float]]:
    """key -> {step: value} of every number in metrics.jsonl, nested keys joined with '/' (the reference)."""
    out: dict[str, dict[int, float]] = {}

    def walk(d, prefix, step):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/", step)
            elif isinstance(v, (int, float)) and f"{prefix}{k}" != "step" and v == v:
                out.setdefault(f"{prefix}{k}", {})[step] = float(v)

    for r in rows:
        walk(r, "", r["step"])
    return out


# ----------------------------------------------------------------------------- the trackers' own readers


def tensorboard_scalars(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {
        tag.split("/")[0]: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
    }
    return scalars, texts


def mlflow_run(run_dir: Path):
    from mlflow import MlflowClient

    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(state["tracking_uri"])
    return client, client.get_run(state["run_id"])


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline W&B files (one per invocation), parsed with W&B's own protobuf messages.
    The file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each a 7-byte header
    (checksum, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, part = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if n == 0 and kind == 0:  # zero padding to the end of a block
                pos += left
                continue
            part += data[pos + 7 : pos + 7 + n]
            pos += 7 + n
            if kind in (1, 4):
                rec = pb.Record()
                rec.ParseFromString(part)
                records.append(rec)
                part = b""
    return records


def wandb_history(records) -> dict[int, dict[str, object]]:
    """step -> {key: value} of the history rows."""
    out: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            out.setdefault(int(items["_step"]), {}).update(items)
    return out


def wandb_summary(records) -> dict[str, object]:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            out.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in r.summary.update})
    return out


# ----------------------------------------------------------------------------- tests


def test_a_grpo_run_reaches_every_tracker_as_metrics_jsonl_has_it(offline, tiny_native_dir):
    cfg = grpo_cfg(offline / "grpo", tiny_native_dir, report_to=ALL)
    _, _, run = GR.grpo(cfg, progress=False)
    rows = read_metrics(run.metrics_path)
    want = expected(rows)
    assert "eval/arithmetic/greedy" in want and "reward/accuracy/mean" in want and len(want["loss"]) == 3

    # TensorBoard: every number as a scalar at its step (float32), the config and the samples as text
    scalars, texts = tensorboard_scalars(run.dir)
    assert set(scalars) == set(want)
    for key, by_step in want.items():
        assert dict(scalars[key]) == pytest.approx(by_step, rel=1e-6), key
    assert yaml.safe_load("\n".join(line[4:] for line in texts["config"][0][1].splitlines())) == C.to_dict(cfg)
    assert [s for s, _ in texts["samples"]] == [1, 2, 3]
    assert texts["samples"][0][1].startswith("| prompt | completion | answer | reward | correct |")

    # MLflow: each key's history by step, the config as params and as config.yaml, one sample table per step
    client, mrun = mlflow_run(run.dir)
    assert mrun.info.status == "FINISHED"
    for key, by_step in want.items():
        assert {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, key)} == by_step, key
    assert mrun.data.params["steps"] == "3" and mrun.data.params["hf.lora_rank"] == "0"
    local = client.download_artifacts(mrun.info.run_id, "config.yaml", str(offline / "dl"))
    assert yaml.safe_load(Path(local).read_text()) == C.to_dict(cfg)
    tables = sorted(a.path for a in client.list_artifacts(mrun.info.run_id, "samples"))
    assert tables == [f"samples/step_{s:07d}.json" for s in (1, 2, 3)]
    table = json.loads(Path(client.download_artifacts(mrun.info.run_id, tables[0], str(offline / "dl"))).read_text())
    assert table["columns"] == ["prompt", "completion", "answer", "reward", "correct"] and len(table["data"]) == 3

    # W&B offline: the history rows, the config, a samples table per step, the run's end
    records = wandb_records(run.dir)
    history = wandb_history(records)
    for key, by_step in want.items():
        assert {s: h[key] for s, h in history.items() if key in h} == pytest.approx(by_step, rel=1e-12), key
    assert sorted(s for s, h in history.items() if h.get("samples/_type") == "table-file") == [1, 2, 3]
    config = {
        u.key: json.loads(u.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for u in r.config.update
    }
    assert config["steps"] == 3 and config["hf"]["lora_rank"] == 0 and config["rewards"] == ["accuracy", "format"]
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)
    assert len(list(run.dir.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))) == 3

    assert (run.model_dir / "README.md").is_file()  # and the final model has its card (tests/test_model_card.py)


def test_a_resumed_run_sends_no_row_twice_and_a_tracker_added_on_resume_gets_the_rows_it_lacks(offline, monkeypatch):
    real = P.Corpus.batch

    def crash_at_5(self, step, **kw):
        if step == 5:
            raise KeyboardInterrupt
        return real(self, step, **kw)

    monkeypatch.setattr(P.Corpus, "batch", crash_at_5)
    with pytest.raises(KeyboardInterrupt):  # rows 1-5 sent to TensorBoard and MLflow; checkpoint at step 3
        P.pretrain(pretrain_cfg(offline / "run", report_to=["tensorboard", "mlflow"]), progress=False)
    first_id = json.loads((offline / "run" / "trackers.json").read_text())["mlflow"]["run_id"]
    monkeypatch.setattr(P.Corpus, "batch", real)
    model, tok, run = P.pretrain(pretrain_cfg(offline / "run", report_to=ALL), progress=False)

    rows = read_metrics(run.metrics_path)
    want = expected(rows)
    assert sorted(want["loss"]) == [1, 2, 3, 4, 5, 6]
    scalars, _ = tensorboard_scalars(run.dir)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6]  # once each: rows 4-5 were held, not sent again
    assert dict(scalars["loss"]) == pytest.approx(want["loss"], rel=1e-6)  # the resume continued exactly
    client, mrun = mlflow_run(run.dir)
    assert mrun.info.run_id == first_id and mrun.info.status == "FINISHED"  # the same MLflow run, continued
    history = client.get_metric_history(mrun.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert {m.step: m.value for m in history} == want["loss"]
    wb = wandb_history(wandb_records(run.dir))  # added on resume: the kept rows 1-3 first, then 4-6
    assert {s: h["loss"] for s, h in wb.items() if "loss" in h} == want["loss"]
    held = json.loads((run.dir / "trackers.json").read_text())
    assert {name: held[name]["rows"] for name in ALL} == {name: len(rows) for name in ALL}

    # an evaluation made afterwards (the pipeline's) joins the same runs as final figures at the last step
    from r1lab.eval import EvalConfig, evaluate, local_generator
    from r1lab.tasks import get_task

    ecfg = EvalConfig(task="arithmetic", k=2, max_new_tokens=8, template="r1zero")
    summary = evaluate(
        local_generator(model, tok, "r1zero"), get_task("arithmetic").problems("test", n=3, seed=0), ecfg
    )["summary"]
    assert T.report_evaluation(run.dir, ALL, summary)
    metrics = client.get_run(mrun.info.run_id).data.metrics
    assert metrics["final_eval/pass_at_1"] == summary["pass@1"] and metrics["final_eval/cons_at_k"] == summary["cons@k"]
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "final_eval/pass_at_1")] == [6]
    scalars, _ = tensorboard_scalars(run.dir)
    assert scalars["final_eval/pass@1"] == [(6, pytest.approx(summary["pass@1"]))]
    assert wandb_summary(wandb_records(run.dir))["final_eval/pass@1"] == summary["pass@1"]


@pytest.mark.slow
def test_fresh_starts_new_tracker_runs_and_tensorboard_forgets_the_old_events(offline):
    P.pretrain(pretrain_cfg(offline / "run", steps=3, report_to=["tensorboard", "mlflow"]), progress=False)
    old = json.loads((offline / "run" / "trackers.json").read_text())["mlflow"]["run_id"]
    _, _, run = P.pretrain(
        pretrain_cfg(offline / "run", steps=2, report_to=["tensorboard", "mlflow"]), resume=False, progress=False
    )
    assert json.loads((run.dir / "trackers.json").read_text())["mlflow"]["run_id"] != old
    scalars, _ = tensorboard_scalars(run.dir)
    assert dict(scalars["loss"]) == pytest.approx(expected(read_metrics(run.metrics_path))["loss"], rel=1e-6)


def test_unknown_or_missing_trackers_are_one_line_errors_before_anything_runs(tmp_path, monkeypatch, capsys):
    from r1lab.cli import main

    with pytest.raises(ConfigError, match="unknown tracker 'neptune'; choose from tensorboard, wandb, mlflow"):
        pretrain_cfg(tmp_path / "a", report_to=["neptune"]).validate()
    assert main(["pretrain", "--out", str(tmp_path / "b"), "--report-to", "tensorboard,neptune"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown tracker 'neptune'" in err and not (tmp_path / "b").exists()

    real = T.importlib.util.find_spec
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(
        ConfigError,
        match=r"--report-to mlflow: the mlflow package is not installed; "
        r"pip install 'r1lab\[mlflow\]'",
    ):
        GR.GRPOConfig(model="m", report_to=["mlflow"]).validate()


def test_wandb_online_without_a_key_stops_before_training_with_what_to_do(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    fresh_wandb()
    cfg = pretrain_cfg(tmp_path / "run", report_to=["wandb"])
    with pytest.raises(ConfigError, match="--report-to wandb could not start: .*WANDB_MODE=offline") as e:
        P.pretrain(cfg, progress=False)
    assert "\n" not in str(e.value)
    assert not read_metrics(tmp_path / "run" / "metrics.jsonl") and not (tmp_path / "run" / "checkpoint").exists()


def test_a_tracker_that_fails_mid_run_is_dropped_and_training_goes_on(offline, monkeypatch, capsys):
    calls = []

    def flaky(self, step, values):
        calls.append(step)
        if step == 2:
            raise OSError("disk full")

    monkeypatch.setattr(T.TensorBoard, "log", flaky)
    _, _, run = P.pretrain(pretrain_cfg(offline / "run", steps=4, report_to=["tensorboard", "mlflow"]), progress=False)
    assert calls == [1, 2] and run.done()
    err = capsys.readouterr().err
    assert err.count("--report-to tensorboard stopped after an error (OSError: disk full)") == 1
    client, mrun = mlflow_run(run.dir)
    assert sorted(m.step for m in client.get_metric_history(mrun.info.run_id, "loss")) == [1, 2, 3, 4]


def test_a_tracker_run_that_is_gone_is_started_again_with_every_kept_row(offline):
    """trackers.json says MLflow holds 5 rows of a run that is no longer in the store: a new run gets the 3 kept
    rows of metrics.jsonl and then every new row, none held back."""
    run_dir = offline / "run"
    run_dir.mkdir()
    (run_dir / T.STATE).write_text(
        json.dumps({"mlflow": {"tracking_uri": os.environ["MLFLOW_TRACKING_URI"], "run_id": "0" * 32, "rows": 5}})
    )
    kept = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    trackers = T.Trackers(["mlflow"], run_dir)
    trackers.begin({"steps": 6}, kept)
    trackers.log({"step": 4, "loss": 0.25})
    trackers.close()
    client, mrun = mlflow_run(run_dir)
    assert mrun.info.run_id != "0" * 32
    assert {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, "loss")} == {
        1: 1.0,
        2: 0.5,
        3: 1 / 3,
        4: 0.25,
    }
    assert json.loads((run_dir / T.STATE).read_text())["mlflow"]["rows"] == 4


def test_metric_names_mlflow_refuses_are_spelled_so_it_accepts_them():
    assert T.mlflow_key("final_eval/pass@1") == "final_eval/pass_at_1"
    assert T.mlflow_key("reward/my_reward.py:share/mean") == "reward/my_reward.py_share/mean"
    assert T.scalars({"step": 3, "a": {"b": 1, "c": None, "d": "x"}, "ok": True, "nan": float("nan")}) == {
        "a/b": 1.0,
        "ok": 1.0,
    }


@pytest.mark.slow
def test_the_pipeline_reports_every_stage_with_its_evaluation(offline):
    from r1lab.cli import main

    tiny = json.dumps(TINY)
    out = offline / "pipe"
    assert (
        main(
            [
                "pipeline",
                "--out",
                str(out),
                "--pretrain.steps",
                "4",
                "--pretrain.rows",
                "2",
                "--pretrain.eval-problems",
                "4",
                "--pretrain.model",
                tiny,
                "--pretrain.vocab-size",
                "400",
                "--pretrain.bf16",
                "false",
                "--task-args",
                '{"min_digits": 1, "max_digits": 1}',
                "--grpo.steps",
                "2",
                "--grpo.prompts-per-step",
                "2",
                "--grpo.num-generations",
                "3",
                "--grpo.max-new-tokens",
                "8",
                "--grpo.bf16",
                "false",
                "--eval.limit",
                "4",
                "--eval.k",
                "2",
                "--eval.max-new-tokens",
                "8",
                "--report-to",
                "tensorboard,mlflow",
            ]
        )
        == 0
    )
    for stage, evaluation in (("pretrain", "eval_base.json"), ("grpo", "eval_final.json")):
        summary = json.loads((out / evaluation).read_text())["summary"]
        client, mrun = mlflow_run(out / stage)
        assert mrun.data.metrics["final_eval/pass_at_1"] == summary["pass@1"], stage
        last = max(r["step"] for r in read_metrics(out / stage / "metrics.jsonl"))
        scalars, _ = tensorboard_scalars(out / stage)
        assert scalars["final_eval/pass@1"] == [(last, pytest.approx(summary["pass@1"]))]
        card = (out / stage / "model" / "README.md").read_text()
        assert f"| {round(100 * summary['pass@1'], 1)}% |" in card, stage


@pytest.mark.slow
def test_mlflow_on_its_sqlite_store_the_default_of_mlflow_3(tmp_path, monkeypatch):
    """The store MLflow 3 uses when no URI is set (SQLite through sqlalchemy and alembic, in the mlflow extra)."""
    monkeypatch.chdir(tmp_path)  # the store's artifacts go to ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, _, run = P.pretrain(pretrain_cfg(tmp_path / "run", steps=3, report_to=["mlflow"]), progress=False)
    client, mrun = mlflow_run(run.dir)
    want = expected(read_metrics(run.metrics_path))
    assert {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, "loss")} == want["loss"]
    assert mrun.info.status == "FINISHED" and (tmp_path / "mlruns").is_dir()


@pytest.mark.slow
def test_under_torchrun_only_rank_0_reports(offline, tiny_llama_dir):
    chats = offline / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {a} + {a + 3}?"},
                        {"role": "assistant", "content": f"<think>\n{a} plus {a + 3}\n</think>\n\n{2 * a + 3}"},
                    ]
                }
            )
            + "\n"
            for a in range(12)
        )
    )
    out = offline / "sft"
    args = [
        "sft",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(chats),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--seq-len",
        "64",
        "--rows",
        "2",
        "--bf16",
        "false",
        "--device",
        "cpu",
        "--eval-fraction",
        "0",
        "--report-to",
        "tensorboard,mlflow",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "r1lab.cli", *args],
        env=dict(os.environ, R1LAB_THREADS="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's
    scalars, _ = tensorboard_scalars(out)
    assert dict(scalars["loss"]) == pytest.approx(expected(rows)["loss"], rel=1e-6)
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")} == expected(rows)["loss"]
