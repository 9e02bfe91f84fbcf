"""The profiler builds complete tables on both backends; tables refuse the wrong model or spec."""

import copy
import json
from pathlib import Path

import pytest

from ziplm_planner.adapters import model_shape
from ziplm_planner.errors import UserError
from ziplm_planner.profiler import ProfileSettings, ffn_levels, profile_model
from ziplm_planner.spec import InferenceSpec
from ziplm_planner.table import ATTENTION, FFN, FIXED, LatencyTable
from tiny_models import tiny_loaded

SHIPPED_TABLE = Path(__file__).parents[1] / "profiles" / "minilm-cpu2-onnxruntime-b8s128.json"

FAST = ProfileSettings(ffn_step=16, rounds=3, warmup=1, additivity_models=2, additivity_rounds=2)


def check_complete(table, shape):
    assert table.levels(ATTENTION) == list(range(1, shape.attention_units + 1))
    assert table.levels(FFN) == ffn_levels(shape.intermediate_size, 16) == [16, 32, 48]
    assert len(table.levels(FIXED)) == 1
    for r in table.records:
        assert 0 < r["min_ms"] <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["runs"] == 3
    assert len(table.additivity) == 3  # the dense model and two random ones
    assert table.additivity[0]["kept"] == [(shape.attention_units, shape.intermediate_size)] * shape.num_layers
    assert table.dense_ms == pytest.approx(table.scale * table.additivity[0]["block_sum_ms"])
    ratios = sorted(a["measured_ms"] / a["block_sum_ms"] for a in table.additivity)
    assert table.scale == pytest.approx(ratios[len(ratios) // 2])  # the median over the whole models


@pytest.mark.parametrize("model_type,causal,backend", [
    ("bert", False, "torch"), ("bert", False, "onnxruntime"),
    ("llama", True, "torch"), ("llama", True, "onnxruntime"), ("gpt2", True, "onnxruntime"),
])
def test_profile_builds_a_complete_table(model_type, causal, backend):
    loaded = tiny_loaded(model_type, causal)
    table = profile_model(loaded, InferenceSpec(backend=backend, batch_size=2, seq_len=16, threads=1), FAST)
    check_complete(table, model_shape(loaded.model.config))
    assert table.metadata["machine"]["cores"] >= 1 and table.metadata["versions"]["torch"]


def test_profile_decode_mode_on_a_decoder():
    loaded = tiny_loaded("llama", causal_lm=True)
    spec = InferenceSpec(backend="torch", batch_size=2, seq_len=1, mode="decode", context=12, threads=1)
    check_complete(profile_model(loaded, spec, FAST), model_shape(loaded.model.config))


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
    assert loaded.to_dict() == json.loads(json.dumps(table.to_dict()))
    frame = loaded.to_frame()
    assert {"block", "level", "time_ms", "p10_ms", "p90_ms", "runs", "spread"} <= set(frame.columns)
    assert "additivity" in loaded.describe() and "attention" in loaded.describe()


def test_prediction_is_the_sum_of_block_times(table):
    fixed, attn, ffn = table.fixed_ms, table.time(ATTENTION, 2), table.time(FFN, 32)
    assert table.predict([(2, 32), (0, 0)]) == pytest.approx(table.scale * (fixed + attn + ffn))
    assert table.predict([(0, 0), (0, 0)]) == pytest.approx(table.scale * fixed)
    cheapest_block = min(table.times(ATTENTION) + table.times(FFN))
    assert table.max_speedup == pytest.approx(table.dense_ms / (table.scale * (fixed + cheapest_block)))
    assert table.block_budget(table.predict([(2, 32), (0, 0)])) == pytest.approx(attn + ffn)


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


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch size must be at least 1"), (dict(seq_len=0), "seq len must be at least 1"),
    (dict(backend="tensorrt"), "backend"), (dict(mode="decode"), "needs --context"),
    (dict(mode="decode", context=8, backend="onnxruntime"), "torch backend only"), (dict(context=8), "decode mode only"),
])
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        InferenceSpec(**kwargs)


def test_a_table_says_when_it_cannot_be_trusted():
    table = LatencyTable.load(SHIPPED_TABLE)
    assert table.trust_problems() == []  # profiled on a quiet machine
    noisy = copy.deepcopy(table)
    noisy.additivity[1]["error"] = 0.25
    for record in noisy.additivity:
        record["measured"]["p90_ms"] = 2 * record["measured"]["p10_ms"]
    noisy.metadata["load_average"] = 3.0
    problems = noisy.trust_problems()
    assert len(problems) == 3
    assert "25.0% max" in problems[0] and "spread 2.00x" in problems[1] and "load average 3.0 on 2 cores" in problems[2]
    assert "WARNING: whole models differ" in noisy.describe() and "profile again on a quiet machine" in noisy.describe()
