"""GGUF import: the real SmolLM2-135M-Instruct GGUF becomes a plain safetensors directory whose weights are the GGUF's
dequantised values, which `transformers` loads as an ordinary model that trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from smollm import gguf_path, smollm_dir  # noqa: F401  (fixture)

from r1lab.cli import main

transformers.logging.set_verbosity_error()


def test_import_writes_a_plain_model_with_tokenizer_and_chat_template(smollm_dir):
    names = {p.name for p in smollm_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    cfg = json.loads((smollm_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    tok = transformers.AutoTokenizer.from_pretrained(smollm_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_the_imported_model_loads_plainly_and_trains(smollm_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm_dir)
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    tok = transformers.AutoTokenizer.from_pretrained(smollm_dir)
    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    w = model.model.layers[0].mlp.down_proj.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    before = w.detach().clone()
    torch.optim.SGD(model.parameters(), lr=1e-4).step()
    assert not torch.equal(before, w.detach())
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss < loss  # one step on the sentence makes it likelier


@pytest.mark.parametrize(
    "gguf_name, hf_name",
    [
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("blk.29.attn_output.weight", "model.layers.29.self_attn.o_proj.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),
    ],
)
def test_weights_are_the_gguf_values_dequantised(smollm_dir, gguf_name, hf_name):
    """Reference: the `gguf` library's own reader and dequantiser (these tensors are stored unpermuted)."""
    from gguf.quants import dequantize

    reader = _reader()
    (t,) = [t for t in reader.tensors if t.name == gguf_name]
    ref = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
    with safe_open(smollm_dir / "model.safetensors", "pt") as f:
        got = f.get_tensor(hf_name)
    assert got.dtype == torch.float32 and tuple(got.shape) == ref.shape
    assert np.array_equal(got.numpy(), ref.astype(np.float32))


_READER = {}


def _reader():
    from gguf import GGUFReader

    if "r" not in _READER:  # parsing the file's 49k-token vocabulary takes seconds: once per module
        _READER["r"] = GGUFReader(gguf_path())
    return _READER["r"]


def test_import_gguf_names_a_file_that_is_not_gguf(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    assert main(["import-gguf", str(bad), str(tmp_path / "out")]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    assert main(["import-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a second full import: about a minute on two cores
def test_import_gguf_subcommand_writes_the_same_directory(tmp_path, smollm_dir, capsys):
    out = tmp_path / "smol"
    assert main(["import-gguf", str(gguf_path()), str(out)]) == 0
    assert f"written to {out}" in capsys.readouterr().out
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(smollm_dir / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
