"""Load any model directory: r1lab's native DeepSeek-V3 or any `transformers` causal LM, with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError

from r1lab.model.checkpoint import (
    CheckpointError,
    check_native,
    is_native,
    load_model,
    native_config,
    read_config,
    read_weights,
    recover,
)


def _one_line(e: Exception) -> str:
    """transformers' and huggingface_hub's messages span lines; the command prints one."""
    return " ".join(str(e).split())


def hub_name(name: str) -> bool:
    """Whether a path that does not exist here reads as a Hugging Face hub name ('org/model')."""
    return name.count("/") == 1 and not name.startswith((".", "/"))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists() and not hub_name(str(path)):
        raise CheckpointError(f"tokenizer directory not found: {path}")
    if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{path} has no tokenizer files (tokenizer.json); save the tokenizer with the model")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers trips on bad config.json values in many ways
        raise CheckpointError(f"cannot load the tokenizer from {path}: {type(e).__name__}: {_one_line(e)}") from None


def load_hf_model(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32, **kw):
    """A `transformers` causal LM from a local directory or, when online, a hub name."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    except (OSError, ValueError, StrictDataclassError) as e:
        raise CheckpointError(f"cannot load a transformers causal LM from {path}: {_one_line(e)}") from None
    return model.to(device).eval()


def load_model_and_tokenizer(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer). DeepSeek-V3 directories run on r1lab's native architecture; others on transformers."""
    local = Path(path)
    if local.exists() or recover(local).exists():
        cfg = read_config(local)  # names a missing or corrupt config.json before anything else
        if cfg.get("model_type") == "deepseek_v3":
            native_config(recover(local), cfg)  # and a wrong value in it, which trips transformers' tokenizer loading
        tokenizer = load_tokenizer(local)
        if is_native(local):
            return load_model(local, device=device, dtype=dtype), tokenizer
        return load_hf_model(local, device=device, dtype=dtype), tokenizer
    if hub_name(str(path)):
        return load_hf_model(path, device=device, dtype=dtype), load_tokenizer(path)
    raise CheckpointError(f"model directory not found: {path}")


def model_info(path: str | Path) -> dict:
    """Total and activated parameters and KV-cache bytes per token (at the checkpoint's dtype) of a model
    directory, from its config.json, beside the count of the tensors actually stored (total + MTP modules).
    Only the weight files' headers are read, with the loader's checks: a file that would not load is named here."""
    from r1lab import cost

    path = recover(Path(path))
    cfg = read_config(path)
    stored = read_weights(path, meta=True)
    if cfg.get("model_type") == "deepseek_v3":
        model, _ = check_native(path, cfg, stored)
        sizes = {**model.config.to_hf_dict(), "model_type": cfg["model_type"]}  # as loaded: without an unsaved MTP
    else:
        sizes = cfg
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(
        str(cfg.get("dtype", cfg.get("torch_dtype", "float32"))), 4
    )
    try:
        counts = cost.parameter_counts(sizes)
        kv = cost.kv_cache_bytes_per_token(sizes, bytes_per_value=dtype_bytes)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # sizes of the wrong type in a non-native config
        raise CheckpointError(f"{path / 'config.json'}: cannot size the model ({e}); correct config.json") from None
    weights = sum(v.numel() for k, v in stored.items() if not k.endswith("_scale_inv"))  # FP8 scales are not parameters
    return {
        "model_type": cfg.get("model_type"),
        "params_total": counts["params_total"],
        "params_active": counts["params_active"],
        "params_mtp": counts["params_mtp"],
        "params_stored": weights,
        **kv,
        "kv_bytes_per_value": dtype_bytes,
    }
