"""Llama-style pre-norm decoders with grouped-query attention: Llama, Mistral, Qwen2."""

from .base import Architecture, Bypass

LLAMA = Architecture(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers="layers",
    attention="self_attn",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    attention_output="self_attn.o_proj",
    ffn_inputs=("mlp.gate_proj", "mlp.up_proj"),
    ffn_output="mlp.down_proj",
    attention_bypass=(("input_layernorm", Bypass.IDENTITY), ("self_attn", Bypass.ZERO_ATTENTION)),
    ffn_bypass=(("post_attention_layernorm", Bypass.IDENTITY), ("mlp", Bypass.ZERO_MLP)),
    pre_norm=True,
    group_heads_attrs=("num_key_value_groups",),  # repeat_kv: each KV head serves this many query heads
    ffn_width_attrs=(("mlp", "intermediate_size"),),
    config_kv_heads="num_key_value_heads",
)
