"""The r1lab command: generate, info, and subcommands that are not there yet."""

from __future__ import annotations

import json

from r1lab.cli import main
from r1lab.cost import parameter_counts
from r1lab.model.load import load_model_and_tokenizer
from r1lab.sampler import Sampler, SamplingParams


def test_generate_json_matches_the_sampler(tiny_native_dir, capsys):
    assert (
        main(["generate", str(tiny_native_dir), "--prompt", "What is 3 + 4?", "--max-new-tokens", "12", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "token_ids", "finish_reason"}
    model, tok = load_model_and_tokenizer(tiny_native_dir)
    ref = Sampler(model, tok).generate(["What is 3 + 4?"], SamplingParams(max_new_tokens=12, temperature=0))[0]
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text and out["finish_reason"] == ref.finish_reason


def test_generate_with_sampling_is_reproducible_by_seed(tiny_native_dir, capsys):
    args = [
        "generate",
        str(tiny_native_dir),
        "--prompt",
        "1",
        "--max-new-tokens",
        "10",
        "--temperature",
        "1",
        "--top-p",
        "0.9",
        "--seed",
        "5",
        "--json",
    ]
    main(args)
    a = json.loads(capsys.readouterr().out)
    main(args)
    assert json.loads(capsys.readouterr().out) == a


def test_generate_on_a_transformers_model_directory(tmp_path, tiny_tokenizer, capsys):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tiny_tokenizer.save_pretrained(tmp_path / "llama")
    assert main(["generate", str(tmp_path / "llama"), "--prompt", "hi", "--max-new-tokens", "5", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 5


def test_generate_on_a_missing_directory_names_it(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope" in capsys.readouterr().err


def test_info_reports_parameters_and_latent_cache(tiny_native_dir, capsys):
    assert main(["info", str(tiny_native_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = json.loads((tiny_native_dir / "config.json").read_text())
    assert info["params_total"] + info["params_mtp"] == info["params_stored"]  # formula == tensors on disk
    assert info["params_mtp"] > 0
    assert info["params_active"] < info["params_total"]
    assert info["params_total"] == parameter_counts(cfg)["params_total"]
    assert (
        info["kv_cache_bytes_per_token"]
        == cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
    )


def test_a_bad_allocator_setting_is_named_before_anything_runs(tiny_native_dir, monkeypatch, capsys):
    monkeypatch.setenv("R1LAB_MALLOC", "jemalloc")
    assert main(["info", str(tiny_native_dir)]) == 2
    err = capsys.readouterr().err
    assert "R1LAB_MALLOC must be 'tuned' (the default) or 'system'" in err and "'jemalloc'" in err
