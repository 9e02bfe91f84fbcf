"""GPT-2: pre-norm decoder with fused QKV in Conv1D layers (weights stored as (in, out))."""

from .base import Architecture, Bypass

GPT2 = Architecture(
    name="gpt2",
    model_types=("gpt2",),
    layers="h",
    attention="attn",
    query="attn.c_attn",
    key="attn.c_attn",
    value="attn.c_attn",
    attention_output="attn.c_proj",
    ffn_inputs=("mlp.c_fc",),
    ffn_output="mlp.c_proj",
    attention_bypass=(("ln_1", Bypass.IDENTITY), ("attn", Bypass.ZERO_ATTENTION)),
    ffn_bypass=(("ln_2", Bypass.IDENTITY), ("mlp", Bypass.ZERO_MLP)),
    pre_norm=True,
    fused_qkv=True,
    head_count_attrs=("num_heads",),
    head_width_attrs=("split_size",),
    config_intermediate="n_inner",
)
