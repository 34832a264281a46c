"""Checkpoint directories: atomic writes, safe reads, and errors that name the bad file."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import tiny_model_config
from safetensors.torch import load_file, save_file

from r1lab.model.checkpoint import CheckpointError, load_model, load_state, save_model, save_state
from r1lab.model.deepseek import DeepseekV3
from r1lab.model.load import load_model_and_tokenizer


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return DeepseekV3(tiny_model_config(40, **kw))


def test_round_trip_preserves_weights_tokenizer_and_balancing_bias(tmp_path, tiny_tokenizer):
    m = _model()
    m.main_moe()[0].gate.e_score_correction_bias.fill_(0.25)
    save_model(m, tmp_path / "ck", tokenizer=tiny_tokenizer)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "ck"))
    m2, tok = load_model_and_tokenizer(tmp_path / "ck")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert tok("What is 3 + 4?").input_ids == tiny_tokenizer("What is 3 + 4?").input_ids


def test_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    save_model(_model(0), tmp_path / "ck")
    before = load_file(tmp_path / "ck" / "model.safetensors")

    import r1lab.model.checkpoint as ck

    real = ck.save_file

    def crash(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt("simulated crash after the weights were written")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(_model(1), tmp_path / "ck")
    after = load_file(tmp_path / "ck" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp directory left behind


def test_crash_between_renames_is_recovered_on_load(tmp_path):
    save_model(_model(0), tmp_path / "ck")
    os.rename(tmp_path / "ck", tmp_path / ".ck.old")  # the state after the first of the two renames
    m = load_model(tmp_path / "ck")
    assert isinstance(m, DeepseekV3) and (tmp_path / "ck").is_dir()


@pytest.mark.parametrize(
    "victim, damage, expect",
    [
        ("model.safetensors", "delete", "model.safetensors is missing"),
        ("model.safetensors", "truncate", "model.safetensors is corrupt"),
        ("config.json", "delete", "config.json is missing"),
        ("config.json", "garbage", "config.json is corrupt"),
    ],
)
def test_damaged_directory_names_the_file(tmp_path, victim, damage, expect):
    save_model(_model(), tmp_path / "ck")
    f = tmp_path / "ck" / victim
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        f.write_text("{not json")
    with pytest.raises(CheckpointError, match=expect):
        load_model(tmp_path / "ck")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    save_model(_model(), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "ck")


def test_fused_expert_tensors_are_accepted(tmp_path):
    """transformers keeps experts fused in memory ([E, 2I, D] and [E, D, I]); such files load too."""
    m = _model()
    save_model(m, tmp_path / "ck")
    state = load_file(tmp_path / "ck" / "model.safetensors")
    for layer in range(1, 3):
        base = f"model.layers.{layer}.mlp.experts."
        gate_up = torch.stack(
            [
                torch.cat([state.pop(f"{base}{e}.gate_proj.weight"), state.pop(f"{base}{e}.up_proj.weight")])
                for e in range(8)
            ]
        )
        down = torch.stack([state.pop(f"{base}{e}.down_proj.weight") for e in range(8)])
        state[base + "gate_up_proj"], state[base + "down_proj"] = gate_up, down
    save_file(state, tmp_path / "ck" / "model.safetensors")
    ids = torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "ck")(ids).logits, m.eval()(ids).logits)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_training_state_is_loaded_without_unpickling_objects(tmp_path):
    save_state({"step": torch.tensor(3), "opt": {"lr": 0.1}}, tmp_path / "state.pt")
    assert load_state(tmp_path / "state.pt")["opt"]["lr"] == 0.1
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_state(tmp_path / "evil.pt")
