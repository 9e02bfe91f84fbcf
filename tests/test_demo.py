"""The demo's data comes from Python itself: disjoint calibration and held-out sentences; its bad input is
refused before it loads the model or profiles."""

import json
import sys
from pathlib import Path

import pytest

from ziplm_planner.cli import main
from ziplm_planner.data import read_dataset
from ziplm_planner.demo import check_demo_folder, python_sentences, speedup_ceiling, write_demo_texts
from ziplm_planner.errors import UserError
from ziplm_planner.table import LatencyTable

ROOT = Path(__file__).resolve().parents[1]


def test_python_sentences_are_plentiful_and_deterministic():
    sentences = python_sentences()
    assert len(sentences) > 1000 and sentences == python_sentences()
    assert all(6 <= len(s.split()) <= 60 for s in sentences)


def test_demo_texts_are_disjoint_and_readable(tmp_path):
    calibration, heldout = write_demo_texts(tmp_path, held_out=100)
    calib_texts = read_dataset(calibration).texts
    held_texts = read_dataset(heldout).texts
    assert len(held_texts) == 100 and len(calib_texts) > 900
    assert not set(calib_texts) & set(held_texts)


def run_demo_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["ziplm-planner", "demo", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def refused_at_once(monkeypatch, capsys, *args) -> str:
    """The demo's one line, given before it loads the model or profiles (either would fail this test)."""
    monkeypatch.setattr("ziplm_planner.models.load_model", no_model)
    code, err = run_demo_cli(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def no_model(*args, **kwargs):
    raise AssertionError("the demo loaded the model before refusing")


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("sentence\tlabel\nA sentence.\t1\n", "has no scored sentence pairs: stsb needs an STS-B file"),
    ("one\ttwo\tthree\n", "looks like a TSV but is neither STS-B"),
])
def test_an_stsb_file_that_is_not_one_is_refused_before_profiling(monkeypatch, capsys, tmp_path, content, message):
    stsb = tmp_path / "sts.tsv"
    if content is not None:
        stsb.write_text(content)
    assert message in refused_at_once(monkeypatch, capsys, "--stsb", stsb, "-o", tmp_path / "demo")
    assert not (tmp_path / "demo").exists()


def test_targets_past_what_the_model_can_reach_anywhere_are_refused_before_profiling(monkeypatch, capsys, tmp_path):
    err = refused_at_once(monkeypatch, capsys, "--targets", "1.5,1e9", "-o", tmp_path / "demo")
    assert "target 1e+09x is beyond what minilm can reach on any machine" in err
    assert not (tmp_path / "demo").exists()


def test_a_ceiling_no_table_comes_near():
    from ziplm_planner.adapters import model_shape
    from ziplm_planner.aliases import resolve_model
    from ziplm_planner.models import load_config

    shipped = [LatencyTable.load(path).max_speedup for path in (ROOT / "profiles").glob("minilm-*.json")]
    assert shipped and speedup_ceiling(model_shape(load_config(resolve_model("minilm"))), 128) > 100 * max(shipped)


def test_a_folder_of_the_users_files_is_refused_and_left_as_it_was(monkeypatch, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "family").mkdir()
    (tmp_path / "family" / "draft.md").write_text("mine too")
    err = refused_at_once(monkeypatch, capsys, "-o", tmp_path)
    assert f"output folder {tmp_path} holds files the demo did not write (family, notes.txt)" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["draft.md", "family", "notes.txt"]


def test_a_folder_an_earlier_demo_wrote_is_the_demos(tmp_path):
    from ziplm_planner.aliases import resolve_model

    for name in ("calibration.txt", "heldout.txt", "profile-onnxruntime.json", "frontier.png", "frontier.svg",
                 "layers.png", ".heldout.txt.x1y2.tmp"):
        (tmp_path / name).write_text("")
    (tmp_path / "family").mkdir()
    check_demo_folder(tmp_path)  # an interrupted demo's family folder: empty
    manifest = {"source": {"model": resolve_model("minilm").location}}
    (tmp_path / "family" / "family.json").write_text(json.dumps(manifest))
    check_demo_folder(tmp_path)  # a family of the bundled model: the demo rebuilds it
    manifest["source"]["model"] = "/elsewhere/my-model"
    (tmp_path / "family" / "family.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"did not write \(family\)"):  # the user's own family: never rebuilt
        check_demo_folder(tmp_path)
