"""FastDecoder (Llama-family transformers models on r1lab's fast paths) against the models' own forward: cached
decoding, GRPO's grouped training forward (log-probs and gradients), LoRA and gradient checkpointing, and the
models it must leave to the generic path."""

from __future__ import annotations

import pytest
import torch
import transformers

from r1lab.model.cache import KVCache
from r1lab.model.llama import FastDecoder, fast_decoder
from r1lab.sampler import CachedBackend, HFBackend, Sampler, SamplingParams, make_backend
from r1lab.train import logprobs

transformers.logging.set_verbosity_error()
V = 97
COMMON = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def build(kind: str, **kw):
    """A random tiny model of the family, biases made non-zero so that they count."""
    torch.manual_seed(0)
    kw = {**COMMON, **kw}
    if kind == "llama":  # attention bias and llama3 RoPE scaling
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(attention_bias=True, rope_scaling=LLAMA3_ROPE, **kw)
        )
    elif kind == "qwen2":  # q/k/v biases
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    elif kind == "qwen3":  # per-head q/k norms, head_dim apart from hidden / heads
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=24, **kw))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_()
            if "RMSNorm" in type(m).__name__:
                m.weight.normal_(1.0, 0.2)
    return model.eval()


def groups(seed=0, sizes=(5, 9, 3), G_=4, max_len=12):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in sizes]
    comps = [
        [
            torch.randint(0, V, (int(torch.randint(1, max_len, (), generator=g)),), generator=g).tolist()
            for _ in range(G_)
        ]
        for _ in prompts
    ]
    return prompts, comps


FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_cached_decoding_gives_the_logits_of_the_models_own_forward(kind):
    model = build(kind, **({"sliding_window": None} if kind == "mistral" else {}))
    fast = fast_decoder(model)
    assert isinstance(fast, FastDecoder)
    prompts = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43, 38], [27, 18, 28]]
    cache = KVCache(model.config, 3, 40)
    ids = torch.zeros(3, 9, dtype=torch.long)
    am = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):  # right-padded: each row continues at its own length
        ids[i, : len(p)], am[i, : len(p)] = torch.tensor(p), 1
    logits = fast(ids, attention_mask=am, cache=cache).logits
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for i, p in enumerate(prompts):
            torch.testing.assert_close(logits[i, : len(p)], model(torch.tensor([p])).logits[0], atol=1e-5, rtol=0)
        for step in range(5):
            nxt = torch.tensor([7 + step, 50 - step, 90])
            logits = fast(nxt[:, None], cache=cache).logits[:, 0]
            for i in range(3):
                seqs[i].append(int(nxt[i]))
                torch.testing.assert_close(logits[i], model(torch.tensor([seqs[i]])).logits[0, -1], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [len(s) for s in seqs]


def _logprobs_and_grads(model, lay, params):
    lp, ent = logprobs.token_logprobs(model, lay, 0.7, entropy=True)
    grads = torch.autograd.grad((lp * torch.linspace(0.5, 1.5, len(lp), dtype=lp.dtype)).sum(), params)
    return logprobs.to_matrix(lp, lay, (12, 12)), logprobs.to_matrix(ent, lay, (12, 12)), grads


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_grouped_training_forward_matches_packed_rows_in_float64(kind):
    """The generic path (packed [prompt | c1 | ... | cG] rows, 4D mask, the model's own forward) is the reference."""
    model = build(kind).double().train()
    prompts, comps = groups()
    params = [p for p in model.parameters()]
    packed = logprobs.packed_rows(prompts, comps, 10_000, 0, row_tokens=64)[0]
    grouped = logprobs.grouped_batches(prompts, comps, 10_000, 0)[0]
    a, ea, ga = _logprobs_and_grads(model, packed, params)
    b, eb, gb = _logprobs_and_grads(model, grouped, params)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(ea, eb, atol=1e-6, rtol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-8)


def test_lora_and_gradient_checkpointing_run_through_the_fast_path():
    from r1lab.model.hf import HFOptions, prepare_model

    prompts, comps = groups(seed=1)
    lay = logprobs.grouped_batches(prompts, comps, 10_000, 0)[0]
    ref = logprobs.packed_rows(prompts, comps, 10_000, 0, row_tokens=64)[0]
    results = {}
    for name, opts in {
        "lora": HFOptions(lora_rank=4),
        "lora+ckpt": HFOptions(lora_rank=4, gradient_checkpointing=True),
    }.items():
        torch.manual_seed(1)
        model = prepare_model(build("qwen2"), opts).train()
        assert fast_decoder(model) is not None
        with torch.no_grad():  # LoRA's B starts at zero: move it so the adapters change the outputs
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
        results[name] = _logprobs_and_grads(model, lay, trainable)
        a, _, ga = _logprobs_and_grads(model, ref, trainable)
        torch.testing.assert_close(results[name][0], a, atol=2e-5, rtol=0)  # adapters are applied
        for x, y in zip(results[name][2], ga):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    for x, y in zip(results["lora"][2], results["lora+ckpt"][2]):  # recomputation changes nothing
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_models_it_would_not_mirror_exactly_keep_the_generic_path():
    sliding = build("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert fast_decoder(sliding) is None
    assert fast_decoder(build("mistral", sliding_window=16)) is None
    assert fast_decoder(build("qwen2", attention_dropout=0.1)) is None
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2))
    assert fast_decoder(gpt2) is None


def test_the_sampler_uses_the_fast_path_where_it_can(tiny_tokenizer):
    qwen = build("qwen2", vocab_size=len(tiny_tokenizer), eos_token_id=tiny_tokenizer.eos_token_id)
    assert isinstance(make_backend(qwen, tiny_tokenizer), CachedBackend)
    sliding = build(
        "qwen2", vocab_size=len(tiny_tokenizer), use_sliding_window=True, sliding_window=8, max_window_layers=0
    )
    assert isinstance(make_backend(sliding, tiny_tokenizer), HFBackend)
    # both engines give the same greedy continuation (the generic path is checked against generate in
    # test_sampler.py); the prompts differ in length and rows finish at different steps
    prompts = ["What is 3 + 4?", "1", "What is 12 + 57? <think>"]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    fast = Sampler(qwen, tiny_tokenizer).generate(prompts, params)
    generic = Sampler(qwen, tiny_tokenizer)
    generic.backend = HFBackend(qwen, tiny_tokenizer.pad_token_id)
    for a, b in zip(fast, generic.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_gpu_attention_through_sdpa_equals_the_cpu_kernel():
    """Off CPU, attention goes through SDPA (no [B, H, S, T] scores held); checked here by forcing it on CPU."""
    from r1lab.model.llama import attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, n, 16, generator=g) for h, n in ((6, 5), (2, 9), (2, 9)))
    allowed = torch.rand(3, 1, 5, 9, generator=g) > 0.3
    allowed[..., 0] = True  # every query sees at least one key
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(
        attend(q, k, v, bias, 0.25, fused=True), attend(q, k, v, bias, 0.25, fused=False), atol=1e-6, rtol=0
    )


def test_the_kv_cache_keeps_and_joins_rows():
    cfg = build("qwen3").config
    a, b = KVCache(cfg, 2, 10), KVCache(cfg, 1, 16)
    a.lengths[:] = torch.tensor([3, 5])
    a.buf[0][1, :, :5] = 1.0
    a.keep(torch.tensor([1, 1, 0]))
    assert a.lengths.tolist() == [5, 5, 3] and a.buf[0][:2, :, :5].eq(1).all() and a.buf[0][2].eq(0).all()
    a.extend(b)
    assert a.batch == 4 and a.capacity == 16 and a.lengths.tolist() == [5, 5, 3, 0]
    assert a.bytes_per_token() == 2 * 2 * 2 * 24 * 4  # layers x (k, v) x kv heads x head_dim x float32


@pytest.mark.parametrize("cache", ["latent", "kv"])
def test_dropping_rows_moves_the_last_survivors_into_their_slots(cache):
    from r1lab.model.cache import LatentCache
    from r1lab.model.config import tiny_config

    c = LatentCache(tiny_config(64), 6, 8) if cache == "latent" else KVCache(build("qwen3").config, 6, 8)
    for b in c.buf:
        b.copy_(torch.arange(6.0).view(6, *[1] * (b.dim() - 1)).expand_as(b))  # row i holds the value i
    c.lengths[:] = torch.tensor([10, 11, 12, 13, 14, 15])
    before = [b.clone() for b in c.buf]
    order = c.drop([1, 4])
    assert order == [0, 5, 2, 3]  # row 5 fills slot 1; slot 4 is past the new end
    assert c.batch == 4 and c.lengths.tolist() == [10, 15, 12, 13]
    for b, old in zip(c.buf, before):
        torch.testing.assert_close(b, old[order])
    assert c.drop([0, 1, 2]) == [3] and c.lengths.tolist() == [13] and c.buf[0].eq(3).all()
