"""The layer-by-layer driver reproduces the model's own forward, and its Hessians skip padding."""

import pytest
import torch

from ziplm_planner.adapters import model_layers
from ziplm_planner.layers import block_hessians, capture_inputs, propagate
from tiny_models import random_batch, tiny_model


@pytest.mark.parametrize("model_type,causal", [("bert", False), ("llama", True), ("gpt2", True)])
def test_propagating_captured_inputs_reproduces_the_forward(model_type, causal):
    model = tiny_model(model_type, causal_lm=causal)
    batch = random_batch(model, pad_last=3)
    with torch.no_grad():
        expected = model(**batch, output_hidden_states=True).hidden_states
    inputs = capture_inputs(model, [batch])
    keep = batch["attention_mask"].bool()
    for idx, layer in enumerate(model_layers(model)[:-1]):
        block_hessians(layer, model.config, inputs)  # runs every layer once more on the same batch
        inputs = propagate(layer, inputs)
        torch.testing.assert_close(inputs[0].hidden[keep], expected[idx + 1][keep], rtol=1e-4, atol=1e-5)


def test_padding_never_enters_a_hessian():
    model = tiny_model("bert")
    batch = random_batch(model, pad_last=4)
    trimmed = {k: v[:1, :-4] for k, v in batch.items()}  # the padded row alone, without its padding
    rest = {k: v[1:] for k, v in batch.items()}
    layer = model_layers(model)[0]
    both = block_hessians(layer, model.config, capture_inputs(model, [batch]))
    split = block_hessians(layer, model.config, capture_inputs(model, [trimmed, rest]))
    for block in both:
        torch.testing.assert_close(both[block], split[block], rtol=1e-5, atol=1e-6)  # float32 activations
