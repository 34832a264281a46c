"""Generated tokens per second: r1lab's sampler against `transformers` `generate`, same model, same prompts.

The model (bench/models.py: random weights, speed does not depend on them) is saved once and loaded by both: the
tiny default DeepSeek-V3 (r1lab runs it natively, transformers as DeepseekV3ForCausalLM) or a Qwen2 (both run the
transformers modules; r1lab through FastDecoder), at the main job's size or about 0.5B (--size 0.5b, for GPUs).
Both sample at temperature 1 and are
forced to produce exactly --new-tokens tokens (no early stop), so tokens/s compare like for like. After a warm-up
the two engines alternate for --repeats runs, run r sampling with seed r in both; the figures are the medians
(the sampled tokens route the MoE differently from run to run, so a best-of would pick whichever engine drew the
cheapest routing). Before timing, the process's malloc policy is fixed (`r1lab.runtime.settle_allocator`, as
the `r1lab` command does): under glibc's moving defaults transformers' speed at batch 64 varied by 1.4x from run
to run, and it stayed below its speed under the fixed policy.

    python bench/sampler.py [--model native|qwen2] [--size tiny|0.5b] [--batches 1 64] [--new-tokens 64]
                            [--threads 2] [--device cpu] [--dtype float32] [--out bench/results/sampler.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from record import versions, write_json

from r1lab.runtime import settle_allocator
from r1lab.sampler import Sampler, SamplingParams
from r1lab.tasks import get_task
from r1lab.tokenizer import render_prompt


def build(tmp: Path, kind: str = "native", size: str = "tiny"):
    import models

    tok = models.build_tokenizer()
    model = (models.native if kind == "native" else models.qwen2)(tok, size)
    models.save(model, tok, tmp / kind)
    prompts = [render_prompt(tok, p.prompt, "r1") for p in get_task("arithmetic").problems("test", n=64, seed=1)]
    return tmp / kind, tok, prompts, models.describe(model)


def time_r1lab(model, tok, prompts, new_tokens, seed: int) -> float:
    sampler = Sampler(model, tok, eos_ids=[])  # no early stop: exactly new_tokens each
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=seed)
    t0 = time.perf_counter()
    outs = sampler.generate(prompts, params)
    dt = time.perf_counter() - t0
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return dt


def time_hf(model, tok, prompts, new_tokens, seed: int) -> float:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    torch.manual_seed(seed)  # generate samples from the global generator
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=None,
        )
    if out.is_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert out.shape[1] - enc.input_ids.shape[1] == new_tokens
    return dt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="native", choices=["native", "qwen2"])
    ap.add_argument("--size", default="tiny", choices=["tiny", "0.5b"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16 (the weights of both)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/sampler.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = settle_allocator()  # the same policy as the r1lab command's, for both systems
    transformers.logging.set_verbosity_error()
    from r1lab.model.load import load_model_and_tokenizer
    from r1lab.runtime import parse_dtype, pick_device

    device, dtype = pick_device(args.device), parse_dtype(args.dtype)
    with tempfile.TemporaryDirectory() as d:
        path, tok, prompts, described = build(Path(d), args.model, args.size)
        ours, tok = load_model_and_tokenizer(path, device=device, dtype=dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        rows = []
        for B in args.batches:
            batch = (prompts * (B // len(prompts) + 1))[:B]
            time_r1lab(ours, tok, batch[:2], 4, 0)
            time_hf(hf, tok, batch[:2], 4, 0)  # warm-up
            t_ours, t_hf = [], []
            for seed in range(args.repeats):
                t_ours.append(time_r1lab(ours, tok, batch, args.new_tokens, seed))
                t_hf.append(time_hf(hf, tok, batch, args.new_tokens, seed))
            tokens, med = B * args.new_tokens, statistics.median
            row = {
                "batch": B,
                "new_tokens": args.new_tokens,
                "r1lab_tokens_per_s": tokens / med(t_ours),
                "transformers_tokens_per_s": tokens / med(t_hf),
                "speedup": med(t_hf) / med(t_ours),
                "speedup_best": min(t_hf) / min(t_ours),
                "r1lab_seconds": t_ours,
                "transformers_seconds": t_hf,
            }
            rows.append(row)
            print(
                f"batch {B:3d}: r1lab {row['r1lab_tokens_per_s']:8.0f} tok/s   transformers generate "
                f"{row['transformers_tokens_per_s']:8.0f} tok/s   r1lab is {row['speedup']:.2f}x "
                f"(median; best of each {row['speedup_best']:.2f}x)",
                flush=True,
            )
    result = {
        "benchmark": "sampler",
        "model": args.model,
        "size": args.size,
        **described,
        "device": str(device),
        "dtype": args.dtype,
        "threads": args.threads,
        "results": rows,
        "allocator": allocator,
        "versions": versions("torch", "transformers"),
        "machine": platform.processor() or platform.machine(),
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
