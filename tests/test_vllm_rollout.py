"""`--rollout vllm` through the adapter's whole path, on CPU, against a stand-in for vLLM's `LLM` that has the
interface r1lab uses (constructor, `generate` with per-request `SamplingParams`, the in-process worker's
`load_weights`, `reset_prefix_cache`) and runs r1lab's own sampler on a transformers copy of the model. It checks
r1lab's side: weight names and LoRA merging on push, parameter translation, output order, the GRPO loop. vLLM's
own behaviour (and its throughput) needs a GPU; see docs/scale-out.md."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace as NS

import peft
import pytest
import torch
import transformers

from r1lab.cli import main
from r1lab.model.load import load_model_and_tokenizer
from r1lab.sampler import Sampler, SamplingParams
from r1lab.train import vllm_rollout as V

transformers.logging.set_verbosity_error()


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(
        self,
        model,
        tensor_parallel_size,
        distributed_executor_backend,
        gpu_memory_utilization,
        dtype,
        seed,
        enable_prefix_caching,
    ):
        assert tensor_parallel_size == 1 and distributed_executor_backend == "external_launcher"
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
        self.sampler = Sampler(self.model, transformers.AutoTokenizer.from_pretrained(model))
        worker = NS(model_runner=NS(model=self))
        self.llm_engine = NS(model_executor=NS(driver_worker=worker))
        self.pushes, self.resets, self.requests = 0, 0, []
        FakeLLM.instances.append(self)

    def load_weights(self, weights):
        state = self.model.state_dict()
        for name, tensor in weights:
            state[name].copy_(tensor)  # a name vLLM would not know fails here
        assert len(weights) == len(state), "every weight of the policy is pushed"
        self.pushes += 1

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, requests, use_tqdm=False):
        outs = []
        for p, r in zip(prompts, requests):
            self.requests.append(r)
            params = SamplingParams(
                max_new_tokens=r.max_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                top_k=max(r.top_k, 0),
                n=r.n,
                stop=r.stop or [],
                stop_token_ids=r.stop_token_ids,
            )
            done = self.sampler.generate([p["prompt_token_ids"]], params, seeds=[r.seed])
            outs.append(
                NS(
                    outputs=[
                        NS(
                            index=j,
                            text=c.text,
                            token_ids=c.token_ids,
                            finish_reason=c.finish_reason,
                            logprobs=[{t: NS(logprob=lp)} for t, lp in zip(c.token_ids, c.logprobs)],
                        )
                        for j, c in reversed(list(enumerate(done)))
                    ]
                )
            )  # vLLM's order is not promised
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, lambda **kw: NS(**kw)
    module.__spec__ = NS(name="vllm")
    monkeypatch.setitem(sys.modules, "vllm", module)
    real = V.importlib.util.find_spec
    monkeypatch.setattr(
        V.importlib.util, "find_spec", lambda name, *a: module.__spec__ if name == "vllm" else real(name, *a)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    FakeLLM.instances.clear()
    return FakeLLM


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir):
    return tiny_llama_dir


def test_push_sends_transformers_names_with_lora_merged_and_leaves_the_policy_unmerged(fake_vllm, llama_dir):
    model, tok = load_model_and_tokenizer(llama_dir)
    policy = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in policy.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the weights
    rollout = V.VLLMRollout(str(llama_dir), policy, tok)
    engine = fake_vllm.instances[0]
    policy.merge_adapter()
    want = {k: v.clone() for k, v in policy.get_base_model().state_dict().items() if "lora_" not in k}
    policy.unmerge_adapter()
    got = engine.model.state_dict()
    for k, v in got.items():
        key = next(w for w in want if w.replace(".base_layer", "") == k)
        assert torch.allclose(v, want[key], atol=1e-6), k
    assert engine.pushes == 1 and engine.resets == 1
    q = policy.get_base_model().model.layers[0].self_attn.q_proj
    assert not q.merged  # training goes on with the adapters separate
    assert not torch.allclose(q.base_layer.weight, got["model.layers.0.self_attn.q_proj.weight"])
    assert rollout.encode("12 + 3") == tok("12 + 3", add_special_tokens=False)["input_ids"]


def test_generate_translates_parameters_and_returns_completions_prompt_major(fake_vllm, llama_dir):
    model, tok = load_model_and_tokenizer(llama_dir)
    rollout = V.VLLMRollout(str(llama_dir), model, tok)
    prompts = [rollout.encode("1 + 2 ="), rollout.encode("30 - 4 = ?")]
    params = SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9, top_k=0, n=3, seed=5)
    got = rollout.generate(prompts, params, seeds=[11, 12])
    reqs = fake_vllm.instances[0].requests
    assert [(r.n, r.temperature, r.top_p, r.top_k, r.max_tokens, r.seed, r.logprobs) for r in reqs] == [
        (3, 0.7, 0.9, -1, 6, 11, 0),
        (3, 0.7, 0.9, -1, 6, 12, 0),
    ]
    assert reqs[0].stop_token_ids == [tok.eos_token_id] and reqs[0].stop is None
    ref = Sampler(model, tok).generate(prompts, params, seeds=[11, 12])  # the sampler's, for the same seeds
    assert [(c.prompt_index, c.token_ids, c.finish_reason, c.prompt_tokens) for c in got] == [
        (c.prompt_index, c.token_ids, c.finish_reason, c.prompt_tokens) for c in ref
    ]
    for a, b in zip(got, ref):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_grpo_with_rollout_vllm_pushes_every_update_and_samples_the_trained_weights(fake_vllm, llama_dir, tmp_path):
    out, reward = tmp_path / "g", tmp_path / "share.py"
    reward.write_text(
        "def share(completions, completion_ids, **kw):\n"
        "    return [sum(t % 3 == 0 for t in ids) / len(ids) for ids in completion_ids]\n"
    )
    args = [
        "grpo",
        "--model",
        str(llama_dir),
        "--out",
        str(out),
        "--rollout",
        "vllm",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--prompts-per-step",
        "2",
        "--num-generations",
        "4",
        "--max-new-tokens",
        "8",
        "--template",
        "r1",
        "--eval-problems",
        "2",
        "--lr",
        "1e-2",
        "--rewards",
        f"{reward}:share",
        "--reward-weights",
        "1.0",
        "--task-args",
        '{"arithmetic": {"min_digits": 1, "max_digits": 1}}',
    ]
    code = main(args)
    engine = fake_vllm.instances[0]
    assert code == 0
    assert engine.pushes == 3  # the initial weights, then after each of the 2 updates
    final, _ = load_model_and_tokenizer(out / "model")
    for k, v in final.state_dict().items():
        assert torch.allclose(v, engine.model.state_dict()[k], atol=1e-6), k
