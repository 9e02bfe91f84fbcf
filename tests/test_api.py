"""The public Python API is what the README says it is."""

import importlib

import pytest

import ziplm_planner as zp


def test_api_functions_and_stage_modules_do_not_shadow_each_other():
    stages = {name: importlib.import_module(f"ziplm_planner.{name}")
              for name in ("profiler", "pipeline", "export", "evaluate", "plot", "demo")}
    assert callable(zp.profile) and zp.profile.__module__ == "ziplm_planner.api"
    assert callable(zp.compress) and zp.compress.__module__ == "ziplm_planner.api"
    assert callable(zp.load_pruned) and callable(zp.load_model)
    import ziplm_planner.pipeline as pipeline  # the attribute path resolves to the module, not a function

    assert pipeline is stages["pipeline"]


def test_public_names_are_all_listed_and_resolve():
    assert set(zp.__all__) == {"AttentionLevel", "InferenceSpec", "LatencyTable", "compress", "generate_text", "load_model", "load_pruned",
                               "load_pruned_tokenizer", "ort_generate", "profile"}
    assert all(getattr(zp, name).__name__ == name for name in zp.__all__)
    assert set(zp.__all__) <= set(dir(zp))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        zp.nothing
