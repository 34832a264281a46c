"""The native DeepSeek-V3 against transformers' implementation, float64 references and hand-worked cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import tiny_model_config
from tiny import transformers_deepseek_config

from r1lab.model.cache import LatentCache
from r1lab.model.checkpoint import load_model, save_model
from r1lab.model.config import ModelConfig
from r1lab.model.deepseek import DeepseekV3, Experts, MoE

transformers.logging.set_verbosity_error()

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

CONFIGS = {
    "dense": dict(n_routed_experts=0),
    "moe_groups": dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3),
    "moe_full_rank_q_yarn": dict(q_lora_rank=None, rope_scaling=YARN, max_position_embeddings=256),
    "moe_untied_noninterleaved": dict(rope_interleave=False, tie_word_embeddings=False, n_shared_experts=2),
}


def _random_bias(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.e_score_correction_bias.normal_(0, 0.1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_r1lab_checkpoint_loads_in_transformers_with_same_logits(name, tmp_path):
    torch.manual_seed(0)
    model = DeepseekV3(tiny_model_config(101, **CONFIGS[name])).eval()
    _random_bias(model)
    save_model(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, 101, (3, 24))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.abs().max() > 0.5  # a test on near-zero logits would prove nothing
    assert (ours - theirs).abs().max() <= 1e-4


def test_transformers_checkpoint_loads_in_r1lab_with_same_logits(tmp_path):
    hcfg = transformers_deepseek_config(num_mtp_layers=0)
    torch.manual_seed(1)
    hf = transformers.DeepseekV3ForCausalLM(hcfg).eval()
    with torch.no_grad():
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(0, 89, (2, 19))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert a.abs().max() > 0.5
    assert (a - b).abs().max() <= 1e-4


def test_cached_decoding_matches_full_forward_for_rows_of_different_lengths():
    torch.manual_seed(0)
    model = DeepseekV3(tiny_model_config(97)).eval()
    lens, extra = [7, 3, 11], 6
    seqs = [torch.randint(0, 97, (n + extra,)) for n in lens]
    with torch.no_grad():
        ref = [model(s[None]).logits[0] for s in seqs]
        cache = LatentCache(model.config, 3, 32)
        ids = torch.zeros(3, max(lens), dtype=torch.long)
        am = torch.zeros_like(ids)
        for i, (s, n) in enumerate(zip(seqs, lens)):
            ids[i, :n], am[i, :n] = s[:n], 1
        logits = model(ids, attention_mask=am, cache=cache).logits
        err = max((logits[i, :n] - ref[i][:n]).abs().max().item() for i, n in enumerate(lens))
        for t in range(extra):
            tok = torch.stack([s[n + t] for s, n in zip(seqs, lens)])[:, None]
            step = model(tok, cache=cache).logits[:, 0]
            err = max(err, max((step[i] - ref[i][n + t]).abs().max().item() for i, n in enumerate(lens)))
    assert err <= 1e-4
    assert cache.lengths.tolist() == [n + extra for n in lens]


def test_prefill_in_chunks_matches_full_forward():
    """The first chunk meets an empty cache (attends with expanded heads); later multi-token chunks attend in latent
    space over the cached rows: both must give the full forward's logits."""
    torch.manual_seed(0)
    model = DeepseekV3(tiny_model_config(97)).eval()
    lens, cuts = [9, 5, 12], [4, 3, 7]
    seqs = [torch.randint(0, 97, (n,)) for n in lens]

    def chunk(parts):
        ids = torch.zeros(3, max(len(p) for p in parts), dtype=torch.long)
        am = torch.zeros_like(ids)
        for i, p in enumerate(parts):
            ids[i, : len(p)], am[i, : len(p)] = p, 1
        return ids, am

    with torch.no_grad():
        ref = [model(s[None]).logits[0] for s in seqs]
        cache = LatentCache(model.config, 3, 16)
        first = model(*chunk([s[:c] for s, c in zip(seqs, cuts)]), cache=cache).logits
        second = model(*chunk([s[c:] for s, c in zip(seqs, cuts)]), cache=cache).logits
    for i, (n, c) in enumerate(zip(lens, cuts)):
        assert (first[i, :c] - ref[i][:c]).abs().max() <= 1e-4
        assert (second[i, : n - c] - ref[i][c:]).abs().max() <= 1e-4
    assert cache.lengths.tolist() == lens


def test_cache_holds_only_latent_and_rope_key():
    cfg = tiny_model_config(50)
    cache = LatentCache(cfg, batch=1, capacity=4)
    assert cache.bytes_per_token() == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_router_matches_a_hand_worked_group_limited_choice():
    cfg = ModelConfig(
        vocab_size=8,
        hidden_size=4,
        intermediate_size=8,
        moe_intermediate_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        first_k_dense_replace=0,
        kv_lora_rank=2,
        qk_nope_head_dim=2,
        qk_rope_head_dim=2,
        v_head_dim=2,
        q_lora_rank=None,
        n_routed_experts=4,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        routed_scaling_factor=2.0,
    )
    moe = MoE(cfg)
    # scores sigmoid(logit): pick logits so experts = [0.9, 0.1 | 0.8, 0.7]: group sums (top-2) 1.0 vs 1.5
    logits = torch.logit(torch.tensor([0.9, 0.1, 0.8, 0.7]))
    with torch.no_grad():
        moe.gate.weight.copy_(torch.diag(torch.ones(4)) * 0 + torch.outer(logits, torch.tensor([1.0, 0, 0, 0])))
    x = torch.tensor([[1.0, 0, 0, 0]])
    w, idx, _ = moe.gate(x)
    assert sorted(idx[0].tolist()) == [2, 3]  # group 2 wins although expert 0 has the highest score
    assert torch.allclose(w[0].sort().values, torch.tensor([0.7, 0.8]) / 1.5 * 2.0)
    # the balancing bias changes the choice but never the weights
    moe.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 2.0, 0.0, 0.0]))
    w, idx, _ = moe.gate(x)
    assert sorted(idx[0].tolist()) == [0, 1]
    assert torch.allclose(w[0].sort().values, torch.tensor([0.1, 0.9]) / 1.0 * 2.0)


def _expert(moe, e, x):
    gate, up = (moe.experts.gate_up_proj[e] @ x).chunk(2)
    return moe.experts.down_proj[e] @ (F.silu(gate) * up)


# 1 and 5 tokens: padded buckets (few tokens); 32 (a decode batch) and 300: routed unevenly, one matmul per expert;
# and each of them with every expert run densely (chosen for small unevenly routed batches on several threads)
@pytest.mark.parametrize("dense", [False, True], ids=["routed", "dense"])
@pytest.mark.parametrize("tokens", [1, 5, 32, 300])
def test_moe_output_matches_a_float64_per_token_reference(tokens, dense, monkeypatch):
    if dense:
        monkeypatch.setattr(Experts, "_dense_is_cheaper", lambda self, *a: True)
    else:
        monkeypatch.setattr(Experts, "_dense_is_cheaper", lambda self, *a: False)
    torch.manual_seed(0)
    cfg = tiny_model_config(50, n_routed_experts=8, n_group=2, topk_group=2, num_experts_per_tok=3)
    moe = MoE(cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, tokens, cfg.hidden_size, dtype=torch.float64)
    if tokens in (32, 300):  # inputs leaning toward experts 0 and 1: an unbalanced router
        x = x + 0.5 * moe.gate.weight[:2].sum(0)
    out = moe(x)
    ref = torch.zeros_like(x)
    for b in range(2):
        for t in range(tokens):
            s = torch.sigmoid(moe.gate.weight @ x[b, t])
            chosen = s.topk(3).indices  # topk_group == n_group: every group is allowed
            w = s[chosen] / s[chosen].sum() * cfg.routed_scaling_factor
            y = sum(wi * _expert(moe, int(e), x[b, t]) for wi, e in zip(w, chosen))
            ref[b, t] = y + moe.shared_experts(x[b, t])
    assert (out - ref).abs().max() < 1e-10
    load = moe.last_load
    if tokens in (32, 300):  # the exact per-expert path was taken: padding would cost more than the loop
        padding = len(load) * load.max() - load.sum()
        assert padding > max(0.25 * load.sum(), 20 * (load > 0).sum())


def test_dense_experts_are_chosen_only_where_they_cost_less():
    ex = Experts(8, 4, 4)
    skewed = [62, 9, 9, 9, 10, 7, 9, 13]  # a decode batch of 64 tokens (k=2) crowding onto one expert
    balanced = [16, 17, 15, 16, 16, 16, 17, 15]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ex._dense_is_cheaper(64, 2, skewed)  # measured: 445 us dense vs 812 us routed
        assert not ex._dense_is_cheaper(64, 2, balanced)  # padded buckets are cheaper
        assert not ex._dense_is_cheaper(4600, 2, [1150] * 8)  # a training batch: E/k times the arithmetic
        torch.set_num_threads(1)
        assert not ex._dense_is_cheaper(64, 2, skewed)  # measured: 762 us dense vs 723 us routed
    finally:
        torch.set_num_threads(threads)


def test_expert_loads_are_observable_per_layer():
    torch.manual_seed(0)
    model = DeepseekV3(tiny_model_config(60, num_hidden_layers=3, first_k_dense_replace=1)).eval()
    ids = torch.randint(0, 60, (2, 10))
    model(ids)
    load = model.expert_load()
    assert load.shape == (2, 8)  # 2 MoE layers x 8 experts
    assert load.sum(1).tolist() == [2 * 10 * 2] * 2  # tokens x top-k per layer
    assert model.expert_load(accumulated=True).sum() == 0  # accumulation is for training forwards only


def test_bias_update_reduces_imbalance_of_a_skewed_router():
    torch.manual_seed(0)
    cfg = tiny_model_config(
        64, num_hidden_layers=2, first_k_dense_replace=1, n_group=1, topk_group=1, num_experts_per_tok=2
    )
    model = DeepseekV3(cfg).train()
    moe = model.main_moe()[0]
    u = torch.randn(cfg.hidden_size)
    u = u / u.norm()
    with torch.no_grad():  # skew: tokens share a direction that experts 0 and 1 are aligned with
        moe.gate.weight[:2] += 2.0 * u
    x = torch.randn(8, 32, cfg.hidden_size) * 0.3 + 3.0 * u
    imbalances = []
    for _ in range(30):
        with torch.no_grad():
            moe(x)
        imbalances.append(float(model.update_expert_bias(speed=0.05)[0]))
    assert imbalances[0] > 2.5
    assert imbalances[-1] < 0.5 * imbalances[0]
    assert moe.load.sum() == 0  # consumed by the update


def test_sequence_balance_loss_matches_the_v3_formula_in_float64():
    torch.manual_seed(0)
    cfg = tiny_model_config(40, seq_aux_loss_alpha=0.01, n_group=1, topk_group=1)
    moe = MoE(cfg).double().train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 6, cfg.hidden_size, dtype=torch.float64)
    moe(x)
    E, K, T = cfg.n_routed_experts, cfg.num_experts_per_tok, 6
    total = 0.0
    for b in range(3):
        s = torch.sigmoid(x[b] @ moe.gate.weight.T)  # [T, E]
        top = s.topk(K, -1).indices
        f = torch.zeros(E, dtype=torch.float64)
        for t in range(T):
            f[top[t]] += E / (K * T)
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        total += (f * P).sum()
    assert abs(moe.aux_loss.item() - 0.01 * total / 3) < 1e-10


def test_mtp_loss_is_the_depth_one_next_next_token_loss():
    torch.manual_seed(0)
    model = DeepseekV3(tiny_model_config(70, num_nextn_predict_layers=1, mtp_loss_weight=0.3)).train()
    ids = torch.randint(0, 70, (2, 12))
    out = model(ids, labels=ids, return_hidden=True)
    mtp = model.mtp_layers[0]
    rot = model.rope(torch.arange(11).expand(2, 11))
    h = mtp(out.hidden[:, :11], model.model.embed_tokens(ids[:, 1:]), rot, None)
    logits = model.lm_head(mtp.shared_head.norm(h))
    ref = F.cross_entropy(logits[:, :10].reshape(-1, 70), ids[:, 2:].reshape(-1))
    assert torch.allclose(out.mtp_loss, ref, atol=1e-6)
    assert torch.allclose(out.loss, out.lm_loss + 0.3 * out.mtp_loss)
    out.loss.backward()
    assert mtp.eh_proj.weight.grad.abs().sum() > 0


def test_packed_segments_do_not_attend_to_each_other():
    torch.manual_seed(0)
    model = DeepseekV3(tiny_model_config(55)).eval()
    a, b = torch.randint(0, 55, (7,)), torch.randint(0, 55, (5,))
    packed = torch.cat([a, b])[None]
    seg = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        joint = model(packed, segment_ids=seg, position_ids=pos).logits[0]
        sep_a, sep_b = model(a[None]).logits[0], model(b[None]).logits[0]
    assert (joint[:7] - sep_a).abs().max() < 1e-5
    assert (joint[7:] - sep_b).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["dense", "moe_groups"])
def test_grouped_forward_equals_each_completion_run_after_its_prompt(name):
    """GRPO's grouped layout (prompts once, completions beside them) against the plain reference: every
    completion forwarded alone right after its prompt, values and gradients."""
    torch.manual_seed(0)
    model = DeepseekV3(tiny_model_config(61, **CONFIGS[name])).train().double()  # float64: gradients compare tightly
    _random_bias(model)
    prompts = [torch.randint(0, 61, (n,)) for n in (5, 9)]
    comps = [[torch.randint(0, 61, (n,)) for n in lens] for lens in ((4, 1, 6), (3, 7, 2))]
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True, padding_value=0)  # noqa: E731
    flat = [c for cs in comps for c in cs]
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    hp, hc = model.grouped_hidden_states(
        pad(prompts), torch.tensor([5, 9]), pad(flat), torch.tensor([len(c) for c in flat]), group
    )
    loss_grouped = sum((hc[n, : len(c)] ** 2).sum() for n, c in enumerate(flat)) + (hp[1, :9] ** 2).sum()
    g_grouped = torch.autograd.grad(loss_grouped, model.model.layers[1].self_attn.kv_b_proj.weight)[0]
    loss_ref = 0
    for n, c in enumerate(flat):
        p = prompts[group[n]]
        h = model.hidden_states(torch.cat([p, c])[None])[0]
        assert (h[len(p) :] - hc[n, : len(c)]).abs().max() < 1e-5
        assert (h[: len(p)] - hp[group[n], : len(p)]).abs().max() < 1e-5
        loss_ref = loss_ref + (h[len(p) :] ** 2).sum()
    loss_ref = loss_ref + (model.hidden_states(prompts[1][None])[0] ** 2).sum()
    g_ref = torch.autograd.grad(loss_ref, model.model.layers[1].self_attn.kv_b_proj.weight)[0]
    assert (g_grouped - g_ref).abs().max() < 1e-6 * g_ref.abs().max()


def test_bf16_cast_keeps_balancing_bias_in_float32():
    model = DeepseekV3(tiny_model_config(30)).cast(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in model.main_moe())
    assert model(torch.randint(0, 30, (1, 5))).logits.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "bad, msg",
    [
        (dict(n_routed_experts=6, n_group=4), "divisible by n_group"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(qk_rope_head_dim=7), "even"),
        (dict(topk_group=3, n_group=2), "topk_group"),
    ],
)
def test_invalid_configs_name_the_field(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_model_config(30, **bad)


def test_original_deepseek_config_json_is_read():
    """deepseek-ai/DeepSeek-V3's config.json (rope_theta + rope_scaling, MTP layer count)."""
    d = dict(
        model_type="deepseek_v3",
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=3,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        num_nextn_predict_layers=1,
        rope_theta=10000,
        max_position_embeddings=163840,
        rope_scaling={
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        routed_scaling_factor=2.5,
    )
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.num_nextn_predict_layers == 1
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_mtp_drafts_with_the_cache_equal_the_mtp_forward_over_the_whole_sequence(tiny_native_dir):
    """Speculative decoding's draft (the MTP module run incrementally over its own cached entries, after each main
    step) gives the logits of the MTP module run over the whole sequence at once, as its training loss does. In
    float64, so that the two paths' different summation orders leave only rounding (float32 left up to 1.5e-5)."""
    from r1lab.model.cache import LatentCache
    from r1lab.model.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_native_dir)
    model = model.double()
    cfg = model.config
    ids = torch.randint(5, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    n = ids.shape[1] - 1  # MTP position i reads token i+1
    with torch.no_grad():
        hidden, rot = model.body(ids)
        layer = model.mtp_layers[0]
        full = layer(hidden[:, :n], model.model.embed_tokens(ids[:, 1:]), rot[:, :n], None)  # plain causal
        want = model.lm_head(layer.shared_head.norm(full))
        cache = LatentCache(cfg, 2, 32, dtype=torch.float64, layers=cfg.num_hidden_layers + 1)
        got, at = [], 0
        for width in (5, 1, 2, 1, 1):  # a prefill, then decode steps of one and two tokens
            h, r = model.body(ids[:, at : at + width], cache=cache, advance=False)
            got.append(model.draft(h, ids[:, at + 1 : at + 1 + width], r, cache))
            cache.advance(width)
            at += width
    assert at == n and torch.allclose(torch.cat(got, 1), want, rtol=0, atol=1e-10)


def test_mtp_loss_on_packed_samples_sharing_a_prefix_equals_the_separate_sequences():
    """Pretraining packs examples behind one shared prefix with a 4D mask. The MTP loss there is the mean of the
    per-token losses the MTP module gives on each [prefix | sample] sequence alone, over the targets the row keeps.
    One state cannot be shared: the prefix's last MTP state embeds the token that follows it in the row, the first
    sample's. So later samples neither attend to it nor predict from it (their first targets are left out), rather
    than leak the first sample across; everything else is exact."""
    import torch.nn.functional as F

    from r1lab.train.packing import pack

    torch.manual_seed(0)
    model = DeepseekV3(tiny_model_config(70, num_nextn_predict_layers=1, mtp_loss_weight=0.3)).train()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 70, (5,), generator=g).tolist()
    samples = [torch.randint(3, 70, (m,), generator=g).tolist() for m in (6, 4, 7)]
    packed = pack([(s, [1] * len(s)) for s in samples], 64, prefix=prefix)
    out = model(
        packed.input_ids,
        attention_mask=packed.mask(),
        position_ids=packed.position_ids,
        labels=packed.labels,
        token_mask=packed.attention_mask,
    )
    assert packed.input_ids.shape[0] == 1
    first_in_row = max(range(len(samples)), key=lambda i: len(samples[i]))  # packing puts the longest first
    losses = []
    for i, s in enumerate(samples):
        later = i != first_in_row
        ids = torch.tensor([prefix + s])
        hidden, rot = model.body(ids)
        mtp = model.mtp_layers[0]
        n = ids.shape[1] - 1
        see = torch.ones(n, n, dtype=torch.bool).tril()
        if later:  # the prefix's last MTP state is the first sample's
            see[len(prefix) :, len(prefix) - 1] = False
        bias = torch.zeros(n, n).masked_fill(~see, float("-inf"))[None, None]
        h = mtp(hidden[:, :-1], model.model.embed_tokens(ids[:, 1:]), rot[:, :-1], bias)
        logits = model.lm_head(mtp.shared_head.norm(h[:, :-1])).float()[0]  # position j predicts j + 2
        first = len(prefix) + (2 if later else 1)  # the first target the row keeps
        for t in range(first, ids.shape[1]):
            losses.append(F.cross_entropy(logits[t - 2][None], ids[0, t][None]))
    assert torch.allclose(out.mtp_loss, torch.stack(losses).mean(), atol=1e-5)
