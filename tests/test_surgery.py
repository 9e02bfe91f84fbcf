"""Surgery is exact: a pruned model equals the dense model with the same structures zeroed."""

import copy
import json
import random

import pytest
import torch
from transformers import DynamicCache

from ziplm_planner.adapters import SUPPORTED_MODEL_TYPES, architecture_for, get_module, model_layers, model_shape
from ziplm_planner.errors import UserError
from ziplm_planner.kvcache import cache_argument
from ziplm_planner.layers import weight_out_in
from ziplm_planner.modeling_ziplm import unit_rows
from ziplm_planner.surgery import LayerPlan, PruningPlan, apply_plan, build_pruned, count_parameters
from tiny_models import GQA_TYPES, TINY_CONFIGS, gqa_model, random_batch, tiny_model

ALL_TYPES = sorted(TINY_CONFIGS)


def test_every_registered_architecture_has_a_tiny_model():
    assert set(SUPPORTED_MODEL_TYPES) == set(TINY_CONFIGS)


def zero_removed(model, plan: PruningPlan):
    """The masked reference: zero the output-projection columns of every removed structure (a query
    head's, or a neuron's)."""
    arch, shape = architecture_for(model.config), model_shape(model.config)
    for layer, kept in zip(model_layers(model), plan.layers):
        for path, kept_idx, total, width in (
            (arch.attention_output, kept.heads(shape), shape.num_heads, shape.head_dim),
            (arch.ffn_output, kept.ffn, shape.intermediate_size, 1),
        ):
            out = get_module(layer, path)
            removed = unit_rows(sorted(set(range(total)) - set(kept_idx)), width)
            with torch.no_grad():
                weight_out_in(out).index_fill_(1, removed, 0.0)
                if not kept_idx and out.bias is not None:
                    out.bias.zero_()  # a removed pre-norm block adds nothing, bias included
    return model


def random_plan(shape, rng, allow_empty):
    """Random KV groups, the same random number of query heads in each (any of its heads), random neurons."""
    def subset(total, low=0 if allow_empty else 1):
        return sorted(rng.sample(range(total), rng.randint(low, total)))

    def layer():
        per_group = rng.randint(1, shape.q_per_unit)
        heads = [g * shape.q_per_unit + i for g in subset(shape.attention_units)
                 for i in rng.sample(range(shape.q_per_unit), per_group)]
        return LayerPlan.of_heads(shape, heads, subset(shape.intermediate_size))
    return PruningPlan(shape, [layer() for _ in range(shape.num_layers)])


def outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("model_type", ALL_TYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_equals_masked_dense(model_type, seed):
    dense = tiny_model(model_type)
    shape = model_shape(dense.config)
    plan = random_plan(shape, random.Random(seed), allow_empty=architecture_for(dense.config).pre_norm)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    masked = zero_removed(copy.deepcopy(dense), plan)
    batch = random_batch(dense)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs(pruned, batch)[keep], outputs(masked, batch)[keep], rtol=1e-4, atol=1e-5)
    assert count_parameters(pruned) < count_parameters(dense)


@pytest.mark.parametrize("groups,heads_per_group", [(2, 3), (3, 2), (3, 3)])
@pytest.mark.parametrize("model_type", GQA_TYPES)
def test_query_heads_inside_kv_groups_equal_the_masked_dense_model(model_type, groups, heads_per_group):
    """Query heads removed inside KV groups: the pruned model is the dense one with those heads' output
    columns zeroed, in a forward pass and in greedy generation with its KV cache."""
    dense = gqa_model(model_type, groups, heads_per_group)
    shape = model_shape(dense.config)
    assert (shape.attention_units, shape.q_per_unit) == (groups, heads_per_group)
    for seed in range(3):
        plan = random_plan(shape, random.Random(seed), allow_empty=True)
        plan.layers[0] = LayerPlan.of_heads(shape, [g * heads_per_group + heads_per_group - 1 for g in range(groups)],
                                            range(shape.intermediate_size))  # one head per group: the last
        pruned = apply_plan(copy.deepcopy(dense), plan)
        masked = zero_removed(copy.deepcopy(dense), plan)
        attention = model_layers(pruned)[0].self_attn
        assert attention.num_key_value_groups == 1 and attention.k_proj.out_features == groups * shape.head_dim
        batch = random_batch(dense)
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(outputs(pruned, batch)[keep], outputs(masked, batch)[keep], rtol=1e-4, atol=1e-5)
        ids = random_batch(dense, batch=2, pad_last=0)["input_ids"]
        settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            torch.testing.assert_close(pruned.generate(ids, **settings), masked.generate(ids, **settings))


def test_query_heads_that_leave_groups_uneven_are_refused():
    shape = model_shape(gqa_model("llama", 2, 3).config)
    with pytest.raises(ValueError, match="different numbers of heads per KV group"):
        LayerPlan.of_heads(shape, [0, 1, 3], [])
    data = PruningPlan.dense(shape).to_dict()
    data["layers"][0]["query_heads"] = [0, 1, 3]
    with pytest.raises(UserError, match="layer 0: query heads .* different numbers"):
        PruningPlan.from_dict(data)
    data["layers"][0]["query_heads"] = [0, 3]
    data["layers"][0]["attention"] = [0]
    with pytest.raises(UserError, match=r"query_heads belong to KV groups \[0, 1\], attention keeps \[0\]"):
        PruningPlan.from_dict(data)


def test_a_plan_without_query_heads_keeps_every_head_of_its_groups():
    """pruning.json files written before query heads could be removed still load."""
    shape = model_shape(gqa_model("llama", 3, 2).config)
    data = PruningPlan.dense(shape).to_dict()
    del data["layers"][0]["query_heads"]
    data["layers"][0]["attention"] = [0, 2]
    layer = PruningPlan.from_dict(data).layers[0]
    assert layer.heads(shape) == [0, 1, 4, 5] and str(layer.attention_level(shape)) == "2x2"


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_pre_norm_removing_every_structure_equals_zeroing_the_block(model_type):
    dense = tiny_model(model_type, causal_lm=True)
    shape = model_shape(dense.config)
    plan = PruningPlan.dense(shape)
    plan.layers[0] = LayerPlan([], [])
    plan.layers[1] = LayerPlan([], list(range(shape.intermediate_size)))
    pruned = apply_plan(copy.deepcopy(dense), plan)
    masked = zero_removed(copy.deepcopy(dense), plan)
    batch = random_batch(dense, pad_last=0)
    torch.testing.assert_close(outputs(pruned, batch), outputs(masked, batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_post_norm_bypass_skips_block_and_its_layernorm(model_type):
    dense = tiny_model(model_type)
    shape = model_shape(dense.config)
    layer = model_layers(dense)[0]
    x = torch.randn(2, 5, shape.hidden_size)
    with torch.no_grad():
        attn_only = layer.attention(x)[0]
        ffn_only = layer.output(layer.intermediate(x), x)
        for kept, expected in ((LayerPlan(list(range(shape.attention_units)), []), attn_only),
                               (LayerPlan([], list(range(shape.intermediate_size))), ffn_only),
                               (LayerPlan([], []), x)):
            plan = PruningPlan.dense(shape)
            plan.layers[0] = kept
            pruned_layer = model_layers(apply_plan(copy.deepcopy(dense), plan))[0]
            torch.testing.assert_close(pruned_layer(x), expected)


def decoder_without_attention_in_layer_0(model_type: str, second_layer: LayerPlan):
    """A tiny decoder, and a plan that removes its first attention block and most of its first FFN."""
    dense = tiny_model(model_type, causal_lm=True)
    plan = PruningPlan.dense(model_shape(dense.config))
    plan.layers[0] = LayerPlan([], [0, 5, 7])
    plan.layers[1] = second_layer
    return dense, plan


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_pruned_decoder_generates_with_kv_cache(model_type):
    """A removed attention block keeps the KV cache's length right for later steps."""
    dense, plan = decoder_without_attention_in_layer_0(model_type, LayerPlan([1], []))
    pruned = apply_plan(dense, plan)
    ids = random_batch(pruned, batch=1, pad_last=0)["input_ids"]
    cache = DynamicCache(config=pruned.config)
    with_cache = {cache_argument(pruned): cache, "use_cache": True}
    with torch.no_grad():
        full = pruned(ids).logits[:, -1]
        pruned(ids[:, :-1], **with_cache)
        step = pruned(ids[:, -1:], **with_cache).logits[:, -1]
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_pruned_decoder_greedy_generation_matches_masked_dense(model_type):
    """generate() with its own cache: a pruned decoder emits the tokens of the masked dense model."""
    dense, plan = decoder_without_attention_in_layer_0(model_type, LayerPlan([1], list(range(10))))
    pruned = apply_plan(copy.deepcopy(dense), plan)
    masked = zero_removed(copy.deepcopy(dense), plan)
    ids = random_batch(dense, batch=2, pad_last=0)["input_ids"]
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(pruned.generate(ids, **settings), masked.generate(ids, **settings))


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_plan_round_trips_through_json_and_rebuilds_the_same_model(model_type):
    dense = tiny_model(model_type)
    shape = model_shape(dense.config)
    plan = random_plan(shape, random.Random(7), allow_empty=True)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    restored = PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored == plan
    rebuilt = build_pruned(type(dense), dense.config, restored, pruned.state_dict())
    batch = random_batch(dense)
    torch.testing.assert_close(outputs(rebuilt, batch), outputs(pruned, batch))


def test_plan_for_another_shape_is_refused():
    dense = tiny_model("bert")
    other = model_shape(tiny_model("llama").config)
    with pytest.raises(UserError, match="another model shape"):
        apply_plan(dense, PruningPlan.dense(other))


@pytest.mark.parametrize("bad", [{"layers": []}, {"shape": {}, "layers": []}])
def test_malformed_plan_is_refused(bad):
    with pytest.raises(UserError):
        PruningPlan.from_dict(bad)


def test_plan_with_out_of_range_index_is_refused():
    shape = model_shape(tiny_model("bert").config)
    data = PruningPlan.dense(shape).to_dict()
    data["layers"][0]["attention"] = [0, 99]
    with pytest.raises(UserError, match="layer 0 attention"):
        PruningPlan.from_dict(data)
