"""On a CUDA device: a tiny model is profiled there, and a member is timed there against the dense
model. Skipped without one; a machine with a GPU runs them with `pytest -m gpu`. Nothing here
compares times: on a GPU a tiny model's blocks take about as long as their kernel launches."""

import copy

import pytest
import torch

from ziplm_planner.profiler import attention_levels, ffn_levels, profile_model
from ziplm_planner.spec import InferenceSpec
from ziplm_planner.surgery import LayerPlan, PruningPlan, apply_plan
from ziplm_planner.table import ATTENTION, FFN
from ziplm_planner.verify import Verifier
from tiny_models import FAST_PROFILE, tiny_loaded

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPEC = InferenceSpec(device="cuda", batch_size=2, seq_len=16, threads=1)


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("bert")


@pytest.fixture(scope="module")
def table(loaded):
    return profile_model(loaded, SPEC, FAST_PROFILE)


def test_a_tiny_model_is_profiled_on_cuda(loaded, table):
    shape = loaded.shape
    assert table.spec == SPEC and torch.cuda.max_memory_allocated() > 0
    assert table.levels(ATTENTION) == attention_levels(shape)
    assert table.levels(FFN) == ffn_levels(shape.intermediate_size, FAST_PROFILE.ffn_step)
    assert all(0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] for r in table.records) and table.dense_ms > 0
    assert next(loaded.model.parameters()).is_cpu  # the blocks timed were copies


def test_a_member_is_timed_on_cuda_against_the_dense_model(loaded, table, tmp_path):
    shape = loaded.shape
    plan = PruningPlan(shape, [LayerPlan.first(shape, shape.whole_groups(2), 16)] * shape.num_layers)
    member = apply_plan(copy.deepcopy(loaded.model), plan)
    torch.cuda.reset_peak_memory_stats()
    measurement = Verifier(loaded, table, 4, tmp_path, tolerance=1.5).measure(member, 2.0)
    assert torch.cuda.max_memory_allocated() > 0 and next(member.parameters()).is_cpu
    assert measurement.rounds >= 4 and measurement.timed_file is None and measurement.timed == "torch module"
    assert measurement.member.min_ms > 0 and measurement.dense.min_ms > 0 and measurement.speedup > 0
    assert 0 < measurement.interval[0] <= measurement.interval[1]
