"""Import a GGUF file (llama.cpp's format) as a plain safetensors model directory with its tokenizer and chat template.

`transformers` reads GGUF with `gguf_file=` but keeps the model marked as quantized, and then refuses to train or
save it. Here the weights are unpacked to dense tensors, that state is dropped, and the result is written (and
read back) as an ordinary `transformers` directory that r1lab trains, samples from and serves like any other.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from r1lab.model.checkpoint import CheckpointError, atomic_dir


def load_gguf(file: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file: every weight dequantised, no quantization state left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    file = Path(file).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {file}")
    with open(file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{file} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:  # the gguf reader meets a cut-off file as an index or dtype error deep in numpy: name it here
        import gguf

        gguf.GGUFReader(file)
    except (ValueError, IndexError, KeyError, struct.error) as e:
        raise CheckpointError(
            f"{file} is truncated or corrupt: its header or tensor table does not read "
            f"({type(e).__name__}: {e}); download or export it again"
        ) from None
    where, name = str(file.parent), file.name
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(gguf_file=name, dequantize=True)
        )
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise CheckpointError(
            f"transformers cannot read {file}: {str(e).rstrip('.')}. GGUF import supports the "
            "architectures transformers lists for gguf_file (llama, mistral, qwen2, gemma, phi3, ...)"
        ) from None
    return drop_quantization(model).eval(), restore_digit_split(tok, file)


# llama.cpp's pre-tokenizer types that split off every digit before GPT-2's regex (src/llama-vocab.cpp), as the
# Digits(individual_digits) + ByteLevel pre-tokenizer of their tokenizer.json does; transformers builds them as a
# plain ByteLevel, which keeps runs of digits together.
DIGIT_SPLIT_PRE = ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva", "mellum2")


def restore_digit_split(tok, file: Path):
    """The tokenizer with its digits split one by one again where the GGUF's `tokenizer.ggml.pre` says so."""
    import gguf
    from tokenizers import pre_tokenizers

    field = gguf.GGUFReader(file).fields.get("tokenizer.ggml.pre")
    backend = getattr(tok, "backend_tokenizer", None)
    if field is None or field.contents() not in DIGIT_SPLIT_PRE or backend is None:
        return tok
    if type(backend.pre_tokenizer).__name__ != "ByteLevel":
        raise CheckpointError(
            f"{file}: tokenizer.ggml.pre {field.contents()!r} splits digits, but transformers "
            f"built a {type(backend.pre_tokenizer).__name__} pre-tokenizer that r1lab does not know "
            "how to fix"
        )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok


def drop_quantization(model):
    """The same model as an ordinary dense one: no quantizer, no quantization_config (so it trains and saves)."""
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    packed += [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:
        raise CheckpointError(
            f"{len(packed)} weights are still packed after loading (e.g. {packed[0]}); "
            "this transformers version did not dequantise them"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def import_gguf(file: str | Path, out: str | Path, dtype: str | torch.dtype = "float32", verify: bool = True) -> Path:
    """Write `file` as a model directory at `out` (config.json, model.safetensors, tokenizer files with the chat
    template, generation_config.json), atomically; with `verify`, it is loaded back and its logits checked before
    it replaces `out`."""
    from r1lab.runtime import parse_dtype

    dtype = parse_dtype(dtype)
    out = Path(out)
    if any(p.is_file() for p in out.resolve().parents):
        raise CheckpointError(f"{out} is inside a path that is a file; give a directory path to write")
    if out.exists() and not (out.is_dir() and ((out / "config.json").is_file() or not any(out.iterdir()))):
        raise CheckpointError(
            f"{out} exists and is not a model directory; import-gguf replaces OUT_DIR whole, so "
            "give a new path (or a model directory to overwrite)"
        )
    model, tok = load_gguf(file, dtype)

    def fill(tmp: Path):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if verify:
            verify_import(tmp, model, tok)

    return atomic_dir(out, fill)


def verify_import(path: Path, model, tok) -> None:
    """The written directory loads as a plain `transformers` model with the same next-token logits."""
    from transformers import AutoModelForCausalLM

    from r1lab.model.load import load_tokenizer

    back = AutoModelForCausalLM.from_pretrained(str(path), dtype=model.dtype).eval()
    if getattr(back, "hf_quantizer", None) is not None or hasattr(back.config, "quantization_config"):
        raise CheckpointError(
            f"the directory written for {path.name} still loads as a quantized model; this "
            "transformers version keeps GGUF state that r1lab does not know how to drop"
        )
    text = "The capital of France is"
    ids = load_tokenizer(path)(text, return_tensors="pt").input_ids
    if ids.tolist() != tok(text, return_tensors="pt").input_ids.tolist():
        raise CheckpointError(f"the tokenizer saved in {path} encodes differently from the GGUF's")
    with torch.no_grad():
        a, b = model(ids).logits, back(ids).logits
    if not torch.equal(a, b):
        raise CheckpointError(
            f"{path} reloads with different logits (max difference "
            f"{(a - b).abs().max().item():.3g}); the saved weights are incomplete"
        )
