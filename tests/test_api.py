"""The public Python API is what the README says it is."""

import importlib
from pathlib import Path

import pytest

import ziplm_planner as zp

TABLE = Path(__file__).parents[1] / "profiles" / "minilm-cpu2-onnxruntime-b8s128.json"


def test_api_functions_and_stage_modules_do_not_shadow_each_other():
    stages = {name: importlib.import_module(f"ziplm_planner.{name}")
              for name in ("profiler", "pipeline", "export", "evaluate", "plot", "demo")}
    assert callable(zp.profile) and zp.profile.__module__ == "ziplm_planner.api"
    assert callable(zp.compress) and zp.compress.__module__ == "ziplm_planner.api"
    assert callable(zp.load_pruned) and callable(zp.load_model)
    import ziplm_planner.pipeline as pipeline  # the attribute path resolves to the module, not a function

    assert pipeline is stages["pipeline"]


def test_public_names_are_all_listed_and_resolve():
    assert set(zp.__all__) == {"AttentionLevel", "CompressSettings", "FamilyReport", "GenerationSettings",
                               "InferenceSpec", "LatencyTable", "LossWeights", "ProfileSettings", "RecoverySettings",
                               "TrainSettings", "compress", "generate_text", "load_model", "load_pruned",
                               "load_pruned_tokenizer", "ort_generate", "profile"}
    assert all(getattr(zp, name).__name__ == name for name in zp.__all__)
    assert set(zp.__all__) <= set(dir(zp))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        zp.nothing


def test_compress_takes_its_settings_whole_and_checks_before_loading(monkeypatch, tmp_path):
    from ziplm_planner.errors import UserError

    seen = []
    monkeypatch.setattr("ziplm_planner.api._loaded", lambda model: model)
    monkeypatch.setattr("ziplm_planner.pipeline.compress_model", lambda *args: seen.append(args))
    settings = zp.CompressSettings(num_samples=7, recovery=zp.RecoverySettings(mode="oneshot",
                                                                                train=zp.TrainSettings(tokens=99)))
    zp.compress("m", TABLE, "2", "calib.txt", tmp_path / "f", settings=settings, overwrite=True)
    zp.compress("m", TABLE, [2.0], "calib.txt", tmp_path / "g")
    assert seen[0][2:] == ([2.0], "calib.txt", tmp_path / "f", settings, True)
    assert seen[1][5:] == (zp.CompressSettings(), False)
    with pytest.raises(UserError, match="beyond this table's maximum speedup"):
        zp.compress("m", TABLE, [1000.0], "calib.txt", tmp_path / "h")
    assert len(seen) == 2


def test_profile_takes_a_spec_and_settings(monkeypatch):
    seen = []
    monkeypatch.setattr("ziplm_planner.api._loaded", lambda model: model)
    monkeypatch.setattr("ziplm_planner.api.profile_model", lambda *args: seen.append(args))
    settings = zp.ProfileSettings(rounds=5)
    zp.profile("m", spec=zp.InferenceSpec(mode="decode", context=64), settings=settings)
    zp.profile("m")
    assert seen[0] == ("m", zp.InferenceSpec(mode="decode", context=64, seq_len=1), settings)  # decode: one token
    assert seen[1] == ("m", zp.InferenceSpec(), zp.ProfileSettings())  # all cores by default
