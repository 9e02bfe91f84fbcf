"""The profiler builds complete tables on both backends; tables refuse the wrong model or spec."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from ziplm_planner.adapters import REMOVED_ATTENTION, AttentionLevel, model_shape
from ziplm_planner.errors import UserError
from ziplm_planner.profiler import (attention_levels, ffn_levels, fit_line, fit_ratio, fit_whole_models, leave_one_out,
                                    per_layer_stats, predicted_from_fit, profile_model)
from ziplm_planner.spec import InferenceSpec
from ziplm_planner.table import ATTENTION, FFN, FIXED, LatencyTable
from ziplm_planner.timing import TimingStats
from tiny_models import FAST_PROFILE, needs_llama_cpp, tiny_loaded

SHIPPED_TABLE = Path(__file__).parents[1] / "profiles" / "minilm-cpu2-onnxruntime-b8s128.json"

# Two whole models, so that the additivity checks have a fit to judge.
FAST = dataclasses.replace(FAST_PROFILE, additivity_models=2)


def check_complete(table, shape, free_blocks=False):
    """Every level timed, each with ordered statistics; `free_blocks`: blocks timed stacked (llama.cpp)
    are differences of whole models' statistics, each at least 0, in no set order."""
    assert table.levels(ATTENTION) == attention_levels(shape)  # every (KV groups, query heads per group) pair
    assert len(attention_levels(shape)) == shape.attention_units * shape.q_per_unit
    assert table.levels(FFN) == ffn_levels(shape.intermediate_size, 16) == [16, 32, 48]
    assert len(table.levels(FIXED)) == 1
    for r in table.records:
        assert r["runs"] == 3
        if free_blocks and r["block"] != FIXED:
            assert min(r[name] for name in ("min_ms", "p10_ms", "median_ms", "p90_ms")) >= 0
        else:
            assert 0 < r["min_ms"] <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert len(table.additivity) == 3  # the dense model and two random ones
    assert table.additivity[0]["kept"] == [(shape.full_attention, shape.intermediate_size)] * shape.num_layers
    assert table.dense_ms == pytest.approx(table.from_block_sum(table.additivity[0]["block_sum_ms"]))
    fit = fit_whole_models([a["block_sum_ms"] for a in table.additivity], [a["measured_ms"] for a in table.additivity])
    assert fit == (table.metadata["whole_model_fit"], table.scale, table.offset_ms, table.line_from_ms)


@pytest.mark.parametrize("model_type,causal,backend", [
    ("bert", False, "torch"), ("bert", False, "onnxruntime"),
    ("llama", True, "torch"), ("llama", True, "onnxruntime"), ("gpt2", True, "onnxruntime"),
])
def test_profile_builds_a_complete_table(model_type, causal, backend):
    loaded = tiny_loaded(model_type, causal)
    table = profile_model(loaded, InferenceSpec(backend=backend, batch_size=2, seq_len=16, threads=1), FAST)
    check_complete(table, loaded.shape)
    assert table.metadata["machine"]["cores"] >= 1 and table.metadata["versions"]["torch"]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_profile_decode_mode_on_a_decoder(backend):
    loaded = tiny_loaded("llama", causal_lm=True)
    spec = InferenceSpec(backend=backend, batch_size=2, seq_len=1, mode="decode", context=12, threads=1)
    check_complete(profile_model(loaded, spec, FAST), loaded.shape)


def test_a_decode_block_on_onnxruntime_takes_its_cached_context_as_inputs(tmp_path):
    """As a deployed decoder: the past keys and values are fed on every call, with a dynamic length."""
    import onnx

    from ziplm_planner.profiler import layer_block_runners, workload

    loaded = tiny_loaded("llama", causal_lm=True)
    spec = InferenceSpec(backend="onnxruntime", batch_size=2, seq_len=1, mode="decode", context=12, threads=1)
    layer_block_runners(loaded.model, workload(loaded, spec), {"attention": [AttentionLevel(1, 2)], "ffn": []}, spec, tmp_path)
    graph = onnx.load(str(tmp_path / "attention1x2.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims["past_key"] == dims["past_value"] and dims["past_key"][2] == "past_sequence"


@pytest.mark.parametrize("mode,length,message", [("decode", 80, "--context 80 plus the new token is 81 tokens"),
                                                 ("prefill", 81, "--seq-len 81 is 81 tokens")])
def test_more_tokens_than_the_model_has_positions_are_refused(mode, length, message):
    from ziplm_planner.profiler import workload

    spec = InferenceSpec(batch_size=1, seq_len=1 if mode == "decode" else length, mode=mode,
                         context=length if mode == "decode" else 0)
    with pytest.raises(UserError, match=f"{message}, more than the model's 80 positions"):
        workload(tiny_loaded("llama", causal_lm=True), spec)


def test_decode_mode_is_refused_for_an_encoder():
    spec = InferenceSpec(batch_size=2, seq_len=1, mode="decode", context=8, threads=1)
    with pytest.raises(UserError, match="causal LMs"):
        profile_model(tiny_loaded("bert"), spec, FAST)


@pytest.fixture(scope="module")
def table():
    return profile_model(tiny_loaded("bert"), InferenceSpec(batch_size=2, seq_len=16, threads=1), FAST)


def test_table_round_trips_through_json(table, tmp_path):
    path = table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(path)
    assert json.loads(json.dumps(loaded.to_dict())) == json.loads(json.dumps(table.to_dict()))
    assert loaded.additivity == table.additivity
    frame = loaded.to_frame()
    assert {"block", "level", "time_ms", "p10_ms", "p90_ms", "runs", "spread"} <= set(frame.columns)
    assert "additivity" in loaded.describe() and "attention" in loaded.describe()
    assert loaded.name == str(path)  # warnings and reports name the table by its file, not by its model


def test_a_table_made_in_memory_is_named_by_its_model(table):
    in_memory = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert in_memory.path is None and in_memory.name == f"the table of {table.metadata['model']}"


def test_prediction_is_the_sum_of_block_times(table):
    two = AttentionLevel(2, 1)
    fixed, attn, ffn = table.fixed_ms, table.time(ATTENTION, two), table.time(FFN, 32)
    assert table.predict([(two, 32), (REMOVED_ATTENTION, 0)]) == pytest.approx(table.from_block_sum(fixed + attn + ffn))
    assert table.predict([(REMOVED_ATTENTION, 0)] * 2) == pytest.approx(table.from_block_sum(fixed))
    assert table.time(ATTENTION, 2) == attn  # an integer counts whole KV groups
    with pytest.raises(ValueError, match="attention level 2x2 was not timed"):
        table.time(ATTENTION, AttentionLevel(2, 2))
    cheapest_block = min(table.times(ATTENTION) + table.times(FFN))
    assert table.max_speedup == pytest.approx(table.dense_ms / table.from_block_sum(fixed + cheapest_block))
    assert table.block_budget(table.predict([(two, 32), (REMOVED_ATTENTION, 0)])) == pytest.approx(attn + ffn)


def test_lookups_follow_a_new_record_list():
    fresh = profile_model(tiny_loaded("bert"), InferenceSpec(batch_size=2, seq_len=16, threads=1), FAST)
    before = fresh.time(FFN, 32)
    fresh.records = [{**r, "time_ms": 2 * r["time_ms"]} for r in fresh.records]
    assert fresh.time(FFN, 32) == pytest.approx(2 * before)
    fresh.records = [r for r in fresh.records if r["block"] != FFN or r["level"] != 32]
    assert 32 not in fresh.levels(FFN)


def test_table_refuses_another_model_naming_the_fields(table):
    other = model_shape(tiny_loaded("llama", causal_lm=True).model.config)
    with pytest.raises(UserError, match="model_type: bert != llama"):
        table.check_compatible(other)


def test_table_refuses_another_spec(table):
    with pytest.raises(UserError, match="batch_size: 2 != 4"):
        table.check_compatible(table.shape, InferenceSpec(batch_size=4, seq_len=16, threads=1))
    table.check_compatible(table.shape, table.spec)  # its own spec is fine


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"), ("not json{", "not valid JSON"), ('{"format": "other"}', "not a ziplm-planner latency table"),
    ('{"format": "ziplm-planner/latency-table/v1", "spec": {}}', "incomplete or corrupt"),
])
def test_bad_table_files_are_refused(tmp_path, content, message):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        LatencyTable.load(path)


def fixed_record(data):
    return next(r for r in data["records"] if r["block"] == FIXED)


def first_of(data, block):
    return next(r for r in data["records"] if r["block"] == block)


def drop(data, block, level):
    data["records"] = [r for r in data["records"] if (r["block"], r["level"]) != (block, level)]


@pytest.mark.parametrize("damage,message", [
    (lambda d: fixed_record(d).update(time_ms=0.0), "record fixed level 0: time_ms 0.0 is not > 0"),
    (lambda d: fixed_record(d).update(level=1), r"fixed part levels \[1\] are not \[0\]"),
    (lambda d: d["records"].append(dict(fixed_record(d))), "fixed level 0 is recorded more than once"),
    (lambda d: d["records"].remove(fixed_record(d)), r"fixed part levels \[\] are not \[0\]"),
    (lambda d: d.update(scale=0), "scale 0 is not > 0"),
    (lambda d: d.update(scale=float("inf")), "scale inf is not a finite number"),
    (lambda d: d.update(scale="1.0"), "scale '1.0' is not a finite number"),
    (lambda d: d.update(estimator="mean"), "estimator 'mean' is not one of"),
    (lambda d: d["spec"].update(threads="2"), "spec field threads '2' is not an integer"),
    (lambda d: d["spec"].update(backend="tpu"), "spec: backend 'tpu'"),
    (lambda d: d["spec"].update(colour="red"), "spec: .*unexpected keyword argument 'colour'"),
    (lambda d: d["shape"].update(num_layers=0), "shape field num_layers 0 is not an integer >= 1"),
    (lambda d: d["shape"].pop("head_dim"), "shape has fields"),
    (lambda d: d.update(records=[]), "records are missing"),
    (lambda d: d["records"].append("junk"), "record 'junk' has no known block"),
    (lambda d: first_of(d, FFN).update(block="mlp"), "has no known block"),
    (lambda d: first_of(d, FFN).update(time_ms=float("nan")), "time_ms nan is not a finite number"),
    (lambda d: first_of(d, FFN).update(p10_ms=-1.0), "p10_ms -1.0 is not >= 0"),
    (lambda d: first_of(d, FFN).pop("p90_ms"), "p90_ms None is not a finite number"),
    (lambda d: first_of(d, ATTENTION).update(runs=0), "runs 0 is not an integer >= 1"),
    (lambda d: drop(d, ATTENTION, 2), r"attention levels missing 2x1 \(KV groups x query heads\)"),
    (lambda d: first_of(d, ATTENTION).update(level=9), r"attention levels missing 1x1"),
    (lambda d: d["records"].append(dict(first_of(d, ATTENTION), level=9)), r"attention levels 9x1 are outside 1..4 groups"),
    (lambda d: first_of(d, ATTENTION).update(heads=2), r"heads must be an attention record's query heads .* 1..1"),
    (lambda d: first_of(d, FFN).update(heads=1), r"heads must be an attention record's"),
    (lambda d: first_of(d, FFN).update(level=49), r"FFN levels \[49\] are outside 1..48"),
    (lambda d: drop(d, FFN, 48), "FFN level 48 \\(dense\\) is missing"),
    (lambda d: d.update(additivity={}), "additivity is not a list"),
    (lambda d: d["additivity"][0].pop("error"), "additivity entry 0: error None is not a finite number"),
    (lambda d: d["additivity"][1].update(measured_ms=0), "additivity entry 1: measured_ms 0 is not > 0"),
    (lambda d: d["additivity"][0].update(kept=[[4, 48]]), "additivity entry 0: kept is not 2"),
    (lambda d: d["additivity"][0].update(kept=[[5, 48], [4, 48]]), "kept is not 2 .* within the shape"),
    (lambda d: d.update(metadata=[]), "metadata is missing or not an object"),
])
def test_damaged_table_fields_are_refused_on_load(table, tmp_path, damage, message):
    data = json.loads(json.dumps(table.to_dict()))
    damage(data)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message) as err:
        LatencyTable.load(path)
    assert str(err.value).startswith(f"latency table {path} is incomplete or corrupt (")
    assert str(err.value).endswith("re-run `ziplm-planner profile`") and "\n" not in str(err.value)


def test_shipped_tables_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "profiles").glob("*.json")):
        assert LatencyTable.load(path).max_speedup > 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch size must be at least 1"), (dict(seq_len=0), "seq len must be at least 1"),
    (dict(backend="tensorrt"), "backend"), (dict(mode="decode"), "needs --context"),
    (dict(context=8), "decode mode only"),
    (dict(backend="onnxruntime", dtype="bfloat16"), "onnxruntime times the float32 file members ship with"),
    (dict(backend="llamacpp", dtype="bfloat16"), "its weight type is --gguf-type"),
    (dict(backend="llamacpp", batch_size=2), "llamacpp serves one sequence per call: use --batch-size 1"),
    (dict(gguf_type="f16"), "--gguf-type is the llamacpp backend's weight type, not torch's"),
    (dict(backend="llamacpp", gguf_type="q4_k"), "gguf_type 'q4_k' is not one of f32, f16, bf16, q8_0"),
])
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        InferenceSpec(**kwargs)


def test_a_spec_takes_its_backends_defaults():
    assert (InferenceSpec().batch_size, InferenceSpec().gguf_type) == (8, None)
    assert (InferenceSpec(backend="llamacpp").batch_size, InferenceSpec(backend="llamacpp").gguf_type) == (1, "f16")
    stored = InferenceSpec(backend="llamacpp", gguf_type="q8_0").to_dict()
    assert InferenceSpec(**stored) == InferenceSpec(backend="llamacpp", gguf_type="q8_0")


def test_stacked_blocks_are_their_model_less_the_fixed_part_per_layer():
    """Each statistic of the stacked model less the fixed part's, over the layers; a block the timer cannot
    tell from the fixed part is free, not negative."""
    fixed = TimingStats(1.0, 1.1, 1.2, 1.5, 10)
    stats = {(FIXED, 0): fixed, (FFN, 16): TimingStats(3.0, 3.1, 3.3, 3.7, 10),
             (FFN, 8): TimingStats(0.9, 1.2, 1.3, 1.6, 10)}
    per_layer = per_layer_stats(stats, layers=2)
    assert per_layer[(FIXED, 0)] is fixed
    assert dataclasses.astuple(per_layer[(FFN, 16)]) == pytest.approx((1.0, 1.0, 1.05, 1.1, 10))
    assert dataclasses.astuple(per_layer[(FFN, 8)]) == pytest.approx((0.0, 0.05, 0.05, 0.05, 10))


@needs_llama_cpp
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_llamacpp_times_blocks_stacked_in_gguf_models(mode):
    loaded = tiny_loaded("llama", causal_lm=True)
    decode = dict(mode="decode", context=12) if mode == "decode" else {}
    table = profile_model(loaded, InferenceSpec(backend="llamacpp", seq_len=16, threads=1, **decode), FAST)
    check_complete(table, loaded.shape, free_blocks=True)
    assert table.spec.gguf_type == "f16" and table.fixed_ms > 0


def test_a_table_says_when_it_cannot_be_trusted():
    table = LatencyTable.load(SHIPPED_TABLE)
    assert table.trust_problems() == []  # profiled on a quiet machine
    noisy = copy.deepcopy(table)
    noisy.additivity[1]["error"] = 0.25
    for record in noisy.additivity:
        record["measured"]["p90_ms"] = 2 * record["measured"]["p10_ms"]
    noisy.metadata["others_cpu_share"] = 0.6
    problems = noisy.trust_problems()
    assert len(problems) == 3
    assert "25.0% max" in problems[0] and "spread 2.00x" in problems[1] and "used 60% of the cores" in problems[2]
    assert "WARNING: whole models differ" in noisy.describe() and "profile again on a quiet machine" in noisy.describe()


def test_a_table_that_fails_its_trust_checks_is_profiled_again_and_the_soundest_kept(monkeypatch, caplog):
    """A noisy spell, shown as the CPU share other processes took (and once as whole models off the
    block sum), is met by profiling again; the soundest table is kept and only its problems are warned."""

    from ziplm_planner import profiler

    def run(retries, spells):  # spells: (others' CPU share, additivity error) of each attempt in turn
        spells = iter(spells)

        def profile_in_spell(*args):
            table = real_profile_once(*args)
            busy, error = next(spells)
            for record in table.additivity:
                record["error"], record["measured"]["p90_ms"] = error, 1.1 * record["measured"]["p10_ms"]
            table.metadata["others_cpu_share"] = busy
            return table
        monkeypatch.setattr(profiler, "profile_once", profile_in_spell)
        caplog.clear()
        with caplog.at_level("WARNING", logger="ziplm_planner.profiler"):
            table = profile_model(tiny_loaded("bert"), InferenceSpec(batch_size=2, seq_len=16, threads=1),
                                  dataclasses.replace(FAST, retries=retries))
        return table, [r.getMessage() for r in caplog.records]

    real_profile_once = profiler.profile_once
    table, warnings = run(2, [(0.9, 0.0), (0.0, 0.0)])  # busy, then quiet: the quiet one, no warning left
    assert table.metadata["attempts"] == 2 and table.metadata["others_cpu_share"] == 0.0 and table.trust_problems() == []
    assert len(warnings) == 1 and "attempt 1 of 3: other work" in warnings[0] and "profiling again" in warnings[0]
    assert "the soundest of 2 profiles" in table.describe()

    table, warnings = run(1, [(0.9, 0.0), (0.6, 0.3)])  # noisy throughout: the first, with one problem of three
    assert table.metadata["attempts"] == 2 and table.metadata["others_cpu_share"] == 0.9
    assert sum("profile again on a quiet machine" in w for w in warnings) == 1

    table, warnings = run(0, [(0.9, 0.0)])  # --retries 0: once, whatever it shows
    assert table.metadata["attempts"] == 1 and len(warnings) == 1 and "used 90% of the cores" in warnings[0]


def test_whole_models_fit_a_line_when_it_predicts_left_out_models_better():
    sums = [10.0, 20.0, 40.0, 80.0, 160.0]
    name, scale, offset, line_from = fit_whole_models(sums, [1.1 * s - 2.0 for s in sums])
    assert name == "line" and scale == pytest.approx(1.1) and offset == pytest.approx(-2.0) and line_from == 10.0
    # proportional timings: whichever is chosen predicts the ratio
    fit = fit_whole_models(sums, [0.9 * s for s in sums])
    assert [predicted_from_fit(fit[1:], x) for x in sums] == pytest.approx([0.9 * x for x in sums])
    # too few points: the ratio
    assert fit_line([10.0, 20.0], [11.0, 24.0]) == (pytest.approx(1.15), 0.0, 0.0)


def test_below_the_smallest_model_measured_the_table_scales_proportionally():
    fit = (1.1, -2.0, 10.0)  # the line gives 9 ms at block sum 10
    assert predicted_from_fit(fit, 20.0) == pytest.approx(20.0)
    assert predicted_from_fit(fit, 5.0) == pytest.approx(4.5) and predicted_from_fit(fit, 1.0) == pytest.approx(0.9)


def test_block_budget_inverts_the_prediction_on_both_sides_of_the_knee(table):

    fitted = dataclasses.replace(table, scale=1.1, offset_ms=-0.5 * table.fixed_ms, line_from_ms=2 * table.fixed_ms)
    for total in (0.6 * fitted.from_block_sum(2 * table.fixed_ms), 3 * table.fixed_ms, 10 * table.fixed_ms):
        assert fitted.from_block_sum(fitted.block_budget(total) + table.fixed_ms) == pytest.approx(total)


def test_the_layers_must_gain_more_than_the_model_since_the_fixed_part_stays(table):

    ratio_fit = dataclasses.replace(table, scale=0.9, offset_ms=0.0, line_from_ms=0.0)
    blocks = ratio_fit.dense_ms / 0.9 - table.fixed_ms
    for target in (1.5, 0.9 * ratio_fit.max_speedup):
        needed = blocks / (ratio_fit.dense_ms / target / 0.9 - table.fixed_ms)
        assert ratio_fit.layer_speedup(target) == pytest.approx(needed) and needed > target


def test_the_fixed_share_is_a_ratio_of_block_timings_whatever_the_fit(table):

    blocks = table.dense_ms / table.scale - table.offset_ms / table.scale - table.fixed_ms
    assert table.fixed_share == pytest.approx(table.fixed_ms / (table.fixed_ms + blocks))
    assert dataclasses.replace(table, scale=0.6, offset_ms=20.0).fixed_share == pytest.approx(table.fixed_share)


def test_leave_one_out_predicts_each_model_from_the_others():
    sums, measured = [10.0, 20.0, 40.0], [10.0, 20.0, 80.0]
    errors = leave_one_out(fit_ratio, sums, measured)
    assert errors[2] == pytest.approx(40.0 / 80.0 - 1)  # the others' median ratio is 1


def test_others_share_counts_the_cpu_another_process_takes():
    import subprocess
    import sys

    from ziplm_planner.environment import CpuSnapshot, others_share

    before, ours_before = CpuSnapshot.now(), CpuSnapshot.now(with_children=True)
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.0\nwhile time.time() < end: pass"])
    busy.wait()
    share = others_share(before, CpuSnapshot.now())
    assert share is not None and share > 0.2  # one core of others' work for most of the interval
    # ... unless the child is this process's own work (the verifier's timing process), waited for
    assert others_share(ours_before, CpuSnapshot.now(with_children=True)) < share - 0.2
