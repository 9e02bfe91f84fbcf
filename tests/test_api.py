"""The public Python API is what the README says it is."""

import importlib

import ziplm_planner as zp


def test_api_functions_are_not_shadowed_by_stage_modules():
    for stage in ("ziplm_planner.profile", "ziplm_planner.compress", "ziplm_planner.export"):
        importlib.import_module(stage)
    assert callable(zp.profile) and zp.profile.__module__ == "ziplm_planner.api"
    assert callable(zp.compress) and zp.compress.__module__ == "ziplm_planner.api"
    assert callable(zp.load_pruned) and callable(zp.load_model)
