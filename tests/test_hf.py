"""Any transformers causal LM, on the real SmolLM2-135M-Instruct imported from GGUF: the sampler's greedy output is
transformers' own, LoRA GRPO steps move the adapters and nothing else, LoRA is merged on export, `r1lab eval` runs
on GSM8K; and the HF options (gradient checkpointing, dtype, target modules) on a tiny Llama."""

from __future__ import annotations

import textwrap

import pytest
import torch
import transformers
from conftest import grpo_interrupted_at
from smollm import smollm_dir  # noqa: F401  (fixture)

from r1lab.cli import main
from r1lab.model import hf as H
from r1lab.model.load import load_model_and_tokenizer
from r1lab.sampler import Sampler, SamplingParams
from r1lab.tokenizer import apply_template
from r1lab.train import sft as S
from r1lab.train.run import write_model

transformers.logging.set_verbosity_error()

QUESTIONS = ["What is 2 + 3?", "Name a primary colour.", "Write one sentence about the sea."]


@pytest.fixture(scope="module")
def smollm(smollm_dir):
    return load_model_and_tokenizer(smollm_dir)


def test_sampler_greedy_equals_transformers_generate_on_smollm2(smollm):
    model, tok = smollm
    prompts = [apply_template(tok, [{"role": "user", "content": q}], "model") for q in QUESTIONS]
    outs = Sampler(model, tok).generate(prompts, SamplingParams(max_new_tokens=16, temperature=0))
    for p, o in zip(prompts, outs):
        enc = tok(p, return_tensors="pt", add_special_tokens=False)
        ref = model.generate(
            **enc, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )[0, enc.input_ids.shape[1] :].tolist()
        assert o.token_ids == ref
    assert outs[0].text.strip().startswith("2 + 3 = 5")  # the imported weights are the real model's


def test_chat_labels_on_smollm2_cover_the_reply_and_end_of_turn_only(smollm):
    _, tok = smollm
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    (sample,) = S.chat_samples(tok, msgs, "model")  # ChatML renders history as generated: one sample
    ids, mask = sample
    spans, cur = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    assert spans == ["Hello!<|im_end|>", "4<|im_end|>"]
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False).rstrip("\n")


def test_two_grpo_steps_with_lora_move_the_adapters_and_nothing_else(
    smollm_dir, tmp_path, shared_data
):  # GSM8K train prompts
    from r1lab.train.grpo import GRPOConfig, GRPOTrainer

    before, _ = load_model_and_tokenizer(smollm_dir)
    before = {k: v.clone() for k, v in before.state_dict().items()}
    # accuracy alone is 0 everywhere at 32 tokens; a length reward gives the groups different rewards to learn from
    reward = tmp_path / "length.py"
    reward.write_text(
        textwrap.dedent("""
        def length(completions, **kw):
            return [len(c) / 100 for c in completions]
    """)
    )
    cfg = GRPOConfig(
        out=str(tmp_path / "grpo"),
        model=str(smollm_dir),
        tasks=["gsm8k"],
        template="model",
        rewards=["accuracy", f"{reward}:length"],
        reward_weights=[1.0, 1.0],
        steps=2,
        prompts_per_step=2,
        num_generations=2,
        max_new_tokens=32,
        lr=1e-3,
        warmup=0,
        bf16=False,
        save_every=100,
        hf=H.HFOptions(lora_rank=8, lora_alpha=16, lora_target_modules=["q_proj", "v_proj"]),
    )
    trainer = GRPOTrainer(cfg, progress=False)  # the policy is loaded with cfg.hf: LoRA adapters over a frozen base
    assert hasattr(trainer.model, "get_base_model")
    lora0 = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}
    seen = {}
    finish = trainer.run.finish
    trainer.run.finish = lambda m, t: (
        seen.update(state={k: v.clone() for k, v in m.state_dict().items()}),
        finish(m, t),
    )
    merged, _, run = trainer.train()
    after = seen["state"]
    rows = trainer.run.metrics()
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward_std"] > 0 for r in rows)
    assert {p.task for p in trainer.rollouts.draw(0, 0, 2)} == {"gsm8k"}  # GSM8K train prompts
    assert set(lora0) == {k for k in after if "lora_" in k} and len(lora0) == 2 * 2 * 30
    moved = [k for k in lora0 if not torch.equal(lora0[k], after[k])]
    assert len(moved) == len(lora0)  # every adapter matrix changed (B starts at zero)
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k
    }
    assert base.keys() == before.keys()
    for k in before:
        assert torch.equal(before[k], base[k]), k  # the base model is frozen
    exported = transformers.AutoModelForCausalLM.from_pretrained(run.model_dir).state_dict()
    assert exported.keys() == before.keys()  # a plain model with the adapters merged in
    assert not torch.equal(
        exported["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        exported["model.layers.0.self_attn.k_proj.weight"], before["model.layers.0.self_attn.k_proj.weight"]
    )
    assert not any(hasattr(m, "lora_A") for m in merged.modules())


def test_lora_is_merged_on_export_into_a_plain_model(smollm_dir, tmp_path):
    model, tok = load_model_and_tokenizer(smollm_dir)
    peft_model = H.prepare_model(model, H.HFOptions(lora_rank=4, lora_alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():  # adapters that change the output (B starts at zero)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    ids = tok("Distillation keeps the answers that are right.", return_tensors="pt").input_ids
    with torch.no_grad():
        lora_logits = peft_model(input_ids=ids).logits
    write_model(peft_model, tok, tmp_path / "merged")
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in names and not names & {H.ADAPTER_CONFIG, H.ADAPTER_WEIGHTS}
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in back.state_dict())
    with torch.no_grad():
        merged_logits = back(input_ids=ids).logits
    assert torch.allclose(merged_logits, lora_logits, atol=1e-4)
    base, _ = load_model_and_tokenizer(smollm_dir)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, lora_logits, atol=1e-2)  # the adapters mattered


@pytest.mark.slow  # 85-117 s on one shared core: 40 replies of 64 tokens after ~200-token prompts
def test_eval_runs_on_20_gsm8k_problems(smollm_dir, capsys, shared_data):
    assert (
        main(["eval", str(smollm_dir), "--task", "gsm8k", "--limit", "20", "--k", "1", "--max-new-tokens", "64"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("gsm8k: 20 problems") and "pass@1" in out


# ----------------------------------------------------------------------------- options on a tiny Llama


@pytest.fixture()
def llama(tiny_tokenizer):
    cfg = transformers.LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _grads(model, ids):
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(llama):
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _grads(llama, ids)
    model = H.prepare_model(llama, H.HFOptions(gradient_checkpointing=True))
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    got = _grads(model, ids)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), k


def test_lora_adapts_the_named_modules_only_and_freezes_the_rest(llama):
    model = H.prepare_model(llama, H.HFOptions(lora_rank=2, lora_target_modules=["q_proj", "v_proj"], dtype="bfloat16"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("q_proj.lora_" in n or "v_proj.lora_" in n) for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)
    q, v = llama.model.layers[0].self_attn.q_proj, llama.model.layers[0].self_attn.v_proj
    per_layer = sum(2 * (m.in_features + m.out_features) for m in (q, v))  # rank x (in + out) per adapter
    assert H.trainable_parameters(model) == (2 * per_layer, sum(p.numel() for p in model.parameters()))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)  # adapters stay float32
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)


def test_bad_options_are_named(llama, tiny_native_dir):
    with pytest.raises(ValueError, match="lora_target_modules=\\['wq'\\].*named .*q_proj"):
        H.prepare_model(llama, H.HFOptions(lora_rank=2, lora_target_modules=["wq"]))
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        H.prepare_model(llama, H.HFOptions(dtype="fp8"))
    native, _ = load_model_and_tokenizer(tiny_native_dir)
    with pytest.raises(ValueError, match="native DeepSeek-V3 trains in full"):
        H.prepare_model(native, H.HFOptions(gradient_checkpointing=True))
    assert H.prepare_model(native, H.HFOptions(dtype="bfloat16")).lm_head.weight.dtype == torch.bfloat16


@pytest.fixture()
def llama_dir(tmp_path, llama, tiny_tokenizer):
    llama.config.eos_token_id, llama.config.pad_token_id = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    llama.save_pretrained(tmp_path / "llama")
    tiny_tokenizer.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_interrupted_lora_grpo_resumes_exactly_from_its_adapters(llama_dir, tmp_path):
    from r1lab.train import grpo as GR

    reward = tmp_path / "length.py"  # a random model is never right: reward length so that groups differ
    reward.write_text("def length(completions, **kw):\n    return [len(c) / 10 for c in completions]\n")

    def cfg(out):
        return GR.GRPOConfig(
            out=str(tmp_path / out),
            model=str(llama_dir),
            steps=3,
            prompts_per_step=2,
            num_generations=3,
            max_new_tokens=6,
            template="r1",
            bf16=False,
            save_every=2,
            lr=1e-2,
            warmup=0,
            task_args={"arithmetic": {"max_digits": 1}},
            beta=0.1,
            rewards=[f"{reward}:length"],
            reward_weights=[1.0],
            hf=H.HFOptions(lora_rank=4, lora_alpha=8, lora_dropout=0.1),
        )

    ref, _, _ = GR.grpo(cfg("a"), progress=False)
    grpo_interrupted_at(cfg("b"), step=2)
    assert (tmp_path / "b" / "checkpoint" / H.ADAPTER_CONFIG).is_file()  # the checkpoint holds the adapters only
    resumed, _, run = GR.grpo(cfg("b"), progress=False)
    sa, sb = ref.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys() and not any("lora" in k for k in sb)
    moved = False
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
        moved |= not torch.equal(sb[k], llama_state(llama_dir)[k])
    assert moved
    assert [r["step"] for r in run.metrics()] == [1, 2, 3]
    again, _, _ = GR.grpo(cfg("b"), progress=False)  # finished: the final model, metrics kept
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sb.items())
    assert [r["step"] for r in run.metrics()] == [1, 2, 3]


_STATES: dict = {}


def llama_state(path):
    if path not in _STATES:
        _STATES[path] = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
    return _STATES[path]
