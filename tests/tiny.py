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
