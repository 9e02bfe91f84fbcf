"""Baselines on the latency table: each fits its budget, by surgery, and removes what its paper says."""

import copy
import dataclasses
import itertools

import pytest
import torch

from ziplm_planner.adapters import ATTENTION, FFN, REMOVED_ATTENTION, AttentionLevel, get_module, model_layers
from ziplm_planner.baselines import (block_sums, magnitude_importance, mask_normal_equations, rearrange, solve_mask,
                                     top_k, tune_masks)
from ziplm_planner.fisher import block_fisher, fisher_targets
from ziplm_planner.calibrate import load_calibration
from ziplm_planner.errors import UserError
from ziplm_planner.layers import capture_inputs, output_projection, weight_out_in
from ziplm_planner.planners import METHODS, ZIPLM, planner_for
from ziplm_planner.settings import CompressSettings
from ziplm_planner.surgery import LayerPlan, PruningPlan, apply_plan
from tiny_models import linear_table, measured_table, random_calibration, tiny_loaded, tiny_loaded_with_tokenizer, write_sentences


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A tiny BERT, its measured table and real calibration sentences, as in test_compress."""
    loaded = tiny_loaded_with_tokenizer("bert")
    table = measured_table(loaded)
    calibration = load_calibration(loaded, str(write_sentences(tmp_path_factory.mktemp("data") / "c.txt")), 16, 32)
    return loaded, table, calibration


BASELINES = [method for method in METHODS if method != ZIPLM]


def baseline_planner(method, loaded, table, calibration, seed=0, base=None):
    """A baseline's planner as a compress run makes it (planners.planner_for)."""
    return planner_for(loaded, table, calibration, CompressSettings(method=method, seed=seed), base=base)


def output(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def check_member(loaded, table, planner, budget, batch):
    before = state(loaded.model)
    model, plan, counts = planner.build(budget)
    assert table.predict(counts) <= budget + 1e-9
    assert plan.kept_counts() == counts
    assert torch.isfinite(output(model, batch)).all()
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the dense model is untouched
    return model, plan, counts


@pytest.mark.parametrize("method", BASELINES)
def test_every_method_fits_the_measured_budget(profiled, method):
    loaded, table, calibration = profiled
    speedup = min(1.5, 1 + 0.8 * (table.max_speedup - 1))
    planner = baseline_planner(method, loaded, table, calibration)
    model, plan, counts = check_member(loaded, table, planner, table.dense_ms / speedup, calibration.batches(4)[0])
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in loaded.model.parameters())
    if method == "uniform":
        assert len(set(counts)) == 1


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("method", BASELINES)
def test_every_method_builds_decoders(model_type, method):
    loaded = tiny_loaded(model_type, causal_lm=True)
    table, calibration = linear_table(loaded), random_calibration(loaded)
    check_member(loaded, table, baseline_planner(method, loaded, table, calibration), 9.5, calibration.batches(4)[0])


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("method", BASELINES)
def test_every_method_cuts_an_already_pruned_model_further(model_type, method):
    """Gradual pruning (GMP* for magnitude): the planner works on the current, pruned model, keeps a
    subset of what it has, and its plan in dense indices rebuilds the same model from the dense one."""
    loaded = tiny_loaded(model_type, causal_lm=model_type == "llama")
    table, calibration = linear_table(loaded), random_calibration(loaded)
    _, base, _ = baseline_planner("magnitude", loaded, table, calibration).build(12.0)
    current = dataclasses.replace(loaded, model=apply_plan(copy.deepcopy(loaded.model), base))
    batch, budget = calibration.batches(4)[0], 8.0
    assert table.predict(base.kept_counts()) > budget  # so every method must cut something more
    model, plan, counts = check_member(current, table, baseline_planner(method, current, table, calibration, base=base),
                                       budget, batch)
    for before, after in zip(base.layers, plan.layers):
        assert set(after.attention) <= set(before.attention) and set(after.ffn) <= set(before.ffn)
    rebuilt = apply_plan(copy.deepcopy(loaded.model), plan)
    if method == "kwon":  # mask tuning rescales output-projection columns: same structures, other values
        assert {k: v.shape for k, v in state(rebuilt).items()} == {k: v.shape for k, v in state(model).items()}
    else:
        torch.testing.assert_close(output(model, batch), output(rebuilt, batch), rtol=0, atol=0)


def test_unknown_method_is_refused():
    loaded = tiny_loaded("bert")
    with pytest.raises(UserError, match="unknown method 'obs': choose one of ziplm, magnitude, uniform, layerdrop, kwon"):
        baseline_planner("obs", loaded, linear_table(loaded), random_calibration(loaded))


def test_budget_below_the_fixed_part_is_refused():
    loaded = tiny_loaded("bert")
    planner = baseline_planner("magnitude", loaded, linear_table(loaded), random_calibration(loaded))
    with pytest.raises(UserError, match="fixed part"):
        planner.build(0.5)


# --- magnitude and uniform ------------------------------------------------------------------------


def test_magnitude_importance_of_a_kv_group():
    loaded = tiny_loaded("llama")  # 4 query heads in 2 KV groups, head_dim 8
    layer = model_layers(loaded.model)[0]
    q, k, v, o = (get_module(layer, f"self_attn.{p}_proj").weight for p in "qkvo")
    expected = q[16:32].square().sum() + k[8:16].square().sum() + v[8:16].square().sum() + o[:, 16:32].square().sum()
    torch.testing.assert_close(magnitude_importance(layer, loaded.model.config, ATTENTION)[1], expected.double())


def test_magnitude_removes_the_smallest_head_first():
    loaded = tiny_loaded("bert")
    attention = model_layers(loaded.model)[0].attention
    with torch.no_grad():  # head 2 of layer 0: rows 16..24 of Q, K, V and those columns of the output
        for proj in (attention.self.query, attention.self.key, attention.self.value):
            proj.weight[16:24] *= 1e-3
        attention.output.dense.weight[:, 16:24] *= 1e-3
    planner = baseline_planner("magnitude", loaded, linear_table(loaded), random_calibration(loaded))
    _, plan, counts = planner.build(14.1)  # dense 15 ms: one head or 16 neurons must go
    assert counts == [(AttentionLevel(3, 1), 48), (AttentionLevel(4, 1), 48)]
    assert plan.layers[0].attention == [0, 1, 3]


def test_uniform_keeps_the_same_ratio_everywhere_and_the_largest_that_fits():
    loaded = tiny_loaded("bert")
    table = linear_table(loaded)
    planner = baseline_planner("uniform", loaded, table, random_calibration(loaded))
    _, plan, counts = planner.build(10.0)  # 4.5 ms per layer
    assert counts == [(AttentionLevel(2, 1), 32)] * 2
    assert table.predict([(AttentionLevel(3, 1), 32)] * 2) > 10.0 and table.predict([(AttentionLevel(2, 1), 48)] * 2) > 10.0
    for idx, layer in enumerate(model_layers(loaded.model)):  # structures by weight norm
        assert plan.layers[idx].attention == top_k(magnitude_importance(layer, loaded.model.config, ATTENTION), 2)
        assert plan.layers[idx].ffn == top_k(magnitude_importance(layer, loaded.model.config, FFN), 32)


# --- layerdrop ------------------------------------------------------------------------------------


def test_layerdrop_removes_the_layer_that_changes_nothing_first():
    loaded = tiny_loaded("llama", causal_lm=True)
    layer = model_layers(loaded.model)[1]
    with torch.no_grad():  # pre-norm: with both output projections zero, the layer is the identity
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    planner = baseline_planner("layerdrop", loaded, linear_table(loaded), random_calibration(loaded))
    assert planner.influence[1] == pytest.approx(0, abs=1e-6) and planner.influence[0] > 1e-3
    _, plan, counts = planner.build(10.0)  # dense 11 ms: one layer (2 KV groups, 48 neurons: 5 ms) must go
    assert counts == [(AttentionLevel(2, 2), 48), (REMOVED_ATTENTION, 0)]
    assert plan.layers[1] == LayerPlan([], [])


# --- kwon -------------------------------------------------------------------------------------------


def finite_difference(model, kind, batch, target, layer, block, unit, width, delta=1e-3):
    """dL_s/dm_unit for every sample s, one sample at a time, by scaling the unit's output-projection
    columns by 1 ± delta (Llama's RMSNorm computes in float32 even in a float64 model: delta not smaller)."""
    losses = []
    for sign in (1, -1):
        scaled = copy.deepcopy(model)
        weight = weight_out_in(output_projection(model_layers(scaled)[layer], model.config, block))
        with torch.no_grad():
            weight[:, unit * width:(unit + 1) * width] *= 1 + sign * delta
            losses.append(torch.stack([kind.fisher_losses(scaled, {k: v[s:s + 1] for k, v in batch.items()},
                                                          None if target is None else target[s:s + 1])[0]
                                       for s in range(len(batch["input_ids"]))]))
    return (losses[0] - losses[1]) / (2 * delta)


@pytest.mark.parametrize("model_type,causal", [("bert", False), ("llama", True)])
def test_kwon_fisher_is_the_sum_of_squared_per_sample_gradients(model_type, causal):
    loaded = tiny_loaded(model_type, causal_lm=causal)
    loaded.model.double()
    calibration = random_calibration(loaded, samples=4)
    planner = baseline_planner("kwon", loaded, linear_table(loaded), calibration, seed=3)

    batch = calibration.batches()[0]
    target = fisher_targets(loaded.model, loaded.kind, [batch], seed=3)[0]
    shape = loaded.shape
    width = shape.q_per_unit * shape.head_dim
    grads = torch.stack([finite_difference(loaded.model, loaded.kind, batch, target, 0, ATTENTION, u, width)
                         for u in range(shape.attention_units)], dim=1)  # (samples, units)
    fisher = planner.fisher[0][ATTENTION]
    assert fisher.diagonal().min() > 0
    torch.testing.assert_close(fisher, grads.T @ grads, rtol=5e-3, atol=1e-5)
    neurons = [0, 7, 30]
    grads = torch.stack([finite_difference(loaded.model, loaded.kind, batch, target, 1, FFN, n, 1)
                         for n in neurons], dim=1)
    torch.testing.assert_close(planner.scores[1][FFN][neurons], grads.square().sum(0), rtol=5e-3, atol=1e-5)


@pytest.mark.parametrize("model_type,causal", [("bert", False), ("llama", True)])
def test_block_fisher_is_the_squared_gradient_of_scaling_the_whole_block(model_type, causal):
    """ZipLM's loss scale of a block: Σ_s (dL_s/dα)², α scaling all of its output-projection columns."""
    loaded = tiny_loaded(model_type, causal_lm=causal)
    loaded.model.double()
    batch = random_calibration(loaded, samples=4).batches()[0]
    fisher = block_fisher(loaded.model, loaded.kind, [batch], seed=3)
    target = fisher_targets(loaded.model, loaded.kind, [batch], seed=3)[0]
    for layer, block in ((0, ATTENTION), (1, FFN)):
        weight = weight_out_in(output_projection(model_layers(loaded.model)[layer], loaded.model.config, block))
        grads = finite_difference(loaded.model, loaded.kind, batch, target, layer, block, 0, weight.shape[1])
        assert fisher[layer][block] == pytest.approx(float(grads.square().sum()), rel=5e-3)


def test_kwon_keeps_the_rearranged_structures_of_each_searched_count():
    loaded = tiny_loaded("bert")
    planner = baseline_planner("kwon", loaded, linear_table(loaded), random_calibration(loaded))
    _, plan, counts = planner.build(9.0)
    partial = [(i, block, kept) for i, layer in enumerate(plan.layers)
               for block, kept, total in ((ATTENTION, layer.attention, 4), (FFN, layer.ffn, 48))
               if 0 < len(kept) < total]
    assert partial
    for i, block, kept in partial:
        assert kept == rearrange(planner.fisher[i][block], len(kept))


def fisher_loss(fisher, kept):
    pruned = torch.ones(len(fisher), dtype=fisher.dtype)
    pruned[kept] = 0
    return float(pruned @ fisher @ pruned)


def test_rearrangement_finds_cancelling_structures():
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.1], [-1.2, 0.0]], dtype=torch.float64)  # (structures, samples)
    fisher = grads @ grads.T
    assert rearrange(fisher, 1) == [1]  # by the diagonal alone it would keep 2; pruning 0 and 2 cancels
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        grads = torch.randn(8, 5, generator=g, dtype=torch.float64)
        fisher = grads @ grads.T
        kept = rearrange(fisher, 3)
        diagonal_choice = fisher.diagonal().argsort(descending=True)[:3].tolist()
        best = min(fisher_loss(fisher, list(c)) for c in itertools.combinations(range(8), 3))
        assert len(kept) == 3
        assert best - 1e-9 <= fisher_loss(fisher, kept) <= fisher_loss(fisher, diagonal_choice) + 1e-9


@pytest.mark.parametrize("width", [1, 3])
def test_mask_normal_equations_match_brute_force_least_squares(width):
    g = torch.Generator().manual_seed(width)
    x, weight, target = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((50, 12), (7, 12), (50, 7)))
    gram, rhs = mask_normal_equations(x.T @ x, x.T @ target, weight, width)
    design = torch.stack([(x[:, u * width:(u + 1) * width] @ weight[:, u * width:(u + 1) * width].T).reshape(-1)
                          for u in range(12 // width)], dim=1)  # (tokens * d_out, units)
    expected = torch.linalg.lstsq(design, target.reshape(-1, 1)).solution.squeeze(1)
    torch.testing.assert_close(torch.linalg.solve(gram, rhs), expected)
    torch.testing.assert_close(solve_mask(gram, rhs, dampening=0.0), expected)


def test_mask_solve_recovers_scales_and_leaves_dead_structures_at_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 6, generator=g, dtype=torch.float64)
    x[:, 4] = 0  # a dead neuron: no data says what its mask should be
    scales = torch.tensor([0.5, 1.0, 2.0, 1.5, 7.0, 0.8], dtype=torch.float64)
    target = (x * scales) @ weight.T
    mask = solve_mask(*mask_normal_equations(x.T @ x, x.T @ target, weight, 1), dampening=0.01)
    assert mask[4] == pytest.approx(1.0)
    torch.testing.assert_close(mask[[0, 1, 2, 3, 5]], scales[[0, 1, 2, 3, 5]], rtol=0.05, atol=0)
    assert solve_mask(*mask_normal_equations(x.T @ x, 50 * x.T @ target, weight, 1)) is None  # beyond ±10


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_mask_tuning_reduces_the_reconstruction_error(model_type):
    loaded = tiny_loaded(model_type)
    dense, shape = loaded.model, loaded.shape
    calibration = random_calibration(loaded, samples=24)
    inputs = capture_inputs(dense, calibration.batches())
    units = shape.attention_units
    plan = PruningPlan(shape, [LayerPlan(list(range(0, units, 2)), list(range(0, 48, 3))),
                               LayerPlan(list(range(1, units, 2)), list(range(1, 48, 2)))])
    untuned = apply_plan(copy.deepcopy(dense), plan)
    tuned = copy.deepcopy(untuned)
    tune_masks(dense, tuned, inputs)

    def layer0_error(model, block):
        return sum(float((block_sums(model_layers(model)[0], model.config, b)[block][1]
                          - block_sums(model_layers(dense)[0], dense.config, b)[block][1]).square().sum())
                   for b in inputs)

    assert layer0_error(tuned, ATTENTION) < layer0_error(untuned, ATTENTION)  # same inputs: least squares
    batches = calibration.batches()
    error = lambda m: sum(float((output(m, b) - output(dense, b))[b["attention_mask"].bool()].square().sum())
                          for b in batches)
    assert error(tuned) < error(untuned)


@pytest.mark.parametrize("model_type,causal", [("bert", False), ("llama", True)])
def test_a_model_with_every_block_removed_has_no_block_left_to_score(model_type, causal):
    """What a member pruned to the table's limit is planned on when it must be pruned on (gradual, or
    back in its band after training): nothing is left, and nothing fails."""
    import copy

    from ziplm_planner.surgery import LayerPlan, PruningPlan, apply_plan

    loaded = tiny_loaded(model_type, causal_lm=causal)
    plan = PruningPlan(loaded.shape, [LayerPlan([], []) for _ in model_layers(loaded.model)])
    emptied = apply_plan(copy.deepcopy(loaded.model), plan)
    batch = random_calibration(loaded, samples=4).batches()[0]
    assert block_fisher(emptied, loaded.kind, [batch]) == [dict.fromkeys((ATTENTION, FFN), 0.0)] * len(plan.layers)
