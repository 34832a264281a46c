"""DeepSeek-V3 checkpoints as others write them: transformers (no MTP weights), DeepSeek's own layout (the MTP module
as the layer after the last) and its FP8 release (128x128 blocks with inverse scales); and bad directories named
in one line by `r1lab info` and the loaders."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_model_config
from safetensors.torch import load_file, save_file
from tiny import transformers_deepseek_config

from r1lab.cli import main
from r1lab.model.checkpoint import CheckpointError, dequantize_block_fp8, load_model, save_model, to_disk_names
from r1lab.model.deepseek import DeepseekV3

transformers.logging.set_verbosity_error()

FP8_MAX = 448.0  # largest float8_e4m3fn value


def _hf_model(seed=1) -> transformers.DeepseekV3ForCausalLM:
    """A tiny transformers DeepSeek-V3 whose config keeps the default MTP layer count (1), like DeepSeek's."""
    hcfg = transformers_deepseek_config()
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM(hcfg).eval()
    with torch.no_grad():
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    return hf


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- transformers: no MTP weights


@pytest.mark.parametrize("shard", [None, "30KB"])
def test_transformers_checkpoint_with_default_mtp_count_loads_without_the_module(tmp_path, capsys, shard):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["num_nextn_predict_layers"] == 1  # what transformers writes by default...
    index = tmp_path / "hf" / "model.safetensors.index.json"
    assert index.is_file() == (shard is not None)
    names = json.loads(index.read_text())["weight_map"] if shard else load_file(tmp_path / "hf" / "model.safetensors")
    assert not any(k.startswith("model.layers.3.") for k in names)  # ...without storing the MTP layer
    capsys.readouterr()

    ours = load_model(tmp_path / "hf")
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "multi-token-prediction" in lines[0] and "num_nextn_predict_layers 1 -> 0" in lines[0]
    assert ours.config.num_nextn_predict_layers == 0 and len(ours.mtp_layers) == 0
    ids = torch.randint(0, 89, (2, 19))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert a.abs().max() > 0.5
    assert (a - b).abs().max() <= 1e-4

    save_model(ours, tmp_path / "resaved")  # a re-save says what it holds: no MTP, and loads silently
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    again = load_model(tmp_path / "resaved")
    assert _stderr_lines(capsys) == []
    with torch.no_grad():
        assert torch.equal(again(ids).logits, a)


# ----------------------------------------------------------------------------- DeepSeek's MTP layout


def _deepseek_mtp_names(state: dict, L: int) -> set[str]:
    """The MTP module's tensor names as README_WEIGHTS.md describes them: a decoder block like the main layers
    (`self_attn`, `mlp`, its two norms) plus embed_tokens, enorm, hnorm, eh_proj and shared_head, under layer L."""
    block = {k.split(".", 3)[3] for k in state if k.startswith(f"model.layers.{L - 1}.")}
    extra = {
        "embed_tokens.weight",
        "enorm.weight",
        "hnorm.weight",
        "eh_proj.weight",
        "shared_head.norm.weight",
        "shared_head.head.weight",
    }
    return {f"model.layers.{L}.{k}" for k in block | extra}


def _mtp_model(seed=0, **kw) -> DeepseekV3:
    torch.manual_seed(seed)
    return DeepseekV3(tiny_model_config(40, num_nextn_predict_layers=1, tie_word_embeddings=False, **kw)).eval()


def _write_deepseek_layout(model: DeepseekV3, path) -> dict:
    """The model's files as DeepSeek publishes V3: the MTP layer in its own shard with its copies of embedding
    and head."""
    L = model.config.num_hidden_layers
    state = to_disk_names({k: v.detach().clone() for k, v in model.state_dict().items()})
    state[f"model.layers.{L}.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    state[f"model.layers.{L}.shared_head.head.weight"] = state["lm_head.weight"].clone()
    path.mkdir()
    model.config.save(path / "config.json")
    mtp = {k: v for k, v in state.items() if k.startswith(f"model.layers.{L}.")}
    main_ = {k: v for k, v in state.items() if k not in mtp}
    save_file(main_, path / "model-00001-of-00002.safetensors")
    save_file(mtp, path / "model-00002-of-00002.safetensors")
    weight_map = {
        **{k: "model-00001-of-00002.safetensors" for k in main_},
        **{k: "model-00002-of-00002.safetensors" for k in mtp},
    }
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def test_r1lab_writes_the_mtp_module_under_deepseeks_names(tmp_path):
    m = _mtp_model()
    save_model(m, tmp_path / "ck")
    stored = load_file(tmp_path / "ck" / "model.safetensors")
    L = m.config.num_hidden_layers
    mine = {k for k in stored if k.startswith(f"model.layers.{L}.")}
    # the same names but the two shared copies, which DeepSeek's loaders tie to the main embedding and head anyway
    assert mine == _deepseek_mtp_names(stored, L) - {
        f"model.layers.{L}.embed_tokens.weight",
        f"model.layers.{L}.shared_head.head.weight",
    }


def test_mtp_module_in_deepseeks_layout_loads_and_predicts_as_saved(tmp_path, capsys):
    m = _mtp_model()
    state = _write_deepseek_layout(m, tmp_path / "ds")
    L = m.config.num_hidden_layers
    assert {k for k in state if k.startswith(f"model.layers.{L}.")} == _deepseek_mtp_names(state, L)
    capsys.readouterr()
    loaded = load_model(tmp_path / "ds")
    assert _stderr_lines(capsys) == []
    assert loaded.config.num_nextn_predict_layers == 1
    for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        ref, out = m.train()(ids, labels=ids), loaded.train()(ids, labels=ids)
    assert ref.mtp_loss > 0 and torch.equal(out.mtp_loss, ref.mtp_loss)


def test_an_incomplete_mtp_module_is_refused_by_name(tmp_path):
    _write_deepseek_layout(_mtp_model(), tmp_path / "ds")
    shard = tmp_path / "ds" / "model-00002-of-00002.safetensors"
    mtp = load_file(shard)
    del mtp["model.layers.3.eh_proj.weight"]
    save_file(mtp, shard)
    index = json.loads((tmp_path / "ds" / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.3.eh_proj.weight"]
    (tmp_path / "ds" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"multi-token-prediction module \(model\.layers\.3\.\*\) is incomplete: "
        r"1 tensors missing \(model\.layers\.3\.eh_proj\.weight\)",
    ):
        load_model(tmp_path / "ds")


# ----------------------------------------------------------------------------- DeepSeek's FP8 release


def _quantise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 as DeepSeek's weights hold it: per block, scale_inv = amax / 448 and weight = w / scale_inv in e4m3."""
    bm, bn = block
    rows, cols = -(-w.shape[0] // bm), -(-w.shape[1] // bn)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].float()
            s[i, j] = blk.abs().max().clamp(min=1e-12) / FP8_MAX
            q[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def _dequantise_reference(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """One block at a time, as DeepSeek's weight_dequant kernel does: float32(weight block) * its scale."""
    bm, bn = block
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = (
                q[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].float() * s[i, j]
            )
    return out


def test_block_fp8_dequantises_like_deepseeks_kernel_with_partial_edge_blocks():
    torch.manual_seed(0)
    w = torch.randn(300, 260) * torch.linspace(0.01, 3.0, 260)  # blocks of very different ranges
    q, s = _quantise(w, (128, 128))
    assert s.shape == (3, 3)  # ceil(300/128) x ceil(260/128)
    deq = dequantize_block_fp8(q, s, (128, 128))
    assert torch.equal(deq, _dequantise_reference(q, s, (128, 128)))
    # e4m3 keeps 3 mantissa bits: within 2^-4 of each value, or a subnormal step (2^-9 of the scale) near zero
    scale = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    assert ((deq - w).abs() <= w.abs() * 2**-4 + scale * 2**-9).all()


def _fp8_dir(tmp_path, block, seed=0):
    """A model written as DeepSeek publishes V3: linear weights of attention and FFNs in block FP8 with
    `weight_scale_inv`; embedding, head, router, norms and eh_proj unquantised; quantization_config in config.json.
    DeepSeek's initialisation scale (0.02): with larger weights, quantisation flips expert choices downstream."""
    m = _mtp_model(seed, initializer_range=0.02)
    state = to_disk_names({k: v.detach().clone() for k, v in m.state_dict().items()})
    ref = dict(state)
    for k in list(state):
        if k.endswith("proj.weight") and (".self_attn." in k or ".mlp." in k):
            q, s = _quantise(state[k], block)
            state[k], state[k + "_scale_inv"] = q, s
            ref[k] = _dequantise_reference(q, s, block)
    path = tmp_path / "fp8"
    path.mkdir()
    cfg = {
        **m.config.to_hf_dict(),
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(block),
        },
    }
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(state, path / "model.safetensors")
    return m, state, ref, path


@pytest.mark.parametrize("block", [(128, 128), (16, 8)])
def test_fp8_checkpoint_loads_dequantised(tmp_path, block):
    m, state, ref, path = _fp8_dir(tmp_path, block)
    n_fp8 = sum(v.dtype == torch.float8_e4m3fn for v in state.values())
    assert n_fp8 >= 20 and sum(k.endswith("weight_scale_inv") for k in state) == n_fp8
    loaded = load_model(path)
    got = to_disk_names(loaded.state_dict())
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k  # exactly the dequantised weights
    ids = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        a, b = loaded(ids).logits, m(ids).logits
    # close to the unquantised model: e4m3 keeps 3 mantissa bits (measured 1.4-1.9% RMS; another random model: 138%)
    assert (a - b).pow(2).mean().sqrt() <= 0.05 * b.pow(2).mean().sqrt()


@pytest.mark.parametrize(
    "damage, expect",
    [
        ("drop_scale", r"self_attn\.o_proj\.weight is FP8 but .*weight_scale_inv is not stored"),
        ("bad_scale", r"o_proj\.weight of shape \(32, 48\) needs a \(2, 6\) inverse scale for 16x8 blocks"),
        ("orphan_scale", r"lm_head\.weight_scale_inv is an inverse scale for a weight stored as torch\.float32"),
        ("method", r"quantization_config \{'quant_method': 'awq'\} is not supported"),
        ("block", r"weight_block_size must be two positive integers like \[128, 128\] \(got \[128\]\)"),
    ],
)
def test_inconsistent_fp8_checkpoints_are_named(tmp_path, damage, expect):
    _, state, _, path = _fp8_dir(tmp_path, (16, 8))
    key = "model.layers.0.self_attn.o_proj.weight"
    cfg = json.loads((path / "config.json").read_text())
    if damage == "drop_scale":
        del state[key + "_scale_inv"]
    elif damage == "bad_scale":
        state[key + "_scale_inv"] = torch.ones(3, 3)
    elif damage == "orphan_scale":
        state["lm_head.weight_scale_inv"] = torch.ones(1, 1)
    elif damage == "method":
        cfg["quantization_config"] = {"quant_method": "awq"}
    else:
        cfg["quantization_config"]["weight_block_size"] = [128]
    save_file(state, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=expect):
        load_model(path)


# ----------------------------------------------------------------------------- bad inputs: one line each


def _native_dir(tmp_path, tokenizer=None):
    torch.manual_seed(0)
    return save_model(
        DeepseekV3(tiny_model_config(300, num_nextn_predict_layers=1)), tmp_path / "ck", tokenizer=tokenizer
    )


def _damage(path, how: str):
    f = path / "model.safetensors"
    if how == "truncated weights":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "missing shard":
        (path / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "metadata": {},
                    "weight_map": {
                        "model.embed_tokens.weight": "model.safetensors",
                        "lm_head.weight": "model-00002-of-00002.safetensors",
                    },
                }
            )
        )
    elif how == "corrupt index":
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    elif how == "weights of another shape":
        state = load_file(f)
        state["model.norm.weight"] = torch.ones(7)
        save_file(state, f)
    elif how == "integer weights":
        state = load_file(f)
        state["model.norm.weight"] = state["model.norm.weight"].long()
        save_file(state, f)
    elif how == "config not an object":
        (path / "config.json").write_text("[1, 2]")
    elif how == "a million layers":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**6}))


@pytest.mark.parametrize(
    "how, expect",
    [
        ("truncated weights", "model.safetensors is corrupt or truncated"),
        ("missing shard", "model-00002-of-00002.safetensors is missing"),
        ("corrupt index", "model.safetensors.index.json is corrupt"),
        ("weights of another shape", "model.norm.weight has shape (7,), config.json implies (32,)"),
        ("integer weights", "model.norm.weight is stored as torch.int64"),
        ("config not an object", "config.json holds a JSON list"),
        (
            "a million layers",
            "model.safetensors stores layers 0..3 (4 in all), config.json says num_hidden_layers 1000000",
        ),
    ],
)
def test_info_names_a_damaged_directory_in_one_line(tmp_path, capsys, how, expect):
    path = _native_dir(tmp_path)
    _damage(path, how)
    capsys.readouterr()
    assert main(["info", str(path)]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("r1lab info: ") and expect in lines[0], lines


@pytest.mark.parametrize(
    "key, value, expect",
    [
        ("hidden_size", "big", "hidden_size must be an integer (got 'big')"),
        ("num_hidden_layers", [3], "num_hidden_layers must be an integer (got [3])"),
        ("vocab_size", None, "vocab_size must be an integer (got None)"),
        ("rms_norm_eps", "1e-6", "rms_norm_eps must be a number (got '1e-6')"),
        ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false (got 'yes')"),
        ("eos_token_id", "</s>", "eos_token_id must be an integer or a list of integers or null (got '</s>')"),
        ("rope_scaling", "yarn", "rope_scaling must be an object"),
        ("rope_parameters", 5, "rope_parameters must be an object"),
        ("quantization_config", "fp8", "quantization_config 'fp8' is not supported"),
        ("torch_dtype", ["bf16"], "torch_dtype must be a dtype name like \"bfloat16\" (got ['bf16'])"),
    ],
)
@pytest.mark.parametrize("command", ["info", "generate"])
def test_wrong_typed_config_values_are_one_line_naming_key_value_and_file(
    tmp_path, capsys, tiny_tokenizer, command, key, value, expect
):
    path = _native_dir(tmp_path, tiny_tokenizer)
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    argv = ["info", str(path)] if command == "info" else ["generate", str(path), "--prompt", "hi"]
    assert main(argv) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"r1lab {command}: "), lines
    assert str(path / "config.json") in lines[0] and expect in lines[0], lines


def test_info_counts_what_loads_for_transformers_and_fp8_checkpoints(tmp_path, capsys):
    _hf_model().save_pretrained(tmp_path / "hf")
    assert main(["info", str(tmp_path / "hf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_mtp"] == 0 and info["params_stored"] == info["params_total"]  # loaded without the MTP module

    m, state, _, path = _fp8_dir(tmp_path, (16, 8))
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_stored"] == sum(v.numel() for v in m.state_dict().values())  # scales are not parameters
    assert info["params_total"] + info["params_mtp"] == info["params_stored"]


def test_a_legacy_rope_scaling_wins_over_rope_parameters_as_in_transformers():
    """A config.json with both keys: transformers applies `rope_scaling` (YaRN); so must r1lab, or the same
    checkpoint gives different logits in the two."""
    import transformers

    from r1lab.model.config import ModelConfig

    d = {
        "model_type": "deepseek_v3",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "n_routed_experts": 4,
        "n_group": 2,
        "topk_group": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    }
    ours = ModelConfig.from_hf_dict(d).rope_scaling
    theirs = transformers.DeepseekV3Config(**{k: v for k, v in d.items() if k != "model_type"}).rope_parameters
    assert ours["rope_type"] == theirs["rope_type"] == "yarn" and ours["factor"] == theirs["factor"] == 4.0


def test_output_cut_short_by_the_reader_is_no_traceback():
    import subprocess
    import sys

    proc = subprocess.run(
        f"{sys.executable} -m r1lab.cli cost deepseek-v3-671b --json | head -2",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.startswith("{") and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
