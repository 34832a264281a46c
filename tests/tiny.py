"""The smallest DeepSeek-V3 the end-to-end tests pretrain (`--model` overrides of the tiny config): MLA with a query
latent, a grouped MoE of 4 experts, 2 layers; a few seconds per stage on one core."""

TINY_MODEL = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=4,
    n_group=2,
    topk_group=1,
)


def transformers_deepseek_config(**overrides):
    """A tiny transformers `DeepseekV3Config`: MLA with a query latent, 8 routed experts in 2 groups plus a shared
    one, 3 layers of which the first is dense; large initial weights so greedy choices are far from ties."""
    import transformers

    return transformers.DeepseekV3Config(
        **{
            **dict(
                vocab_size=89,
                hidden_size=32,
                intermediate_size=64,
                moe_intermediate_size=16,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=4,
                n_routed_experts=8,
                n_shared_experts=1,
                num_experts_per_tok=2,
                n_group=2,
                topk_group=1,
                first_k_dense_replace=1,
                q_lora_rank=24,
                kv_lora_rank=16,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=12,
                initializer_range=0.3,
            ),
            **overrides,
        }
    )
