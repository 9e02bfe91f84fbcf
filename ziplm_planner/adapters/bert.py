"""BERT-style post-norm encoders: BERT, RoBERTa (same module layout)."""

from .base import Architecture, Bypass

BERT = Architecture(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert"),
    layers="encoder.layer",
    attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_output="attention.output.dense",
    ffn_inputs=("intermediate.dense",),
    ffn_output="output.dense",
    # post-norm: the LayerNorm after a removed block goes with it
    attention_bypass=(("attention", Bypass.SKIP_ATTENTION),),
    ffn_bypass=(("intermediate", Bypass.IDENTITY), ("output", Bypass.RESIDUAL_OUTPUT)),
    pre_norm=False,
    head_count_attrs=("num_attention_heads",),
    head_width_attrs=("all_head_size",),
)
