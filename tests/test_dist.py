"""Scale-out: `torchrun --nproc-per-node 2` (gloo, CPU) takes the steps one process takes at the same global batch and
seed, for SFT and GRPO, with DDP and FSDP; checkpoints are written once, by rank 0, and resume on another number of
processes; `--rollout vllm` without CUDA or vLLM fails with what to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from r1lab.cli import main
from r1lab.model.load import load_model_and_tokenizer
from r1lab.train import dist as D
from r1lab.train import grpo as GR
from r1lab.train import run as R
from r1lab.train import sft as S
from r1lab.train.run import read_metrics

transformers.logging.set_verbosity_error()

TOL = 1e-5

# What every run below records: rank 0's logged numbers at full precision (metrics.jsonl keeps 6 significant digits,
# too coarse to compare losses near 6 at 1e-5), and which process wrote which model directory.
RECORD = """
import json, os
from r1lab.train import run as R

_rank = int(os.environ.get("RANK", "0"))
_write, _log = R.write_model, R.Run.log


def write_model(model, tokenizer, path, *args, **kwargs):
    with open(os.environ["R1LAB_TEST_WRITES"], "a") as f:
        f.write(json.dumps({"rank": _rank, "path": str(path)}) + "\\n")
    return _write(model, tokenizer, path, *args, **kwargs)


def log(self, step, **metrics):
    if _rank == 0:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        with open(os.environ["R1LAB_TEST_RAW"], "a") as f:
            f.write(json.dumps({"step": step, **numbers}) + "\\n")
    return _log(self, step, **metrics)


R.write_model, R.Run.log = write_model, log
"""
LAUNCH = (
    RECORD
    + """
import sys
from r1lab.cli import main
sys.exit(main(sys.argv[1:]))
"""
)


def launch(tmp_path, args: list[str], n: int = 2) -> tuple[list[dict], list[dict]]:
    """Run `r1lab ARGS` on n processes under torchrun (gloo, one thread each), or in this process (one thread) when
    n is 1. Returns (model directories written, with the writer's rank; the rows rank 0 logged, unrounded)."""
    k = len(list(tmp_path.glob("raw-*.jsonl")))
    writes, raw = tmp_path / f"writes-{k}.jsonl", tmp_path / f"raw-{k}.jsonl"
    raw.touch()
    env = dict(R1LAB_THREADS="1", OMP_NUM_THREADS="1", R1LAB_TEST_WRITES=str(writes), R1LAB_TEST_RAW=str(raw))
    if n == 1:
        old_env, old_threads = dict(os.environ), torch.get_num_threads()
        saved = R.write_model, R.Run.log
        os.environ.update(env)
        torch.set_num_threads(1)
        try:
            exec(RECORD, {})
            assert main(args) == 0
        finally:
            R.write_model, R.Run.log = saved
            os.environ.clear()
            os.environ.update(old_env)
            torch.set_num_threads(old_threads)
    else:
        script = tmp_path / "launch.py"
        script.write_text(LAUNCH)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={n}",
                str(script),
                *args,
            ],
            env=dict(os.environ, **env),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    read = lambda f: [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []  # noqa: E731
    return read(writes), read(raw)


def by_step(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if r.get(key) is not None}


def close(one: list[dict], other: list[dict], keys, steps=None) -> int:
    """Every key's value at every step (or these steps) within TOL; returns how many values were compared."""
    n = 0
    for k in keys:
        a, b = by_step(one, k), by_step(other, k)
        for s in steps or sorted(a):
            assert abs(a[s] - b[s]) <= TOL, (s, k, a[s], b[s])
            n += 1
    return n


def same_weights(dir_a, dir_b, atol=TOL) -> None:
    a, _ = load_model_and_tokenizer(dir_a)
    b, _ = load_model_and_tokenizer(dir_b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=atol), k


# ----------------------------------------------------------------------------- models and data


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} + {a + 3}?"},
                {"role": "assistant", "content": f"<think>\n{a} plus {a + 3}\n</think>\n\n{2 * a + 3}"},
            ]
        }
        for a in range(24)
    ]
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_args(model, data, out, **kw) -> list[str]:
    # 3 rows per micro-batch over 2 processes (uneven shares), 2 micro-batches per step, a checkpoint every 2 steps
    flags = dict(
        model=model,
        data=data,
        out=out,
        epochs=2,
        seq_len=64,
        rows=3,
        grad_accum=2,
        bf16="false",
        device="cpu",
        eval_fraction=0.2,
        lr=1e-2,
        warmup=1,
        save_every=2,
        **kw,
    )
    return ["sft"] + [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def grpo_args(model, reward, out, **kw) -> list[str]:
    # 3 prompts over 2 processes (one gets 1 group, the other 2), small micro-batches (uneven counts), mu=2 so the
    # second pass has a ratio away from 1 and a loss away from 0
    flags = dict(
        model=model,
        out=out,
        steps=3,
        prompts_per_step=3,
        num_generations=4,
        max_new_tokens=8,
        template="r1",
        bf16="false",
        save_every=2,
        eval_problems=4,
        lr=3e-3,
        mu=2,
        micro_batch_tokens=40,
        rewards=f"{reward}:share",
        reward_weights=1.0,
        task_args=json.dumps({"arithmetic": {"max_digits": 1}}),
        **kw,
    )
    return ["grpo"] + [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def share_reward(tmp_path_factory):
    """A reward with spread inside every group (the share of token ids divisible by 3), so updates are not zero."""
    f = tmp_path_factory.mktemp("reward") / "share_reward.py"
    f.write_text(
        textwrap.dedent("""
        def share(completions, completion_ids, **kw):
            return [sum(t % 3 == 0 for t in ids) / len(ids) for ids in completion_ids]
    """)
    )
    return f


# ----------------------------------------------------------------------------- SFT


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, llama_dir, chats):
    """The same SFT run (a transformers Llama) in one process and in two (DDP)."""
    base = tmp_path_factory.mktemp("sft")
    _, one = launch(base, sft_args(llama_dir, chats, base / "one"), n=1)
    writes, two = launch(base, sft_args(llama_dir, chats, base / "two"))
    return base, one, two, writes


def test_sft_on_two_processes_takes_the_steps_of_one(sft_runs):
    base, one, two, _ = sft_runs
    assert len(by_step(one, "loss")) == 4
    assert close(one, two, ("loss", "grad_norm", "eval_loss", "label_tokens")) == 13
    same_weights(base / "one" / "model", base / "two" / "model")


def test_checkpoints_and_the_model_are_written_once_by_rank_0(sft_runs):
    base, _, two, writes = sft_runs
    total = two[0]["steps"]
    saves = [s for s in range(1, total) if s % 2 == 0]  # save_every 2, none at the end
    assert [w["rank"] for w in writes] == [0] * (len(saves) + 1)
    want = [str(base / "two" / "checkpoint")] * len(saves) + [str(base / "two" / "model")]
    assert [w["path"] for w in writes] == want
    rows = [r["step"] for r in read_metrics(base / "two" / "metrics.jsonl") if "loss" in r]
    assert rows == list(range(1, total + 1))  # one process logged each row
    assert not list((base / "two").glob(".*tmp*"))


def test_a_two_process_checkpoint_resumes_in_one_process(sft_runs, llama_dir, chats, tmp_path):
    base, one, _, _ = sft_runs
    run = tmp_path / "resumed"
    shutil.copytree(base / "two", run)
    shutil.rmtree(run / "model")  # as if stopped after the step-2 checkpoint
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    _, resumed = launch(tmp_path, sft_args(llama_dir, chats, run), n=1)
    assert sorted(by_step(resumed, "loss")) == [3, 4]
    close(one, resumed, ("loss", "grad_norm"), steps=[3, 4])
    same_weights(base / "one" / "model", run / "model")
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_fsdp_shards_and_still_takes_the_same_steps(tmp_path, tiny_native_dir, chats):
    """r1lab's MoE model (expert loads summed over processes), weights and optimiser state sharded."""
    _, one = launch(tmp_path, sft_args(tiny_native_dir, chats, tmp_path / "one"), n=1)
    _, two = launch(tmp_path, sft_args(tiny_native_dir, chats, tmp_path / "fsdp", parallel="fsdp"))
    assert close(one, two, ("loss", "grad_norm", "eval_loss")) == 9
    # FSDP reduce-scatters gradients in another order; Adam divides by sqrt(v), so a weight whose gradient is near
    # zero moves by up to ~lr * 1e-2 differently after 4 steps at lr 1e-2 (seen: 8e-5 on one entry of 170k)
    same_weights(tmp_path / "one" / "model", tmp_path / "fsdp" / "model", atol=2e-4)
    # the checkpoint holds whole tensors: the optimiser state one process writes
    state = torch.load(tmp_path / "fsdp" / "checkpoint" / "trainer_state.pt", weights_only=True)
    ref = torch.load(tmp_path / "one" / "checkpoint" / "trainer_state.pt", weights_only=True)
    for i, s in ref["optimizer"]["state"].items():
        assert torch.allclose(s["exp_avg"], state["optimizer"]["state"][i]["exp_avg"], atol=TOL), i


# ----------------------------------------------------------------------------- GRPO


@pytest.fixture(scope="module")
def grpo_one(tmp_path_factory, tiny_native_dir, share_reward):
    base = tmp_path_factory.mktemp("grpo")
    _, rows = launch(base, grpo_args(tiny_native_dir, share_reward, base / "one"), n=1)
    return base / "one", rows


def test_grpo_on_two_processes_samples_and_takes_the_steps_of_one(grpo_one, tmp_path, tiny_native_dir, share_reward):
    out, one = grpo_one
    _, two = launch(tmp_path, grpo_args(tiny_native_dir, share_reward, tmp_path / "two"))
    losses = by_step(one, "loss")
    assert len(losses) == 3 and all(abs(v) > 1e-3 for v in losses.values())
    # the same completions (rewards, lengths), then the same update (loss, gradient)
    close(one, two, ("reward_mean", "reward_std", "mean_length", "groups", "loss", "grad_norm", "entropy", "clip_frac"))
    same_weights(out / "model", tmp_path / "two" / "model")


def test_a_one_process_grpo_checkpoint_resumes_on_two_with_fsdp(grpo_one, tmp_path, tiny_native_dir, share_reward):
    out, one = grpo_one
    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    shutil.rmtree(run / "model")  # as if stopped after the step-2 checkpoint
    _, resumed = launch(tmp_path, grpo_args(tiny_native_dir, share_reward, run, parallel="fsdp"))
    assert sorted(by_step(resumed, "loss")) == [3]
    close(one, resumed, ("reward_mean", "loss", "grad_norm"), steps=[3])
    same_weights(out / "model", run / "model")
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_grpo_on_a_llama_model_takes_the_same_steps_on_its_fast_path_and_packed_under_fsdp(
    tmp_path, llama_dir, share_reward
):
    """One process samples and trains through FastDecoder (grouped layout); two FSDP processes, whose sharded blocks
    only gather through their own forward, sample with the model's forward and train on packed rows."""
    _, one = launch(tmp_path, grpo_args(llama_dir, share_reward, tmp_path / "one"), n=1)
    _, two = launch(tmp_path, grpo_args(llama_dir, share_reward, tmp_path / "fsdp", parallel="fsdp"))
    assert len(by_step(one, "loss")) == 3
    close(one, two, ("reward_mean", "reward_std", "mean_length", "loss", "grad_norm", "entropy", "clip_frac"))
    same_weights(tmp_path / "one" / "model", tmp_path / "fsdp" / "model", atol=2e-4)


# ----------------------------------------------------------------------------- helpers, vLLM guard


def test_one_process_is_untouched():
    assert not D.active() and D.world() == 1 and D.rank() == 0 and D.is_main()
    assert D.share(7) == slice(0, 7) and D.all_sum([1.5, 2]) == [1.5, 2] and D.gather("x") == ["x"]
    assert D.even_out([1, 2]) == [1, 2]
    model = torch.nn.Linear(2, 2)
    f = D.wrap(model, lambda m, x: m(x))
    assert not isinstance(f, torch.nn.Module)  # the plain call: no wrapper, no hooks


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shares_cover_the_batch_once(world, monkeypatch):
    got = []
    for r in range(world):
        monkeypatch.setattr(D, "rank", lambda r=r: r)
        monkeypatch.setattr(D, "world", lambda: world)
        got += list(range(10))[D.share(10)]
    assert got == list(range(10))


def test_bad_parallel_and_fsdp_with_lora_are_refused(llama_dir, chats, tmp_path):
    with pytest.raises(ValueError, match="parallel must be one of ddp, fsdp"):
        S.SFTConfig(model=str(llama_dir), data=str(chats), parallel="zero3").validate()
    with pytest.raises(ValueError, match="use --parallel ddp"):
        S.SFTConfig(model=str(llama_dir), data=str(chats), parallel="fsdp", hf=S.HFOptions(lora_rank=4)).validate()


def test_rollout_vllm_without_cuda_or_vllm_fails_with_the_fix(llama_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    cfg = GR.GRPOConfig(model=str(llama_dir), out=str(tmp_path / "g"), rollout="vllm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a machine without a GPU says
    with pytest.raises(ValueError, match="--rollout vllm needs a CUDA GPU.*use --rollout r1lab"):
        cfg.validate()
    assert main(["grpo", "--model", str(llama_dir), "--out", str(tmp_path / "g"), "--rollout", "vllm"]) == 2
    assert "--rollout vllm needs a CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but no vllm package
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match="needs the vllm package: pip install vllm"):
        cfg.validate()
    with pytest.raises(ValueError, match="rollout must be r1lab or vllm"):
        GR.GRPOConfig(model=str(llama_dir), rollout="sglang").validate()
    assert not (tmp_path / "g").exists()  # refused before anything was written
