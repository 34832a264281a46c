"""Model directories: `config.json` + `model.safetensors` (+ tokenizer files), written atomically, read safely.

A write goes to a temporary sibling directory that replaces the target only once complete, so a crash leaves
the previous checkpoint whole. Nothing is unpickled: weights are safetensors, optimiser state is loaded with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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
            os.rename(path, old)  # the window between these two renames is covered by `recover`
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


def save_model(
    model: DeepseekV3,
    path: str | Path,
    tokenizer=None,
    extra: dict[str, object] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a native model (and tokenizer) as a directory that r1lab and `transformers` both load; `state_dict`,
    when given, replaces the model's own (whole weights gathered from FSDP shards)."""

    def fill(tmp: Path):
        model.config.save(tmp / "config.json")
        weights = model.state_dict() if state_dict is None else state_dict
        state = to_disk_names({k: v.detach().contiguous().cpu() for k, v in weights.items()})
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        gen = {
            "bos_token_id": model.config.bos_token_id,
            "eos_token_id": model.config.eos_token_id,
            "pad_token_id": model.config.pad_token_id,
        }
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
    if path.is_file() and path.suffix == ".gguf":
        raise CheckpointError(f"{path} is a GGUF file; make it a model directory first: r1lab import-gguf {path} DIR")
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file; give the model directory that holds it ({path.parent})"
            if path.name == "config.json" or path.suffix == ".safetensors"
            else f"{path} is a file, not a model directory (config.json, model.safetensors, tokenizer)"
        )
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: a model directory needs config.json (and model.safetensors)")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is corrupt ({e}); restore it or re-save the model") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {f} ({e.strerror}); check its permissions") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{f} holds a JSON {type(cfg).__name__}, not an object of settings; restore it or re-save the model"
        )
    return cfg


def is_native(path: str | Path) -> bool:
    """True for a DeepSeek-V3 directory, which r1lab runs with its own architecture."""
    return read_config(path).get("model_type") == "deepseek_v3"


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a directory: the shards named in model.safetensors.index.json,
    else model.safetensors."""
    index = path / "model.safetensors.index.json"
    names = ["model.safetensors"]
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is corrupt ({type(e).__name__}: {e}); re-save the model") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {index} ({e.strerror}); check its permissions") from None
        if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise CheckpointError(
                f"{index} names shards that are not file names in the directory ({names[:3]}); re-save the model"
            )
    for name in names:
        if not (path / name).is_file():
            raise CheckpointError(
                f"{path / name} is missing; the model directory is incomplete (re-save or re-download it)"
            )
    return [path / name for name in names]


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _read_header(f: Path) -> dict[str, torch.Tensor]:
    """A file's tensors as meta tensors of the stored shapes and dtypes (safe_open checks that the header covers
    the whole file, so a truncated file fails here too)."""
    out = {}
    with safe_open(f, "pt") as fh:
        for k in fh.keys():
            s = fh.get_slice(k)
            if s.get_dtype() not in _DTYPES:
                raise ValueError(f"{k} is stored as {s.get_dtype()}, a dtype r1lab does not read")
            out[k] = torch.empty(s.get_shape(), dtype=_DTYPES[s.get_dtype()], device="meta")
    return out


def read_weights(path: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a directory (see `weight_files`). meta=True reads the headers only: tensors on the meta device
    with the stored shapes and dtypes, enough to check a checkpoint without loading it."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        try:
            part = _read_header(f) if meta else load_file(f)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is corrupt or truncated ({e}); restore it from a good copy") from None
        twice = sorted(state.keys() & part.keys())
        if twice:
            raise CheckpointError(f"{f} stores {twice[0]} again (another shard has it); re-save the model")
        state.update(part)
    return state


# ----------------------------------------------------------------------------- DeepSeek's FP8 release


def fp8_block_size(cfg: dict, config_file: Path) -> tuple[int, int] | None:
    """The weight block of DeepSeek's FP8 format from config.json's `quantization_config` ([128, 128] in the
    release; 128x128 when the key is absent, None for one scale per tensor)."""
    q = cfg.get("quantization_config")
    if q is None:
        return (128, 128)
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        raise CheckpointError(
            f"{config_file}: quantization_config {q!r} is not supported; r1lab reads unquantised "
            "weights and DeepSeek's block FP8 (quant_method 'fp8'); dequantise the model first"
        )
    block = q.get("weight_block_size", [128, 128])
    if block is None:
        return None
    if not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise CheckpointError(
            f"{config_file}: quantization_config.weight_block_size must be two positive integers "
            f"like [128, 128] (got {block!r})"
        )
    return block[0], block[1]


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """DeepSeek's `weight_dequant`: each [bm, bn] block of the FP8 weight times its float32 inverse scale
    (scale_inv is [ceil(out/bm), ceil(in/bn)]; edge blocks are the remainders), in float32."""
    M, N = weight.shape
    if weight.is_meta:  # headers only (`r1lab info`): the shape is all there is
        return torch.empty(M, N, device="meta")
    bm, bn = block or (M, N)
    s = scale_inv.float().reshape(-(-M // bm), -(-N // bn))
    return weight.float() * s.repeat_interleave(bm, 0)[:M].repeat_interleave(bn, 1)[:, :N]


def dequantize_fp8(
    state: dict[str, torch.Tensor], block: tuple[int, int] | None, where: Path
) -> dict[str, torch.Tensor]:
    """Replace every FP8 weight and its `{name}_scale_inv` by the float32 weight they encode; other tensors pass."""
    out = {}
    for k, v in state.items():
        if k.endswith("_scale_inv"):
            w = state.get(k[: -len("_scale_inv")])
            if w is None or w.dtype not in _FP8:
                what = "no weight" if w is None else f"a weight stored as {w.dtype}, not FP8"
                raise CheckpointError(
                    f"{where}: {k} is an inverse scale for {what}; the checkpoint is inconsistent "
                    "(restore it or re-download it)"
                )
            continue
        if v.dtype not in _FP8:
            out[k] = v
            continue
        s = state.get(k + "_scale_inv")
        if s is None:
            raise CheckpointError(
                f"{where}: {k} is FP8 but {k}_scale_inv is not stored; the checkpoint is incomplete "
                "(restore it or re-download it)"
            )
        if v.dim() != 2:
            raise CheckpointError(
                f"{where}: {k} is FP8 with shape {tuple(v.shape)}; DeepSeek's format quantises "
                "matrices only (restore the checkpoint)"
            )
        bm, bn = block or tuple(v.shape)
        blocks = (-(-v.shape[0] // bm), -(-v.shape[1] // bn))
        if s.numel() != blocks[0] * blocks[1] or (s.dim() == 2 and tuple(s.shape) != blocks):
            raise CheckpointError(
                f"{where}: {k} of shape {tuple(v.shape)} needs a {blocks} inverse scale for "
                f"{bm}x{bn} blocks (quantization_config.weight_block_size), got {tuple(s.shape)}"
            )
        out[k] = dequantize_block_fp8(v, s, block)
    return out


def to_disk_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split stacked experts into DeepSeek's per-expert tensors (`mlp.experts.{e}.gate_proj.weight`, ...)."""
    out = {}
    for k, v in state.items():
        if k.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, D]
            base = k[: -len("gate_up_proj")]
            for e, w in enumerate(v):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = (
                    t.contiguous() for t in w.chunk(2, dim=0)
                )
        elif k.endswith("mlp.experts.down_proj"):  # [E, D, I]
            base = k[: -len("down_proj")]
            for e, w in enumerate(v):
                out[f"{base}{e}.down_proj.weight"] = w.contiguous()
        else:
            out[k] = v
    return out


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def to_native_names(
    state: dict[str, torch.Tensor], cfg: ModelConfig, where: Path | str = "model.safetensors"
) -> dict[str, torch.Tensor]:
    """Stack per-expert tensors into r1lab's layout (fused files pass through), and drop the MTP module's copies
    of the shared embedding and head (DeepSeek's released checkpoints carry them)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict] = {}
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
                [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(n)]
            )
            out[base + "down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n)])
        except KeyError as e:
            e_, part = e.args[0]
            raise CheckpointError(f"{where}: expert weights incomplete: {base}{e_}.{part}.weight is missing") from None
        except RuntimeError as e:  # experts of different shapes
            raise CheckpointError(
                f"{where}: expert weights under {base} differ in shape ({e}); restore the checkpoint"
            ) from None
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def native_config(path: Path, cfg_dict: dict) -> ModelConfig:
    """The ModelConfig of a native directory; a wrong value in config.json (quantization_config included) is one
    CheckpointError naming it."""
    fp8_block_size(cfg_dict, path / "config.json")
    for key in ("dtype", "torch_dtype"):
        if not isinstance(cfg_dict.get(key, ""), str):
            raise CheckpointError(
                f'{path / "config.json"}: {key} must be a dtype name like "bfloat16" '
                f"(got {cfg_dict[key]!r}); correct it in config.json"
            )
    try:
        return ModelConfig.from_hf_dict(cfg_dict)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}; correct it in config.json") from None


def mtp_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """Where DeepSeek stores the MTP modules: the layers after the last main one (`model.layers.{L + k}.`)."""
    L = cfg.num_hidden_layers
    return tuple(f"model.layers.{L + k}." for k in range(cfg.num_nextn_predict_layers))


def check_native(path: Path, cfg_dict: dict, stored: dict[str, torch.Tensor]) -> tuple[DeepseekV3, dict]:
    """The model a native directory describes (on the meta device) and its stored tensors in r1lab's names, checked
    against it: FP8 blocks dequantised, an MTP module that was never saved left out, every name and shape matched.
    `stored` may be meta tensors (headers only), so `r1lab info` runs the same checks without loading weights."""
    cfg = native_config(path, cfg_dict)
    weights = path / (
        "model.safetensors.index.json" if (path / "model.safetensors.index.json").is_file() else "model.safetensors"
    )
    state = dequantize_fp8(stored, fp8_block_size(cfg_dict, path / "config.json"), weights)
    layers = {int(m.group(1)) for m in map(_LAYER.match, state) if m}
    L = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and layers == set(range(L)):
        # transformers builds DeepSeek-V3 without the MTP module yet keeps num_nextn_predict_layers: 1 in config.json
        print(
            f"r1lab: {path} stores no multi-token-prediction weights (model.layers.{L}.*); "
            f"loading without the MTP module (num_nextn_predict_layers {cfg.num_nextn_predict_layers} -> 0)",
            file=sys.stderr,
        )
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    if layers != set(range(L + cfg.num_nextn_predict_layers)):  # checked before building, say, 10^6 layers
        held = f"layers {min(layers)}..{max(layers)} ({len(layers)} in all)" if layers else "no layers"
        raise CheckpointError(
            f"{weights} stores {held}, config.json says num_hidden_layers {L} + "
            f"num_nextn_predict_layers {cfg.num_nextn_predict_layers}; "
            "the weights and config.json belong to different models"
        )
    state = to_native_names(state, cfg, weights)
    try:
        with torch.device("meta"):
            model = DeepseekV3(cfg)
    except (RuntimeError, OverflowError) as e:  # sizes too large even to describe
        raise CheckpointError(
            f"{path / 'config.json'} describes a model that cannot be built ({e}); correct config.json"
        ) from None
    expected = model.state_dict()
    missing = [
        k
        for k in expected
        if k not in state
        and not (cfg.tie_word_embeddings and k == "lm_head.weight")
        and not k.endswith("e_score_correction_bias")
    ]
    unexpected = [k for k in state if k not in expected]
    mtp_missing = [k for k in missing if k.startswith(mtp_prefixes(cfg))]
    if mtp_missing and len(mtp_missing) == len(missing) and not unexpected:
        raise CheckpointError(
            f"{weights}: the multi-token-prediction module ({', '.join(p + '*' for p in mtp_prefixes(cfg))}) is "
            f"incomplete: {len(mtp_missing)} tensors missing ({', '.join(mtp_missing[:3])}"
            f"{', ...' if len(mtp_missing) > 3 else ''}); restore the files, or remove all its tensors "
            "to load without it"
        )
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match {path / 'config.json'}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in state.items():
        if not v.dtype.is_floating_point:
            raise CheckpointError(
                f"{weights}: {k} is stored as {v.dtype}; model weights are floating point (restore the checkpoint)"
            )
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{weights}: {k} has shape {tuple(v.shape)}, config.json implies {tuple(expected[k].shape)}"
            )
    return model, state


def load_model(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> DeepseekV3:
    """Load a native DeepSeek-V3 directory: written by r1lab, by `transformers` (which saves no MTP weights: the
    model loads without the module), or as DeepSeek publishes it (MTP as the layer after the last, FP8 blocks)."""
    path = recover(Path(path))
    model, state = check_native(path, read_config(path), read_weights(path))
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
        why = " ".join(str(e).split())  # torch's unpickling messages span lines
        raise CheckpointError(
            f"{path} is corrupt or holds more than tensors ({type(e).__name__}: "
            f"{why if len(why) <= 200 else why[:197] + '...'}); restore it, or start over with "
            "--fresh"
        ) from None
