"""The public Python API is what the README says it is."""

import importlib
import json
import re
from pathlib import Path

import pytest

import ziplm_planner as zp

TABLE = Path(__file__).parents[1] / "profiles" / "minilm-cpu2-onnxruntime-b8s128.json"


def test_api_functions_and_stage_modules_do_not_shadow_each_other():
    stages = {name: importlib.import_module(f"ziplm_planner.{name}")
              for name in ("profiler", "pipeline", "export", "evaluate", "plot", "demo", "retime", "verify")}
    for name in ("profile", "compress", "generate_text", "evaluate_family", "verify_family", "plot_families"):
        assert callable(getattr(zp, name)) and getattr(zp, name).__module__ == "ziplm_planner.api", name
    assert zp.evaluate is stages["evaluate"] and zp.plot is stages["plot"] and zp.verify is stages["verify"]
    assert callable(zp.load_pruned) and callable(zp.load_model)
    import ziplm_planner.pipeline as pipeline  # the attribute path resolves to the module, not a function

    assert pipeline is stages["pipeline"]


def test_public_names_are_all_listed_and_resolve():
    assert set(zp.__all__) == {"AttentionLevel", "CompressSettings", "FamilyReport", "GeneratedText",
                               "GenerationSettings", "InferenceSpec", "LatencyTable", "LoadedModel", "LossWeights",
                               "ProfileSettings", "RecoverySettings", "TrainSettings", "compress", "evaluate_family", "export_gguf",
                               "generate_text", "load_model", "load_pruned", "load_pruned_tokenizer", "ort_generate",
                               "plot_families", "profile", "verify_family"}
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
    zp.compress("minilm", TABLE, "2", "calib.txt", tmp_path / "f", settings=settings, overwrite=True)
    zp.compress("minilm", TABLE, [2.0], "calib.txt", tmp_path / "g")
    assert seen[0][2:] == ([2.0], "calib.txt", tmp_path / "f", settings, True)
    assert seen[1][5:] == (zp.CompressSettings(), False)
    with pytest.raises(UserError, match="beyond this table's maximum speedup"):
        zp.compress("minilm", TABLE, [1000.0], "calib.txt", tmp_path / "h")
    assert len(seen) == 2


def test_profile_takes_a_spec_and_settings(monkeypatch):
    seen = []
    monkeypatch.setattr("ziplm_planner.api._loaded", lambda model: model)
    monkeypatch.setattr("ziplm_planner.profiler.profile_model", lambda *args: seen.append(args))
    settings = zp.ProfileSettings(rounds=5)
    zp.profile("minilm", spec=zp.InferenceSpec(mode="decode", context=64), settings=settings)
    zp.profile("minilm")
    assert seen[0] == ("minilm", zp.InferenceSpec(mode="decode", context=64, seq_len=1), settings)  # decode: one token
    assert seen[1] == ("minilm", zp.InferenceSpec(), zp.ProfileSettings())  # all cores by default


def test_what_the_api_takes_and_returns_is_exported():
    """Every class a public function's signature names can be reached from the package."""
    import inspect
    import typing

    exported = {getattr(zp, name) for name in zp.__all__ if inspect.isclass(getattr(zp, name))}
    for name in zp.__all__:
        if inspect.isfunction(function := getattr(zp, name)):
            hints = typing.get_type_hints(function, vars(importlib.import_module(function.__module__)) | vars(zp))
            named = {c for hint in hints.values() for c in classes_in(hint) if c.__module__.startswith("ziplm_planner")}
            assert named <= exported, (name, named - exported)


def classes_in(hint) -> set:
    import typing

    if isinstance(hint, type):
        return {hint}
    return {c for arg in typing.get_args(hint) for c in classes_in(arg)}


def write_family(folder: Path) -> Path:
    from ziplm_planner.family import FAMILY_FORMAT

    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"format": FAMILY_FORMAT, "metadata": {}, "members": [{"folder": "dense"}]}))
    return folder


def test_evaluate_verify_and_plot_call_the_library_with_what_they_are_given(monkeypatch, tmp_path):
    family, data = write_family(tmp_path / "fam"), tmp_path / "sts.csv"
    data.write_text("x\n")
    seen = []
    monkeypatch.setattr("ziplm_planner.evaluate.evaluate_family", lambda *args, **kw: seen.append((args, kw)) or {"dense": 1.0})
    monkeypatch.setattr("ziplm_planner.retime.verify_family", lambda *args, **kw: seen.append((args, kw)) or [])
    monkeypatch.setattr("ziplm_planner.plot.read_families", lambda folders: seen.append(folders) or [])
    monkeypatch.setattr("ziplm_planner.plot.plot_frontier", lambda data, output, task: seen.append((output, task)) or [output])
    assert zp.evaluate_family(family, "stsb", data, backend="onnxruntime", max_tokens=5) == {"dense": 1.0}
    assert zp.verify_family(family, rounds=3) == []
    assert zp.plot_families([family], str(tmp_path / "p.png"), task="stsb") == [tmp_path / "p.png"]
    assert seen == [((family, "stsb", data), {"backend": "onnxruntime", "max_tokens": 5}), ((family,), {"rounds": 3}),
                    [family], (tmp_path / "p.png", "stsb")]


@pytest.mark.parametrize("call,message", [
    (lambda tmp: zp.evaluate_family(tmp / "none", "stsb", "x"), "family directory {tmp}/none does not exist"),
    (lambda tmp: zp.evaluate_family(tmp / "fam", "stsb", tmp / "none.csv"), "--data file {tmp}/none.csv does not exist"),
    (lambda tmp: zp.verify_family(tmp / "empty"), "{tmp}/empty has no report.json"),
    (lambda tmp: zp.plot_families([tmp / "empty"], tmp / "p.png"), "{tmp}/empty has no report.json"),
])
def test_evaluate_verify_and_plot_refuse_a_wrong_path_before_the_work(monkeypatch, tmp_path, call, message):
    from ziplm_planner.errors import UserError

    write_family(tmp_path / "fam")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr("ziplm_planner.evaluate.evaluate_family", lambda *args, **kw: pytest.fail("evaluated"))
    monkeypatch.setattr("ziplm_planner.retime.verify_family", lambda *args, **kw: pytest.fail("timed"))
    with pytest.raises(UserError, match=re.escape(message.format(tmp=tmp_path))):
        call(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "fam"]
