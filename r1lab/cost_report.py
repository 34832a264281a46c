"""`r1lab cost`: the command's report, from flags to one dict and from the dict to text. The maths is
r1lab.cost's; here are only what the flags combine into, their one-line errors, and the rendering."""

from __future__ import annotations

import re
from typing import Any

from r1lab.cost import (
    PRESETS,
    QUANT_BITS,
    GiB,
    _check_positive,
    inference_memory,
    load_config,
    parameter_counts,
    summary,
    training_cost,
)

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_quantity(text: str | float, name: str = "value") -> float:
    """'14.8T' -> 1.48e13, '2.788M' -> 2.788e6, '1e9' -> 1e9; a malformed value names the flag and the form."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([-+]?\d*\.?\d+(?:e[-+]?\d+)?)\s*([kmbgt]?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"{name} must be a number such as 14.8T, 2.788M or 1e9 (got {text!r})")
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1.0)


def report(
    model: Any = None,
    seq_len: int = 4096,
    batch: int = 1,
    tokens: str | float | None = None,
    gpu: str | None = None,
    gpu_hours: str | float | None = None,
    mfu: str | float | None = None,
    price: str | float | None = None,
    peak_dtype: str = "bf16",
    fits_gpu: str | None = None,
) -> dict:
    """What `r1lab cost` prints, as one dict; flag values may be strings with suffixes ('14.8T')."""
    from r1lab.hardware import find_gpu

    if model is None and fits_gpu is None:
        raise ValueError(
            f"give a model (a preset, a model directory or a config.json) or --fits GPU; presets: {', '.join(PRESETS)}"
        )
    _check_positive("--seq-len", seq_len)
    _check_positive("--batch", batch)
    tokens = None if tokens is None else parse_quantity(tokens, "--tokens")
    gpu_hours = None if gpu_hours is None else parse_quantity(gpu_hours, "--gpu-hours")
    mfu = None if mfu is None else parse_quantity(mfu, "--mfu")
    price = None if price is None else parse_quantity(price, "--price")
    if tokens is not None:  # the other values are checked where they are used (r1lab.cost.training_cost)
        _check_positive("--tokens", tokens)
    for flag, val in (("--gpu-hours", gpu_hours), ("--mfu", mfu)):
        if val is not None and gpu is None:
            raise ValueError(f"{flag} needs --gpu to know the peak FLOP/s (e.g. --gpu H800)")
        if val is not None and tokens is None:
            raise ValueError(f"{flag} needs --tokens (the training tokens, e.g. 14.8T)")
    if gpu is not None and gpu_hours is None and mfu is None:
        raise ValueError("--gpu needs --gpu-hours (to get the implied MFU) or --mfu (to get the GPU-hours needed)")
    if price is not None and gpu_hours is None and mfu is None:
        raise ValueError("--price needs --gpu-hours or --mfu (and --gpu, --tokens) to have GPU-hours to price")

    out: dict = {}
    if model is not None:
        out = summary(model, seq_len, batch)
        if tokens is not None:
            out["tokens"] = tokens
            out["training_flops"] = out["training_flops_per_token"] * tokens
        if gpu is not None:
            g = _gpu(find_gpu, gpu, "--gpu")
            peaks = {dt: g.peak_flops(dt) for dt in ("bf16", "fp8") if dt in g.peak_tflops}
            if peak_dtype not in peaks:
                peaks[peak_dtype] = g.peak_flops(peak_dtype)
            assert tokens is not None  # --gpu needs --gpu-hours or --mfu, and each of those needs --tokens (above)
            out.update(
                gpu=g.name,
                peak_flops=peaks,
                **training_cost(out["training_flops_per_token"], tokens, peaks, gpu_hours, mfu, price, peak_dtype),
            )
    if fits_gpu is not None:
        g = _gpu(find_gpu, fits_gpu, "--fits")
        names = [model] if model is not None else [n for n in PRESETS if n != "deepseek-r1"]
        rows = []
        for name in names:
            mem = inference_memory(name, seq_len, batch)
            rows.append(
                {
                    "model": load_config(name)[0],
                    "params_total": parameter_counts(name)["params_total"],
                    "memory_bytes": {q: m["total"] for q, m in mem.items()},
                    "fits": {q: m["total"] <= g.memory_bytes for q, m in mem.items()},
                }
            )
        out["fits"] = {
            "gpu": g.name,
            "gpu_memory_bytes": g.memory_bytes,
            "seq_len": seq_len,
            "batch": batch,
            "models": rows,
        }
    return out


def _gpu(find_gpu, name: str, flag: str):
    try:
        return find_gpu(name)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def _n(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.5g}{unit}"
    return f"{x:g}"


def _b(x: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:g} B"


def render(r: dict) -> str:
    """The report as text for a terminal."""
    lines = []
    if "params_total" in r:
        b, S = r["params_breakdown"], r["seq_len"]
        lines += [
            f"{r['model']}  ({r['model_type']}, {r['attention'].upper()} attention; {S}-token sequences)",
            "",
            "Parameters",
            f"  total (main model, no MTP)     {_n(r['params_total']):>10}",
        ]
        lines += [f"    {k:<28}{_n(v):>10}" for k, v in b.items() if k not in ("total", "mtp") and v]
        lines += [
            f"  activated per token            {_n(r['params_active']):>10}   "
            f"(embedding and lm_head counted; {_n(r['params_active_matmul'])} in matmuls)"
        ]
        if r["params_mtp"]:
            lines += [
                f"  MTP modules (own weights)      {_n(r['params_mtp']):>10}   (released checkpoint, with the "
                f"MTP copies of embedding and head: {_n(r['params_checkpoint'])})"
            ]
        attn = r["flops_per_token_attention"]
        lines += [
            "",
            f"FLOPs per token, forward         {r['flops_per_token'] / 1e9:.2f} GFLOP = 2 x "
            f"{_n(r['params_active_matmul'])} matmul weights + {attn / 1e9:.2f} GFLOP attention "
            f"(causal: {S}/2 keys)",
            f"  training                       {r['training_flops_per_token'] / 1e9:.2f} GFLOP = 3 x forward"
            f"{' (MTP modules included)' if r['params_mtp'] else ''}",
            "",
            f"KV cache per token (bf16)       {r['kv_cache_bytes_per_token']:,.0f} bytes = "
            f"{_b(r['kv_cache_bytes_per_token'])}"
            f"   (MHA equivalent {_b(r['kv_cache_bytes_per_token_mha'])}, "
            f"{r['kv_cache_bytes_per_token_mha'] / r['kv_cache_bytes_per_token']:.1f}x)",
        ]
        t = r["training_memory_bytes"]
        lines += [
            "",
            "Training memory (mixed-precision Adam, unsharded)",
            f"  weights bf16 {_b(t['weights'])}, gradients bf16 {_b(t['gradients'])}, optimizer fp32 master+m+v "
            f"{_b(t['optimizer'])}, activations ~{_b(t['activations'])}: total {_b(t['total'])}",
            "",
            f"Inference memory ({S} tokens of context, weights + bf16 KV cache + runtime overhead)",
        ]
        for q, m in r["inference_memory_bytes"].items():
            lines.append(
                f"  {q:<5} {_b(m['weights']):>11} + {_b(m['kv_cache'])} + {_b(m['overhead'])} = {_b(m['total'])}"
            )
    if "tokens" in r:
        lines += [
            "",
            f"Training: {_n(r['tokens'])} tokens x {r['training_flops_per_token'] / 1e9:.2f} GFLOP = "
            f"{r['training_flops']:.3e} FLOPs",
        ]
    if "gpu_hours" in r:
        peaks = r["peak_flops"]
        lines += [
            f"  on {r['gpu']}: {_n(r['gpu_hours'])} GPU-hours, {r['achieved_flops_per_gpu'] / 1e12:.1f} TFLOP/s "
            f"achieved per GPU"
        ]
        lines += [
            f"  MFU {r['mfu_by_peak'][dt]:.1%} of the {dt} dense peak ({p / 1e12:.1f} TFLOP/s)"
            for dt, p in peaks.items()
        ]
        if "fp8" in peaks:
            lines.append(
                "  (bf16 is the usual MFU convention; DeepSeek-V3 ran its GEMMs in FP8, so the fp8 figure "
                "is the share of what its kernels could reach)"
            )
        if r["cost_usd"] is not None:
            lines.append(
                f"  cost: {_n(r['gpu_hours'])} GPU-hours x ${r['price_per_gpu_hour']:.2f} = ${r['cost_usd'] / 1e6:.3f}M"
            )
    if "fits" in r:
        f = r["fits"]
        lines += [
            "",
            f"Inference on {f['gpu']} ({_b(f['gpu_memory_bytes'])}), {f['seq_len']} tokens of "
            f"context, batch {f['batch']}:",
            f"  {'model':<32}{'params':>9}" + "".join(f"{q:>16}" for q in QUANT_BITS),
        ]
        for row in f["models"]:
            cells = "".join(
                f"{_b(row['memory_bytes'][q]) + (' ok' if row['fits'][q] else ' no'):>16}" for q in QUANT_BITS
            )
            lines.append(f"  {row['model']:<32}{_n(row['params_total']):>9}{cells}")
    return "\n".join(lines).strip("\n")
