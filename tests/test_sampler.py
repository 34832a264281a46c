"""The sampler against transformers' generate, a full forward, and hand-made distributions."""

from __future__ import annotations

import pytest
import torch
import transformers

from r1lab.model.load import load_model_and_tokenizer
from r1lab.sampler import RowControls, Sampler, SamplingParams, sample_next
from r1lab.tokenizer import render_prompt

transformers.logging.set_verbosity_error()

PROMPTS = ["What is 3 + 4?", "1", "What is 12 + 57? <think>", "<answer>"]


@pytest.fixture(scope="module")
def native(tiny_native_dir):
    return load_model_and_tokenizer(tiny_native_dir)


@pytest.fixture(scope="module")
def qwen(tiny_tokenizer):
    cfg = transformers.Qwen2Config(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval(), tiny_tokenizer


def _hf_greedy(model, tok, prompt, n):
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(
        **enc, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return out[0, enc.input_ids.shape[1] :].tolist()


def test_greedy_equals_transformers_generate_on_the_native_checkpoint(native, tiny_native_dir):
    model, tok = native
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_native_dir).eval()
    prompts = PROMPTS + [render_prompt(tok, "What is 5 + 9?", "r1")]
    outs = Sampler(model, tok).generate(prompts, SamplingParams(max_new_tokens=24, temperature=0))
    for p, o in zip(prompts, outs):
        assert o.token_ids == _hf_greedy(hf, tok, p, 24)


def test_greedy_equals_transformers_generate_on_a_qwen2_model(qwen):
    model, tok = qwen
    outs = Sampler(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0))
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _hf_greedy(model, tok, p, 24)


def test_logprobs_are_those_of_a_full_forward_at_the_sampling_temperature(native):
    model, tok = native
    outs = Sampler(model, tok).generate(PROMPTS[:2], SamplingParams(max_new_tokens=12, temperature=0.7, seed=3))
    for p, o in zip(PROMPTS[:2], outs):
        ids = tok(p, add_special_tokens=False).input_ids
        full = torch.tensor([ids + o.token_ids])
        with torch.no_grad():
            logits = model(full).logits[0, len(ids) - 1 : -1] / 0.7
        ref = logits.log_softmax(-1).gather(1, torch.tensor(o.token_ids)[:, None]).flatten()
        assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-4)


def test_on_finish_is_called_once_per_completion_when_it_is_done(native):
    model, tok = native
    seen = []
    outs = Sampler(model, tok, max_batch=4).generate(
        PROMPTS, SamplingParams(max_new_tokens=6, n=2, seed=0), on_finish=seen.append
    )
    assert len(seen) == len(outs) == 8
    assert all(c.finish_reason in ("stop", "length") for c in seen)
    assert sorted((c.prompt_index, tuple(c.token_ids)) for c in seen) == sorted(
        (c.prompt_index, tuple(c.token_ids)) for c in outs
    )


def test_same_seed_same_samples_and_n_samples_are_prompt_major(native):
    model, tok = native
    s = Sampler(model, tok)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=11)
    a, b = s.generate(PROMPTS[:2], params), s.generate(PROMPTS[:2], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.prompt_index for o in a] == [0, 0, 0, 1, 1, 1]
    c = s.generate(PROMPTS[:2], SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=12))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_finish_reasons_eos_length_and_stop_strings(native):
    model, tok = native
    s = Sampler(model, tok)
    free = s.generate(["1"], SamplingParams(max_new_tokens=30, temperature=0))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    # make the 5th greedy token an end-of-sequence token: the reply stops there, without it in the text
    eos = free.token_ids[4]
    stopped = Sampler(model, tok, eos_ids=[eos]).generate(["1"], SamplingParams(max_new_tokens=30, temperature=0))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    assert stopped.text == tok.decode(stopped.token_ids[:-1])
    # a stop string cuts the text before it
    target = free.text[5:8]
    cut = s.generate(["1"], SamplingParams(max_new_tokens=30, temperature=0, stop=[target]))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(target)]


def test_finished_rows_leave_the_batch(native):
    model, tok = native
    s = Sampler(model, tok, eos_ids=[])
    sizes = []
    real = s.backend.decode
    s.backend.decode = lambda state, tokens: (sizes.append(len(tokens)), real(state, tokens))[1]
    prompts = ["1", "2", "3"]
    outs = s.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))
    assert [len(o.token_ids) for o in outs] == [8, 8, 8]
    s2 = Sampler(model, tok, eos_ids=[])
    sizes.clear()
    s2.backend.decode = lambda state, tokens: (sizes.append(len(tokens)), real(state, tokens))[1]
    mixed = [SamplingParams(max_new_tokens=m, temperature=0) for m in (2, 5, 8)]
    batch = s2.new_batch()
    batch.add([s2.encode(p) for p in prompts], mixed, [0, 1, 2], [None] * 3)
    while len(batch):
        batch.step()
    assert sizes == [3, 2, 2, 2, 1, 1, 1]  # rows stop costing compute once they are done


def test_rows_joining_a_running_batch_match_rows_run_alone(native, qwen):
    for model, tok in (native, qwen):
        s = Sampler(model, tok, eos_ids=[])
        alone = {p: s.generate([p], SamplingParams(max_new_tokens=8, temperature=0))[0].token_ids for p in PROMPTS}
        batch = s.new_batch()
        g = SamplingParams(max_new_tokens=8, temperature=0)
        done = {}
        assert batch.add([s.encode(PROMPTS[0])], [g], [PROMPTS[0]], [None]) == []  # nothing finishes at once
        for _ in range(3):
            for r in batch.step():
                done[r.key] = r.token_ids
        for r in batch.add([s.encode(p) for p in PROMPTS[1:]], [g] * 3, PROMPTS[1:], [None] * 3):
            done[r.key] = r.token_ids
        while len(batch):
            for r in batch.step():
                done[r.key] = r.token_ids
        assert done == alone


def test_seeded_rows_draw_the_same_whichever_rows_leave_before_them(native, qwen):
    """Rows that finish are replaced by the batch's last rows (no copy of the whole cache), so rows move; a
    generator's draws go to its rows in their creation order, and each prompt samples what it samples alone."""
    for model, tok in (native, qwen):
        s = Sampler(model, tok, eos_ids=[])
        lengths = {"1": 2, "2 + 3": 5, "45": 3, "6 * 7": 8}
        # "1" leaves first with 2 rows; the last prompt's last 2 rows take their slots, ahead of its first row
        params = {
            p: SamplingParams(max_new_tokens=m, temperature=1.0, n=2 if p == "1" else 3) for p, m in lengths.items()
        }

        def run(prompts, s=s, params=params):
            batch, done = s.new_batch(), {}
            gens = [torch.Generator().manual_seed(len(p)) for p in prompts]
            rows = batch.add([s.encode(p) for p in prompts], [params[p] for p in prompts], prompts, gens)
            while rows or len(batch):
                done.update({r.key: r.token_ids for r in rows})
                rows = batch.step()
            return done

        together = run(list(lengths))
        for p in lengths:
            assert {k: v for k, v in together.items() if k[0] == p} == run([p])


def test_top_k_and_top_p_never_pick_a_token_outside_the_kept_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)

    def rows(n=4000, **kw):
        return RowControls.of([SamplingParams(**kw)] * n, [gen] * n)

    tok, _ = sample_next(logits, rows(top_p=0.75))
    assert set(tok.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    share = (tok == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.03
    tok, _ = sample_next(logits, rows(top_k=3))
    assert set(tok.tolist()) == {0, 1, 2}
    tok, lp = sample_next(logits[:2], rows(2, temperature=0))
    assert tok.tolist() == [0, 0] and torch.allclose(lp, torch.log(torch.tensor([0.5, 0.5])))


def test_greedy_and_sampled_rows_mix_in_one_step():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=t) for t in (0, 1.0, 0, 0.7, 1.0, 0)]
    tok, lp = sample_next(logits, RowControls.of(params, [torch.Generator().manual_seed(i) for i in range(6)]))
    assert tok[[0, 2, 5]].tolist() == logits[[0, 2, 5]].argmax(-1).tolist()
    for i, p in enumerate(params):  # each row draws what it would draw alone with its own generator
        alone, alone_lp = sample_next(logits[i : i + 1], RowControls.of([p], [torch.Generator().manual_seed(i)]))
        assert tok[i] == alone[0] and torch.allclose(lp[i], alone_lp[0])
    ref = torch.log_softmax(logits[3].double() / 0.7, -1)[tok[3]]  # float64: log-probs of the sampled distribution
    assert abs(lp[3].item() - ref.item()) < 1e-5


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(n=0), "n must be"),
        (dict(stop=[""]), "stop strings"),
    ],
)
def test_bad_sampling_parameters_are_named(native, kw, msg):
    model, tok = native
    with pytest.raises(ValueError, match=msg):
        Sampler(model, tok).generate(["1"], SamplingParams(**kw))


def test_prompt_longer_than_the_context_is_refused(native):
    model, tok = native
    with pytest.raises(ValueError, match="context"):
        Sampler(model, tok).generate([[5] * 300], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="empty prompt"):
        Sampler(model, tok).generate([""], SamplingParams(max_new_tokens=4))
