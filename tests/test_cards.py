"""Model cards made from the run's records, and the command a family records being the one that makes it."""

import json

import pytest
from huggingface_hub import metadata_load

from ziplm_planner.cli import cli, settings_from
from ziplm_planner.evaluate import evaluate_family
from ziplm_planner.pipeline import compress_model
from ziplm_planner.settings import CompressSettings, ContrastiveSettings, LossWeights, RecoverySettings, TrainSettings, command_flags
from tiny_models import measured_table, tiny_loaded_with_tokenizer, write_sentences


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cards")
    loaded = tiny_loaded_with_tokenizer("bert")
    calib = write_sentences(tmp / "calib.txt")
    settings = CompressSettings(num_samples=48, search_evaluations=4, score_samples=16, verify_rounds=3, max_replans=0,
                                cache_dir=tmp / "cache")
    compress_model(loaded, measured_table(loaded), [1.2], str(calib), tmp / "family", settings)
    return tmp / "family", calib


def test_every_member_and_the_family_have_a_model_card(family):
    folder, _ = family
    report = json.loads((folder / "report.json").read_text())
    for row in report["members"]:
        card = (folder / row["folder"] / "README.md").read_text()
        meta = metadata_load(folder / row["folder"] / "README.md")
        assert {"pruned", "ziplm-planner"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
        assert f"{row['measured_speedup']:.2f}x" in card and report["metadata"]["command"] in card
        assert "AutoModel.from_pretrained" in card and "load_pruned" in card and "model.onnx" in card
    assert "x1.2" in (folder / "README.md").read_text()


def test_cards_show_the_scores_evaluate_adds(family):
    folder, calib = family
    evaluate_family(folder, "fidelity", str(calib))
    assert "fidelity" in (folder / "x1.2" / "README.md").read_text() and "(dense 1" in (folder / "x1.2" / "README.md").read_text()
    assert "fidelity" in (folder / "README.md").read_text()


def test_the_recorded_command_gives_the_same_settings():
    settings = CompressSettings(method="uniform", verify=False, max_replans=1, machine_tolerance=2.0, recovery=RecoverySettings(
        mode="gradual", train=TrainSettings(tokens=1000, weights=LossWeights(task=0.0, kl=1.0, squarehead=0.5,
                                                                              contrastive=0.25, temperature=3.0),
                                            contrastive=ContrastiveSettings(teachers=("dense", "snapshots"), memory=8))))
    flags = command_flags(settings)
    assert "--no-verify" in flags and flags[flags.index("--loss-weights") + 1] == "0,1,0.5,0.25"
    assert flags[flags.index("--contrastive-teachers") + 1] == "dense,snapshots"
    # under the root's context, as the command line parses it (click keeps the help option a first context made)
    root = cli.make_context("ziplm-planner", ["compress"])
    context = cli.commands["compress"].make_context("compress", ["--profile", "t.json", "--targets", "2", "--calib", "c",
                                                                  *flags, "-o", "out"], parent=root)
    parsed = settings_from(CompressSettings, context.params)
    assert parsed == settings
    assert command_flags(CompressSettings()) == []


def test_the_base_model_a_card_names_is_a_hub_id_or_none(tmp_path):
    from ziplm_planner.aliases import ModelSource

    assert ModelSource("minilm", str(tmp_path)).hub_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert ModelSource("org/model", "org/model").hub_id == "org/model"  # a hub id: not a local path
    assert ModelSource(str(tmp_path), str(tmp_path)).hub_id is None  # a local folder names no hub model


def test_weights_set_in_part_are_recorded_with_the_kinds():
    from ziplm_planner.kinds import CAUSAL_LM, EMBEDDING

    # --loss-weights gives all four or leaves all to the kind: one set in Python is recorded with the kind's
    settings = CompressSettings(recovery=RecoverySettings(mode="oneshot", train=TrainSettings(weights=LossWeights(task=0.0))))
    assert [command_flags(settings.recorded(kind))[-1] for kind in (EMBEDDING, CAUSAL_LM)] == ["0,1,1,0.1", "0,1,0,0"]
    left = CompressSettings(recovery=RecoverySettings(mode="oneshot"))
    assert command_flags(left.recorded(EMBEDDING)) == ["--recovery", "oneshot"]
