"""plot: reading family reports, the frontier and per-layer pictures, and every bad input."""

import json
import logging

import pytest
from matplotlib.image import imread

from ziplm_planner.errors import UserError
from ziplm_planner.plot import FamilyData, plot_frontier, plot_layers, read_families, read_family

SPEC = {"backend": "onnxruntime", "device": "cpu", "batch_size": 8, "seq_len": 128, "mode": "prefill"}
STSB = {"stsb": {"higher_is_better": True, "label": "STS-B Spearman x100", "data": "sts-dev.csv"}}


def member(target, speedup, score=None, met=True, attention=(12, 12, 12, 12), ffn=(1536,) * 4, loss=0.01):
    row = {"target": target, "folder": "dense" if target == 1 else f"x{target:g}", "met_target": met,
           "predicted_ms": 40 / target, "predicted_speedup": target, "measured_ms": 40 / speedup,
           "measured_speedup": speedup, "measured_median_ms": 41 / speedup, "measured_p10_ms": 40 / speedup,
           "measured_p90_ms": 43 / speedup, "dense_ms": 40.0, "dense_median_ms": 41.0, "speedup_median": speedup,
           "parameters": int(22e6 / speedup), "calibration_loss": loss, "replans": 0,
           "kept_attention": list(attention), "kept_ffn": list(ffn)}
    if score is not None:
        row["scores"] = score
    return row


def write_family(folder, rows, method=None, scores_meta=None, fmt="ziplm-planner/family/v1"):
    metadata = {"model": "sentence-transformers/all-MiniLM-L6-v2", "model_kind": "embedding", "spec": SPEC,
                "estimator": "p10", **({"method": method} if method else {}),
                **({"scores_meta": scores_meta} if scores_meta else {})}
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"format": fmt, "metadata": metadata, "members": rows}))
    return folder


def ziplm_rows(scored=True):
    s = (lambda v: {"stsb": v}) if scored else (lambda v: None)
    return [member(1.0, 1.0, s(87.0)),
            member(1.5, 1.53, s(86.5), attention=(12, 9, 8, 6), ffn=(1536, 1200, 900, 700), loss=0.02),
            member(2.0, 2.04, s(85.1), attention=(10, 6, 4, 0), ffn=(1400, 800, 500, 0), loss=0.04),
            member(3.0, 2.71, s(81.0), met=False, attention=(6, 3, 2, 0), ffn=(900, 300, 200, 0), loss=0.09)]


@pytest.fixture
def families(tmp_path):
    write_family(tmp_path / "fam-ziplm", ziplm_rows(), scores_meta=STSB)  # no "method": ziplm
    write_family(tmp_path / "fam-magnitude", [member(1.0, 1.0, {"stsb": 87.0}),
                                              member(1.5, 1.5, {"stsb": 83.0}, attention=(8,) * 4),
                                              member(2.0, 1.98, {"stsb": 76.0}, attention=(6,) * 4)],
                 method="magnitude", scores_meta=STSB)
    return read_families([tmp_path / "fam-ziplm", tmp_path / "fam-magnitude"])


def svg_text(paths):
    return next(p for p in paths if p.suffix == ".svg").read_text()


def png_size(paths):
    image = imread(next(p for p in paths if p.suffix == ".png"))
    return image.shape[1], image.shape[0]  # (width, height) in pixels


def test_read_family_names_and_rows(families):
    assert [f.name for f in families] == ["ziplm", "magnitude"]
    assert len(families[0].rows) == 4 and families[0].metadata["estimator"] == "p10"


def test_frontier_writes_png_and_svg_with_labels(families, tmp_path):
    paths = plot_frontier(families, tmp_path / "frontier.png")
    assert paths == [tmp_path / "frontier.png", tmp_path / "frontier.svg"]
    assert all(p.stat().st_size > 1000 for p in paths)
    text = svg_text(paths)
    for label in ("ziplm", "magnitude", "dense", "missed its target", "STS-B Spearman x100 (higher is better)",
                  "measured speedup over dense (p10 estimator)",
                  "latency, ms: the dense model's over each measured speedup", "1.5x", "3x",
                  "all-MiniLM-L6-v2", "batch 8 x 128 tokens"):
        assert label in text, label
    width, height = png_size(paths)
    assert 1500 <= width <= 2000 and 700 <= height <= 900  # 12 x 5.4 inches at 150 dpi
    assert not list(tmp_path.glob(".*.tmp"))


def test_frontier_svg_output_and_calibration_loss_without_scores(tmp_path):
    family = read_family(write_family(tmp_path / "uniform", ziplm_rows(scored=False), method="uniform"))
    paths = plot_frontier([family], tmp_path / "loss.svg")
    assert paths == [tmp_path / "loss.svg", tmp_path / "loss.png"]
    text = svg_text(paths)
    assert "calibration loss (lower is better; no evaluation scores)" in text and "uniform" in text


def test_frontier_picks_first_task_and_logs_it(tmp_path, caplog):
    rows = [member(1.0, 1.0, {"perplexity": 20.0, "fidelity": 1.0}), member(2.0, 2.0, {"perplexity": 25.0, "fidelity": 0.99})]
    family = read_family(write_family(tmp_path / "fam", rows, method="kwon"))
    with caplog.at_level(logging.INFO, logger="ziplm_planner.plot"):
        text = svg_text(plot_frontier([family], tmp_path / "f.png"))
    assert "perplexity (lower is better)" in text and "plotting perplexity" in caplog.text
    assert "fidelity (higher is better)" in svg_text(plot_frontier([family], tmp_path / "g.png", task="fidelity"))
    with pytest.raises(UserError, match="no family has scores for task 'stsb'"):
        plot_frontier([family], tmp_path / "h.png", task="stsb")


def test_families_sharing_a_method_are_named_by_folder(tmp_path):
    folders = [write_family(tmp_path / name, ziplm_rows(), method="layerdrop") for name in ("run-a", "run-b")]
    families = read_families(folders)
    assert [f.name for f in families] == ["run-a", "run-b"]
    text = svg_text(plot_frontier(families, tmp_path / "f.png"))
    assert "run-a" in text and "run-b" in text


def test_families_in_folders_of_one_name_are_named_by_their_runs(tmp_path):
    """Two runs of one method write families of the same folder name: the legend and the per-family
    pictures must still tell them apart."""
    folders = [write_family(tmp_path / run / "ziplm-gradual", ziplm_rows()) for run in ("run-a", "run-b")]
    other = write_family(tmp_path / "magnitude", ziplm_rows(), method="magnitude")
    families = read_families([*folders, other])
    assert [f.name for f in families] == ["run-a/ziplm-gradual", "run-b/ziplm-gradual", "magnitude"]
    text = svg_text(plot_frontier(families, tmp_path / "f.png"))
    assert "run-a/ziplm-gradual" in text and "run-b/ziplm-gradual" in text


def test_layers_writes_png_and_svg(families, tmp_path):
    paths = plot_layers(families[0], tmp_path / "layers.png")
    assert all(p.stat().st_size > 1000 for p in paths)
    text = svg_text(paths)
    for label in ("attention (query heads)", "FFN neurons", "x1.5", "x3", "MISSED", "layer", "ziplm: kept structures"):
        assert label in text, label
    assert "dense: 1.00x" not in text  # the dense member is the reference, not a panel
    width, height = png_size(paths)
    assert width >= 1000 and height >= 3 * 1.5 * 150


def test_layers_reads_a_report_written_by_compress(tmp_path):
    from ziplm_planner.family import FamilyReport
    from ziplm_planner.adapters.base import ModelShape
    from ziplm_planner.surgery import LayerPlan, PruningPlan
    from ziplm_planner.timing import TimingStats
    from ziplm_planner.verify import Measurement, MemberResult

    shape = ModelShape("bert", 2, 32, 4, 1, 8, 64, 100)
    fast, slow = TimingStats(1.0, 1.0, 1.1, 1.2, 5), TimingStats(2.0, 2.0, 2.1, 2.2, 5)
    half = PruningPlan(shape, [LayerPlan([0, 1], list(range(32))), LayerPlan([], [])])
    results = [MemberResult(1.0, "dense", PruningPlan.dense(shape), 2.0,
                            Measurement(slow, slow, "p10", (1.0, 1.0), 5, False, "torch module"), 0.0, 1000),
               MemberResult(2.0, "x2", half, 1.0, Measurement(fast, slow, "p10", (1.9, 2.1), 5, False, "torch module"), 0.1, 500)]
    (tmp_path / "fam").mkdir()
    FamilyReport([r.row(2.0) for r in results], {"model": "tiny", "spec": SPEC, "estimator": "p10"}).save(tmp_path / "fam")
    family = read_family(tmp_path / "fam")
    assert "x2: 2.00x measured" in svg_text(plot_layers(family, tmp_path / "layers.svg"))


def test_nothing_is_left_when_rendering_fails(families, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", fail)
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError):
        plot_frontier(families, tmp_path / "out" / "f.png")
    assert list((tmp_path / "out").iterdir()) == []


def corrupt(folder):
    folder.mkdir()
    (folder / "report.json").write_text('{"format": "ziplm-planner/fam')


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.write_text("x"), "is not a folder"),
    (lambda d: d.mkdir(), "has no report.json: run `ziplm-planner compress` first"),
    (corrupt, "is corrupt"),
    (lambda d: write_family(d, ziplm_rows(), fmt="ziplm-planner/table/v3"), "not a ziplm-planner family report"),
    (lambda d: write_family(d, []), "no metadata or no members"),
    (lambda d: write_family(d, [{"target": 1.0, "folder": "dense"}]), "lacks met_target"),
    (lambda d: write_family(d, [{**member(1.0, 1.0), "measured_speedup": "fast"}]), "malformed values"),
    (lambda d: write_family(d, [member(1.0, 1.0, score=[87.0])]), "malformed values"),
    (lambda d: write_family(d, [member(1.0, 1.0), member(2.0, 2.0, attention=(6, 6))]), "differ in their number of layers"),
])
def test_bad_family_folders(tmp_path, make, message):
    make(tmp_path / "fam")
    with pytest.raises(UserError, match=message) as err:
        read_family(tmp_path / "fam")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("output, message", [
    ("frontier.pdf", "must end with .png or .svg"),
    ("missing/frontier.png", "does not exist"),
    (".", "must end with .png or .svg"),
])
def test_bad_outputs(families, tmp_path, output, message):
    with pytest.raises(UserError, match=message):
        plot_frontier(families, tmp_path / output)
    with pytest.raises(UserError, match=message):
        plot_layers(families[0], tmp_path / output)


def test_no_families():
    with pytest.raises(UserError, match="no family to plot"):
        plot_frontier([], "f.png")


def test_family_without_values_is_left_out(families, tmp_path, caplog):
    unscored = FamilyData("uniform", [member(1.0, 1.0), member(2.0, 2.0)], families[0].metadata, tmp_path)
    with caplog.at_level(logging.WARNING):
        text = svg_text(plot_frontier([*families, unscored], tmp_path / "f.png"))
    assert "family uniform has no stsb values" in caplog.text and "magnitude" in text


def test_training_curves_are_drawn_for_recovered_families_only(families, tmp_path):
    from ziplm_planner.plot import family_label, plot_training, slug

    folder = write_family(tmp_path / "fam-gradual", ziplm_rows())
    report = json.loads((folder / "report.json").read_text())
    report["metadata"]["settings"] = {"recovery": {"mode": "gradual"}}
    (folder / "report.json").write_text(json.dumps(report))
    for target, start in ((1.5, 3.0), (2.0, 5.0)):
        (folder / f"x{target:g}").mkdir()
        curve = [{"step": s, "tokens": 100 * s, "loss": start / s, "kl": 0.1 / s, "squarehead": start / s - 0.1 / s}
                 for s in range(1, 11)]
        (folder / f"x{target:g}" / "measurement.json").write_text(json.dumps({"training": {"curve": curve}}))
    family = read_family(folder)
    assert family.name == family_label(report["metadata"]) == "ziplm + gradual recovery"
    assert slug(family.name) == "ziplm-gradual-recovery"
    assert family_label({"method": "ziplm", "settings": {"recovery": {"mode": "gradual", "prune_steps": 2}}}) == \
        "ziplm + gradual recovery, 2 steps"
    paths = plot_training(family, tmp_path / "training.png")
    text = svg_text(paths)
    for label in ("x1.5", "x2", "tokens seen", "squarehead", "total loss", "ziplm + gradual recovery"):
        assert label in text, label
    assert plot_training(families[0], tmp_path / "none.png") == [] and not (tmp_path / "none.png").exists()


def test_scores_spanning_orders_of_magnitude_get_a_log_axis():
    from ziplm_planner.plot import wide_positive

    assert wide_positive([29.7, 60.9, 2.3e10])  # collapsed baselines beside a good method
    assert wide_positive([29.7, 38.8, 908.3])  # a baseline without recovery beside recovered members
    assert not wide_positive([29.7, 60.9, 225.3]) and not wide_positive([0.8, 0.86]) and not wide_positive([-1.0, 500.0])


def test_latencies_are_drawn_on_the_dense_models_clock(tmp_path):
    """Members timed in rounds where the machine ran slow keep their place: latency is the dense model's
    measured time over each member's speedup, not the member's own milliseconds."""
    from ziplm_planner.plot import dense_clock_latencies, scored_rows

    rows = ziplm_rows()
    rows[1]["measured_ms"], rows[2]["measured_ms"] = 40.0, 45.0  # 1.53x and 2.04x, timed when dense took 61 and 92 ms
    family = read_family(write_family(tmp_path / "drifted", rows, scores_meta=STSB))
    points = scored_rows(family, "stsb")
    assert dense_clock_latencies(family, points) == pytest.approx([40.0, 40 / 1.53, 40 / 2.04, 40 / 2.71])
    without_dense = FamilyData("ziplm", rows[1:], family.metadata, family.folder)
    assert dense_clock_latencies(without_dense, points[1:]) == [40.0, 45.0, 40 / 2.71]
