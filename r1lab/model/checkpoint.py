"""Model directories: `config.json` + `model.safetensors` (+ tokenizer files), written atomically, read safely.

A write goes to a temporary sibling directory that replaces the target only once complete, so a crash leaves
the previous checkpoint whole. Nothing is unpickled: weights are safetensors, optimiser state is loaded with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from r1lab.model.config import ModelConfig
from r1lab.model.deepseek import DeepseekV3


class CheckpointError(RuntimeError):
    """A model directory that cannot be read; the message names the file and what to do."""


def atomic_dir(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call fill(tmp_dir), then move tmp_dir to `path`, replacing any previous directory only at the end."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = path.parent / f".{path.name}.old"
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(path, old)      # the window between these two renames is covered by `recover`
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def recover(path: str | Path) -> Path:
    """If a save was interrupted between its two renames, put the previous checkpoint back."""
    path = Path(path)
    old = path.parent / f".{path.name}.old"
    if not path.exists() and old.is_dir():
        os.rename(old, path)
    return path


def save_model(model: DeepseekV3, path: str | Path, tokenizer=None, extra: dict[str, object] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a native model (and tokenizer) as a directory that r1lab and `transformers` both load; `state_dict`,
    when given, replaces the model's own (whole weights gathered from FSDP shards)."""

    def fill(tmp: Path):
        model.config.save(tmp / "config.json")
        weights = model.state_dict() if state_dict is None else state_dict
        state = to_disk_names({k: v.detach().contiguous().cpu() for k, v in weights.items()})
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
               "pad_token_id": model.config.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            if isinstance(obj, (str, bytes)):
                (tmp / name).write_bytes(obj.encode() if isinstance(obj, str) else obj)
            else:
                torch.save(obj, tmp / name)

    return atomic_dir(path, fill)


def read_config(path: str | Path) -> dict:
    path = recover(Path(path))
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: a model directory needs config.json (and model.safetensors)")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is corrupt ({e}); restore it or re-save the model") from None


def is_native(path: str | Path) -> bool:
    """True for a DeepSeek-V3 directory, which r1lab runs with its own architecture."""
    return read_config(path).get("model_type") == "deepseek_v3"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory: one model.safetensors or shards listed in model.safetensors.index.json."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is corrupt ({e}); re-save the model") from None
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the model directory is incomplete (re-save or re-download it)")
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is corrupt or truncated ({e}); restore it from a good copy") from None
    return state


def to_disk_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split stacked experts into DeepSeek's per-expert tensors (`mlp.experts.{e}.gate_proj.weight`, ...)."""
    out = {}
    for k, v in state.items():
        if k.endswith("mlp.experts.gate_up_proj"):         # [E, 2I, D]
            base = k[: -len("gate_up_proj")]
            for e, w in enumerate(v):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = (
                    t.contiguous() for t in w.chunk(2, dim=0))
        elif k.endswith("mlp.experts.down_proj"):          # [E, D, I]
            base = k[: -len("down_proj")]
            for e, w in enumerate(v):
                out[f"{base}{e}.down_proj.weight"] = w.contiguous()
        else:
            out[k] = v
    return out


_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def to_native_names(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Stack per-expert tensors into r1lab's layout (fused files pass through), and drop the MTP module's copies
    of the shared embedding and head (DeepSeek's released checkpoints carry them)."""
    out, experts = {}, {}
    for k, v in state.items():
        m = _EXPERT.match(k)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = v
        elif k.endswith(".embed_tokens.weight") and k != "model.embed_tokens.weight":
            continue
        elif k.endswith(".shared_head.head.weight"):
            continue
        else:
            out[k] = v
    for base, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        try:
            out[base + "gate_up_proj"] = torch.stack(
                [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(n)])
            out[base + "down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n)])
        except KeyError as e:
            raise CheckpointError(f"expert weights incomplete under {base}: missing {e.args[0]}") from None
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    if any(k.endswith("weight_scale_inv") for k in out):
        raise CheckpointError("this checkpoint holds FP8 block-quantised weights (weight_scale_inv); "
                              "convert it to bf16 first (DeepSeek's fp8_cast_bf16.py)")
    return out


def load_model(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> DeepseekV3:
    """Load a native DeepSeek-V3 directory (written by r1lab or by `transformers`)."""
    path = recover(Path(path))
    cfg_dict = read_config(path)
    try:
        cfg = ModelConfig.from_hf_dict(cfg_dict)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    with torch.device("meta"):
        model = DeepseekV3(cfg)
    state = to_native_names(read_weights(path), cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    missing = [k for k in missing if not k.endswith("e_score_correction_bias")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path / 'model.safetensors'} does not match {path / 'config.json'}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{path / 'model.safetensors'}: {k} has shape {tuple(v.shape)}, "
                                  f"config.json implies {tuple(expected[k].shape)}")
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=False)
    model.init_buffers(loaded=state.keys())
    return model.cast(dtype).eval()


def save_state(obj: dict, path: str | Path) -> None:
    """Optimiser/scheduler/RNG state, written atomically (tensors and plain containers only)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, or an object that would need unpickling
        raise CheckpointError(f"{path} is corrupt or holds more than tensors ({type(e).__name__}: {e})") from None
