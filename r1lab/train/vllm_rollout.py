"""vLLM as GRPO's rollout engine (`--rollout vllm`) for `transformers` policies on GPU, colocated and refreshed.

Optional, behind this one adapter: it needs CUDA, the `vllm` package and a transformers model (vLLM does not run
r1lab's native DeepSeek-V3 module); without them `check_available` fails at once with what to change, and nothing
else imports vllm. The engine lives in the training process and shares its GPU (`gpu_memory` is the fraction vLLM
may take for its copy of the weights and its KV cache). After every optimiser step the policy's weights are pushed
into it (`push`: LoRA adapters merged in for the copy, as TRL does). Under torchrun each process runs its own engine
(tensor parallel 1, vLLM's `external_launcher`) on its own GPU and samples its own share of the prompts, exactly as
the built-in sampler does; each prompt has its own seed.

Old-policy log-probs are not taken from vLLM: its kernels are not the training forward's, so the trainer recomputes
them with one no-grad forward, and the probability ratio is exactly 1 before the first update.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from r1lab.sampler import Completion, SamplingParams


def check_available() -> None:
    """Raise ValueError naming the fix when `--rollout vllm` cannot run here."""
    if not torch.cuda.is_available():
        raise ValueError(
            "--rollout vllm needs a CUDA GPU and torch sees none; use --rollout r1lab (r1lab's sampler "
            "runs on CPU and GPU)"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--rollout vllm needs the vllm package: pip install vllm (or use --rollout r1lab)")


def policy_weights(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the policy under transformers' names; a LoRA model must have its adapters merged first."""
    if hasattr(model, "get_base_model"):  # peft: base_model.model.x.base_layer.weight -> x.weight, adapters left out
        prefix = getattr(model, "prefix", "lora_")
        return [
            (n.removeprefix("base_model.model.").replace(".base_layer", ""), p.data)
            for n, p in model.named_parameters()
            if prefix not in n and "original_module" not in n
        ]
    return [(n, p.data) for n, p in model.named_parameters()]


class VLLMRollout:
    """A colocated vLLM engine with the sampler's interface: `encode`, `generate(prompt_ids, params, seeds=...)`."""

    tools = None  # no tool: GRPOConfig refuses --tools with --rollout vllm
    tool_wait = 0.0  # so no time spent waiting for programs

    def __init__(
        self, model_dir: str, model, tokenizer, gpu_memory: float = 0.3, dtype: str = "bfloat16", seed: int = 0
    ):
        check_available()
        from vllm import LLM

        from r1lab.tokenizer import eos_ids

        # one engine per process, inside it: vLLM reads torchrun's variables (set here for a single process)
        for k, v in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(29500 + os.getpid() % 1000)),
        ):
            os.environ.setdefault(k, v)
        self.llm = LLM(
            model=str(model_dir),
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
            gpu_memory_utilization=gpu_memory,
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=True,
        )
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids(tokenizer, getattr(model, "config", None))
        self.push(model)

    def encode(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        return ids

    @torch.no_grad()
    def push(self, model) -> None:
        """Copy the policy's current weights into the engine (under FSDP, inside `dist.full_weights`)."""
        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()
        try:
            weights = policy_weights(model)
            try:  # vLLM's in-process worker (what TRL's colocate mode uses)
                self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
            except AttributeError:  # newer layouts: ask every worker
                self.llm.collective_rpc(_load_weights, args=(weights,))
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()  # cached prefixes were computed by the old weights

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[Completion]:
        """`params.n` completions per prompt, prompt-major, as `r1lab.sampler.Sampler.generate` returns them."""
        from vllm import SamplingParams as VLLMParams

        params.validate()
        per_prompt: list[int | None] = list(seeds) if seeds is not None else [params.seed] * len(prompts)
        stop_ids = params.stop_token_ids if params.stop_token_ids is not None else self.eos_ids
        requests = [
            VLLMParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1,
                max_tokens=params.max_new_tokens,
                seed=None if s is None else int(s) % (1 << 63),
                stop=list(params.stop) or None,
                stop_token_ids=list(stop_ids),
                logprobs=0,
                skip_special_tokens=False,
            )
            for s in per_prompt
        ]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], requests, use_tqdm=False)
        completions = []
        for i, out in enumerate(outs):
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                lps = [float(d[t].logprob) if d and t in d else math.nan for t, d in zip(ids, o.logprobs or [])]
                reason = "length" if o.finish_reason == "length" else "stop"
                completions.append(Completion(i, o.text, ids, lps, reason, len(prompts[i])))
        return completions


def _load_weights(worker, weights):
    worker.model_runner.model.load_weights(weights)
