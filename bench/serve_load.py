"""Serving under load: N concurrent streaming clients against the same requests sent one at a time.

The server runs in this process (uvicorn on a thread, the engine on another) over the tiny default DeepSeek-V3
(random weights: speed does not depend on them), and the clients are async httpx streams on the main thread. Every
request asks for exactly --max-tokens tokens (`ignore_eos`), so both modes generate the same work. Reported per
mode: requests/s, generated tokens/s, p50/p99 latency, p50/p99 time to first token, errors; and the throughput
ratio concurrent / one-at-a-time, which is what continuous batching buys.

    python bench/serve_load.py [--clients 32] [--requests-per-client 2] [--max-tokens 64] [--threads 1]
                               [--out bench/results/serve_load.json]

--threads is torch's intra-op thread count for the engine; the default 1 leaves the second core of a 2-core
machine to the HTTP server and the clients, which share this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from record import versions, write_json

from r1lab.model.checkpoint import save_model
from r1lab.model.config import tiny_config
from r1lab.model.deepseek import DeepseekV3
from r1lab.serve.app import BackgroundServer, create_app
from r1lab.serve.engine import EngineStats, wait_idle
from r1lab.tokenizer import train_tokenizer


def build_model(tmp: Path) -> Path:
    """The tiny default model with a tokenizer trained on worked arithmetic, saved as a model directory."""
    texts = [
        f"What is {a} + {b}? <think> {a} plus {b} is {a + b} </think> <answer> {a + b} </answer>"
        for a in range(0, 200, 7)
        for b in range(0, 200, 11)
    ]
    tok = train_tokenizer(texts, vocab_size=512)
    torch.manual_seed(0)
    model = DeepseekV3(
        tiny_config(
            len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
    )
    return save_model(model, tmp / "tiny", tokenizer=tok)


async def one_request(client, url: str, body: dict) -> dict:
    """One streamed chat completion: latency to the last byte, time to the first generated text, tokens."""
    t0 = time.perf_counter()
    ttft, tokens, error = None, 0, None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = chunk["error"]["message"]
                        break
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if ttft is None and any(
                        c["delta"].get("content") or c["delta"].get("reasoning_content") for c in chunk["choices"]
                    ):
                        ttft = time.perf_counter() - t0
    except Exception as e:  # a dropped connection or a timeout counts as an error, not a crash of the bench
        error = f"{type(e).__name__}: {e}"
    if error is None and tokens == 0:
        error = "no usage chunk"
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens, "error": error}


async def run_mode(base: str, clients: int, per_client: int, max_tokens: int) -> tuple[float, list[dict]]:
    import httpx

    url = base + "/v1/chat/completions"

    def body(i: int, k: int) -> dict:
        return {
            "messages": [{"role": "user", "content": f"What is {17 * i + k} + {3 * k + i}?"}],
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "seed": 1000 * i + k,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, body(0, 0))  # warm-up: first-call allocations, connection setup

        async def worker(i: int) -> list[dict]:
            return [await one_request(client, url, body(i, k)) for k in range(per_client)]

        t0 = time.perf_counter()
        results = await asyncio.gather(*[worker(i) for i in range(clients)])
        wall = time.perf_counter() - t0
    return wall, [r for rs in results for r in rs]


def summarize(wall: float, results: list[dict], stats: EngineStats) -> dict:
    ok = [r for r in results if r["error"] is None]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([float("nan")])
    ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None]) if ok else np.array([float("nan")])
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r["error"] for r in results if r["error"]})[:5],
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "latency_p50_s": round(float(np.percentile(lat, 50)), 4),
        "latency_p99_s": round(float(np.percentile(lat, 99)), 4),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4),
        "ttft_p99_s": round(float(np.percentile(ttft, 99)), 4),
        "engine": {
            "steps": stats.steps,
            "prefills": stats.prefills,
            "max_requests_in_one_step": stats.max_jobs_in_step,
            "mean_rows_per_step": round(stats.tokens / max(stats.steps, 1), 2),
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see the docstring)")
    ap.add_argument("--model", default=None, help="serve this model directory instead of the tiny default")
    ap.add_argument("--out", default="bench/results/serve_load.json")
    args = ap.parse_args()
    if args.clients < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        ap.error("--clients, --requests-per-client and --max-tokens must be >= 1")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model(Path(tmp))
        app = create_app(model_dir, model_name="tiny", max_batch=args.max_batch)
        engine = app.state.service.engine
        with BackgroundServer(app) as server:
            total = args.clients * args.requests_per_client
            modes = {}
            for name, clients, per_client in (
                ("one_at_a_time", 1, total),
                ("concurrent", args.clients, args.requests_per_client),
            ):
                wait_idle(engine, 60)
                engine.stats = stats = EngineStats()
                wall, results = asyncio.run(run_mode(server.url, clients, per_client, args.max_tokens))
                modes[name] = {"clients": clients, **summarize(wall, results, stats)}
                m = modes[name]
                print(
                    f"{name:>14}: {m['requests']} requests from {clients} client(s) in {m['wall_s']:.1f} s: "
                    f"{m['requests_per_s']:.2f} req/s, {m['tokens_per_s']:.0f} tok/s, latency p50 "
                    f"{m['latency_p50_s']:.3f} s p99 {m['latency_p99_s']:.3f} s, TTFT p50 {m['ttft_p50_s']:.3f} s, "
                    f"errors {m['errors']}, up to {m['engine']['max_requests_in_one_step']} requests per step",
                    flush=True,
                )

    ratio = modes["concurrent"]["requests_per_s"] / max(modes["one_at_a_time"]["requests_per_s"], 1e-9)

    report = {
        "benchmark": "serve_load",
        "model": args.model or "tiny default DeepSeek-V3 (random weights)",
        "max_tokens": args.max_tokens,
        "clients": args.clients,
        "requests_per_client": args.requests_per_client,
        "max_batch": args.max_batch,
        "torch_threads": torch.get_num_threads(),
        "modes": modes,
        "throughput_ratio": round(ratio, 2),
        "targets": {"zero_errors_concurrent": modes["concurrent"]["errors"] == 0, "ratio_at_least_4": ratio >= 4},
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": versions("torch", "transformers", "fastapi", "uvicorn"),
    }
    print(f"throughput ratio (concurrent / one at a time): {ratio:.2f}x")
    write_json(args.out, report)
    return 0 if report["targets"]["zero_errors_concurrent"] else 1


if __name__ == "__main__":
    sys.exit(main())
