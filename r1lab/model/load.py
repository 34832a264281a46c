"""Load any model directory: r1lab's native DeepSeek-V3 or any `transformers` causal LM, with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from r1lab.model.checkpoint import CheckpointError, is_native, load_model, read_config, recover


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{path} has no tokenizer files (tokenizer.json); save the tokenizer with the model")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {e}") from None


def load_hf_model(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32, **kw):
    """A `transformers` causal LM from a local directory or, when online, a hub name."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    except OSError as e:
        raise CheckpointError(f"cannot load a transformers causal LM from {path}: {e}") from None
    return model.to(device).eval()


def load_model_and_tokenizer(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer). DeepSeek-V3 directories run on r1lab's native architecture; others on transformers."""
    local = Path(path)
    if local.exists() or recover(local).exists():
        read_config(local)  # names a missing or corrupt config.json before anything else
        tokenizer = load_tokenizer(local)
        if is_native(local):
            return load_model(local, device=device, dtype=dtype), tokenizer
        return load_hf_model(local, device=device, dtype=dtype), tokenizer
    if "/" in str(path) and not str(path).startswith((".", "/")):  # looks like a hub name
        return load_hf_model(path, device=device, dtype=dtype), load_tokenizer(path)
    raise CheckpointError(f"model directory not found: {path}")


def model_info(path: str | Path) -> dict:
    """Total and activated parameters and KV-cache bytes per token (at the checkpoint's dtype) of a model
    directory, from its config.json, beside the count of the tensors actually stored (total + MTP modules)."""
    import json

    from safetensors import safe_open

    from r1lab import cost

    path = recover(Path(path))
    cfg = read_config(path)
    counts = cost.parameter_counts(cfg)
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(cfg.get("dtype", cfg.get("torch_dtype", "float32"))), 4)
    kv = cost.kv_cache_bytes_per_token(cfg, bytes_per_value=dtype_bytes)
    stored = 0
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    for name in files:
        if (path / name).is_file():
            with safe_open(path / name, "pt") as f:
                for k in f.keys():
                    n = 1
                    for d in f.get_slice(k).get_shape():
                        n *= d
                    stored += n
    return {"model_type": cfg.get("model_type"), "params_total": counts["params_total"],
            "params_active": counts["params_active"], "params_mtp": counts["params_mtp"],
            "params_stored": stored, **kv, "kv_bytes_per_value": dtype_bytes}
