"""compress: a verified family from a model, a table and targets; the level database and stitching."""

import dataclasses
import json
import re
import shutil

import pytest
import torch

from ziplm_planner.backends import backend_named
from ziplm_planner.adapters import ATTENTION, FFN, REMOVED_ATTENTION, AttentionLevel, model_layers
from ziplm_planner.calibrate import load_calibration
from ziplm_planner.family import parse_targets
from ziplm_planner.pipeline import compress_model
from ziplm_planner.settings import CompressSettings
from ziplm_planner.database import build_database
from ziplm_planner.stitch import stitch, stitch_sequential
from ziplm_planner.errors import UserError
from ziplm_planner.export import load_pruned
from ziplm_planner.retime import verify_family
from ziplm_planner.verify import REPLAN_REACH, Measurement, next_budget, replan_bounds, verdict, verified_member
from tiny_models import needs_llama_cpp, linear_table, measured_table, random_calibration, tiny_loaded, tiny_loaded_with_tokenizer, write_sentences


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    loaded = tiny_loaded_with_tokenizer("bert")
    table = measured_table(loaded)
    calib = write_sentences(tmp_path_factory.mktemp("data") / "calib.txt")
    return loaded, table, calib


def within(table, target):
    """A target the tiny model's measured table can reach (its maximum speedup is timing-dependent)."""
    return round(min(target, 1 + 0.8 * (table.max_speedup - 1)), 2)


def fast_settings(tmp_path, **kw):
    return CompressSettings(**{"num_samples": 48, "search_evaluations": 4, "score_samples": 16, "verify_rounds": 3,
                               "cache_dir": tmp_path / "cache", **kw})


def test_compress_writes_a_loadable_family_within_budget(setup, tmp_path):
    loaded, table, calib = setup
    out = tmp_path / "family"
    high = within(table, 2.0)
    report = compress_model(loaded, table, [1.2, high], str(calib), out, fast_settings(tmp_path, max_replans=0))
    rows = {r["folder"]: r for r in report.rows}
    assert set(rows) == {"dense", "x1.2", f"x{high:g}"}
    for name in ("x1.2", f"x{high:g}"):
        row = rows[name]
        assert row["predicted_speedup"] >= row["target"] * 0.999  # the DP stays within the budget
        assert row["parameters"] < rows["dense"]["parameters"]
        member = load_pruned(out / name)
        assert [len(layer.attention.self.query.weight) // 8 if hasattr(layer.attention, "self") else 0
                for layer in model_layers(member)] == row["kept_attention"]
        assert (out / name / "model.onnx").exists() and (out / name / "pruning.json").exists()
    saved = json.loads((out / "report.json").read_text())
    assert [m["folder"] for m in saved["members"]] == ["dense", "x1.2", f"x{high:g}"]
    assert (out / "report.csv").read_text().startswith("target,folder")


def test_second_run_with_a_new_target_reuses_the_level_database(setup, tmp_path):
    loaded, table, calib = setup
    settings = fast_settings(tmp_path, onnx=False)
    first = compress_model(loaded, table, [1.2], str(calib), tmp_path / "a", settings)
    second = compress_model(loaded, table, [1.2, within(table, 1.8)], str(calib), tmp_path / "b", settings)
    assert not first.metadata["level_database"].get("cached")
    assert second.metadata["level_database"]["cached"]


def test_held_out_scoring_scores_on_samples_the_hessians_never_saw(setup, tmp_path, caplog):
    from ziplm_planner.calibrate import CalibrationLoss
    from ziplm_planner.pipeline import score_batches

    loaded, table, calib = setup
    calibration = load_calibration(loaded, str(calib), 16, 32, held_out=8)
    assert torch.equal(calibration.tokens.input_ids, load_calibration(loaded, str(calib), 16, 32).tokens.input_ids)
    seen = {tuple(row) for row in calibration.tokens.input_ids.tolist()}
    scored = [tuple(row) for batch in score_batches(calibration, fast_settings(tmp_path, score_samples=8,
                                                                              score_on="held-out"))
              for row in batch["input_ids"].tolist()]
    assert len(scored) == 8 and not seen & set(scored)
    with caplog.at_level("WARNING"):
        assert len(score_batches(calibration, fast_settings(tmp_path, score_samples=12, score_on="held-out"))[0]
                   ["input_ids"]) == 8
    assert "8 samples beyond the 32 the Hessians use, fewer than the 12" in caplog.text

    settings = fast_settings(tmp_path, onnx=False, max_replans=0, score_on="held-out")
    report = compress_model(loaded, table, [1.2], str(calib), tmp_path / "family", settings)
    held_out = load_calibration(loaded, str(calib), 16, 48, held_out=16).batches(16, held_out=True)
    member = load_pruned(tmp_path / "family" / report.rows[1]["folder"])
    loss = CalibrationLoss(loaded.model, loaded.kind, held_out)(member)
    assert loss > 0 and report.rows[1]["calibration_loss"] == pytest.approx(loss, rel=1e-5)


def test_level_database_errors_and_stitching(setup):
    loaded, table, calib = setup
    calibration = load_calibration(loaded, str(calib), 16, 32)
    db = build_database(loaded.model, calibration, table)
    shape = loaded.shape
    for layer in db.blocks:
        for block, full, removed in ((ATTENTION, shape.full_attention, REMOVED_ATTENTION), (FFN, shape.intermediate_size, 0)):
            trace = layer[block]
            assert trace.levels[0] == full and trace.levels[-1] == removed
            assert trace.errors[0] == pytest.approx(0, abs=1e-9) and trace.errors[-1] == pytest.approx(1, abs=1e-6)
            assert all(a <= b + 1e-9 for a, b in zip(trace.errors, trace.errors[1:]))
            assert all(set(b) <= set(a) for a, b in zip(trace.kept_sets, trace.kept_sets[1:]))  # nested
    full = [(shape.full_attention, shape.intermediate_size)] * shape.num_layers
    dense_copy, plan = stitch(loaded.model, db, full)
    batch = calibration.batches(4)[0]
    with torch.no_grad():
        torch.testing.assert_close(dense_copy(**batch).last_hidden_state, loaded.model(**batch).last_hidden_state)
    counts = [(AttentionLevel(2, 1), 32), (AttentionLevel(3, 1), 16)]
    pruned, plan = stitch(loaded.model, db, counts)
    assert plan.kept_counts() == counts
    sequential, seq_plan = stitch_sequential(loaded.model, db, counts, calibration)
    assert seq_plan.kept_counts() == counts
    with torch.no_grad():
        assert torch.isfinite(sequential(**batch).last_hidden_state).all()


def test_level_database_holds_query_heads_inside_groups():
    """2 KV groups of 2 query heads: every (groups, heads) level, each regular and nested in the whole-group
    level of as many groups; a stitched choice of them rebuilds from its plan, and a database built on a
    model already cut to one head per group goes on from there."""
    from ziplm_planner.surgery import build_pruned, regular_groups

    loaded = tiny_loaded("llama", causal_lm=True)
    shape = loaded.shape
    calibration = random_calibration(loaded, samples=32)
    db = build_database(loaded.model, calibration, linear_table(loaded))
    levels = [AttentionLevel(2, 2), AttentionLevel(2, 1), AttentionLevel(1, 2), AttentionLevel(1, 1), REMOVED_ATTENTION]
    for layer in db.blocks:
        trace = layer[ATTENTION]
        assert trace.levels == levels
        for level, kept in zip(trace.levels, trace.kept_sets):
            groups, per_group = regular_groups(kept, shape.q_per_unit)
            assert (len(groups), per_group) == level
        assert set(trace.kept(AttentionLevel(1, 1))) < set(trace.kept(AttentionLevel(1, 2)))
        error = dict(zip(trace.levels, trace.errors))
        assert error[levels[0]] <= error[levels[1]] and error[levels[2]] <= error[levels[3]] <= error[REMOVED_ATTENTION]
    counts = [(AttentionLevel(2, 1), 48), (AttentionLevel(1, 1), 32)]
    model, plan = stitch(loaded.model, db, counts)
    assert plan.kept_counts() == counts and plan.layers[0].query_heads is not None
    rebuilt = build_pruned(type(model), loaded.model.config, plan, model.state_dict())
    batch = calibration.batches(4)[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch).logits, model(**batch).logits)
    assert stitch_sequential(loaded.model, db, counts, calibration)[1].kept_counts() == counts

    on_pruned = build_database(model, calibration, linear_table(loaded), base=plan)
    assert on_pruned.blocks[0][ATTENTION].levels == [AttentionLevel(2, 1), AttentionLevel(1, 1), REMOVED_ATTENTION]
    further = [(AttentionLevel(1, 1), 16), (REMOVED_ATTENTION, 16)]
    smaller, smaller_plan = stitch(model, on_pruned, further)
    assert smaller_plan.kept_counts() == further
    assert set(smaller_plan.layers[0].heads(shape)) < set(plan.layers[0].heads(shape))


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_fisher_block_errors_are_relative_errors_in_loss_units(model_type, tmp_path):
    """With the model's kind, each block's errors are its relative OBS errors times its block Fisher
    (floored), which the database keeps on disk; the search sees them, the traces are unchanged."""
    from ziplm_planner.database import LevelDatabase
    from ziplm_planner.fisher import block_fisher

    loaded = tiny_loaded(model_type, causal_lm=model_type == "llama")
    calibration = random_calibration(loaded, samples=16)
    table = linear_table(loaded)
    relative = build_database(loaded.model, calibration, table)
    fisher = build_database(loaded.model, calibration, table, kind=loaded.kind)
    assert relative.loss_scales is None
    expected = block_fisher(loaded.model, loaded.kind, calibration.batches())
    assert [[layer[b] for b in (ATTENTION, FFN)] for layer in fisher.loss_scales] == \
        [[pytest.approx(layer[b]) for b in (ATTENTION, FFN)] for layer in expected]
    for plain, scaled in zip(relative.search_blocks(table), fisher.search_blocks(table)):
        layer, block = int(plain.name.split(".")[0][5:]), plain.name.split(".")[1]
        assert scaled.levels == plain.levels and scaled.times == plain.times
        assert scaled.errors == pytest.approx([fisher.loss_scales[layer][block] * e for e in plain.errors])
    fisher.save(tmp_path / "db.pt")
    assert LevelDatabase.load(tmp_path / "db.pt").loss_scales == fisher.loss_scales


def test_block_fisher_is_floored_so_no_present_block_is_free():
    from ziplm_planner.database import FISHER_FLOOR, floored

    scales = floored([{ATTENTION: 0.0, FFN: 3.0}, {ATTENTION: 1e-9, FFN: 1.0}])
    floor = FISHER_FLOOR * (3.0 + 1e-9 + 1.0) / 3
    assert scales == [{ATTENTION: 0.0, FFN: 3.0}, {ATTENTION: pytest.approx(floor), FFN: 1.0}]


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_corrected_stitch_keeps_the_structures_and_fits_the_dense_output(model_type):
    """OBS toward the dense output: the database's structures, weights refit layer by layer on the
    compressed model's inputs. Nothing pruned, it is the dense model; pruned, it is closer to the
    dense model's output than plain stitching."""
    loaded = tiny_loaded(model_type, causal_lm=model_type == "llama")
    shape = loaded.shape
    calibration = random_calibration(loaded, samples=32)
    db = build_database(loaded.model, calibration, linear_table(loaded))
    batches = calibration.batches(8)

    def output(model, batch):
        with torch.no_grad():
            out = model(**batch)
        return out.logits if model_type == "llama" else out.last_hidden_state

    full = [(shape.full_attention, shape.intermediate_size)] * shape.num_layers
    dense_copy, _ = stitch(loaded.model, db, full, correction=calibration)
    torch.testing.assert_close(output(dense_copy, batches[0]), output(loaded.model, batches[0]), rtol=1e-4, atol=1e-5)

    counts = [(AttentionLevel(1, 1), 32), (AttentionLevel(shape.attention_units, 1), 16)]  # llama: a head per group
    plain, plan = stitch(loaded.model, db, counts)
    corrected, corrected_plan = stitch(loaded.model, db, counts, correction=calibration)
    assert corrected_plan == plan
    assert [p.shape for p in corrected.parameters()] == [p.shape for p in plain.parameters()]

    def error(model):
        return sum(float((output(model, b) - output(loaded.model, b))[b["attention_mask"].bool()].square().sum())
                   for b in batches)

    assert error(corrected) < error(plain)


def stats(ms):
    from ziplm_planner.timing import TimingStats

    return TimingStats(ms, ms, ms, ms, 1)


def small_database():
    """A hand-made level database: 1 layer, 2 heads of width 4, 3 FFN neurons (no model needed)."""
    from ziplm_planner.adapters import ModelShape
    from ziplm_planner.database import BlockTrace, LevelDatabase

    shape = ModelShape("bert", 1, 8, 2, 1, 4, 3, 10)
    levels = [AttentionLevel(2, 1), AttentionLevel(1, 1), REMOVED_ATTENTION]
    blocks = [{ATTENTION: BlockTrace(levels, [0.0, 0.4, 1.0], [[0, 1], [0], []], torch.eye(8, dtype=torch.float64)),
               FFN: BlockTrace([3, 2, 1, 0], [0.0, 0.2, 0.5, 1.0], [[0, 1, 2], [0, 1], [1], []],
                               torch.eye(3, dtype=torch.float64))}]
    return LevelDatabase(shape, blocks, 0.01, {"seconds": 1.0})


class Foreign:
    pass


def payload_with(change):
    payload = small_database().payload()
    change(payload)
    return payload


def torch_bytes(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content", [
    b"", bytes(range(256)) * 4, torch_bytes(torch.zeros(3)), torch_bytes([1, 2]), torch_bytes(Foreign()),
    torch_bytes({"format": "something else"}),
    torch_bytes(payload_with(lambda p: p["blocks"].append(p["blocks"][0]))),
    torch_bytes(payload_with(lambda p: p["blocks"][0].pop(FFN))),
    torch_bytes(payload_with(lambda p: p["blocks"][0][FFN].update(kept=[torch.tensor(k) for k in ([0, 0, 1], [0], [1], [])]))),
    torch_bytes(payload_with(lambda p: p["blocks"][0][FFN].update(kept=[torch.tensor(k) for k in ([0, 1, 3], [0], [1], [])]))),
    torch_bytes(payload_with(lambda p: p["blocks"][0][ATTENTION].update(hessian=torch.eye(3)))),
    torch_bytes(payload_with(lambda p: p["blocks"][0][ATTENTION].update(errors=[0.0]))),
    torch_bytes(payload_with(lambda p: p.update(loss_scales=[{ATTENTION: -1.0, FFN: 1.0}]))),
    torch_bytes(payload_with(lambda p: p.update(loss_scales=[{ATTENTION: 1.0}]))),
], ids=["empty", "random", "tensor", "list", "foreign-object", "other-format", "extra-layer", "missing-block",
        "repeated-structure", "structure-out-of-range", "bad-hessian", "missing-errors", "negative-loss-scale",
        "missing-loss-scale"])
def test_unreadable_cache_entry_is_deleted_and_rebuilt(tmp_path, caplog, content):
    from ziplm_planner.database import cached_database

    (tmp_path / "leveldb-k.pt").write_bytes(content)
    built = []
    build = lambda: built.append(1) or small_database()
    db = cached_database(tmp_path, "k", build)
    assert built == [1] and not db.metadata.get("cached")
    assert "deleting unreadable level-database cache" in caplog.text
    again = cached_database(tmp_path, "k", build)
    assert built == [1] and again.metadata["cached"]
    assert again.blocks[0][FFN].kept(1) == [1] and again.blocks[0][ATTENTION].kept(AttentionLevel(1, 1)) == [0]
    assert again.blocks[0][ATTENTION].hessian.shape == (8, 8)


def test_unwritable_cache_is_a_warning(tmp_path, caplog):
    from ziplm_planner.database import cached_database

    (tmp_path / "cache").write_text("a file where the cache folder should be")
    db = cached_database(tmp_path / "cache", "k", small_database)
    assert db.shape.num_layers == 1 and "cannot store the level database" in caplog.text


class StubVerifier:
    """Measures each successive member at `factor` x the target speedup (the last factor repeats)."""

    def __init__(self, table, factors):
        self.table, self.factors = table, list(factors)

    def measure_dense(self):
        return Measurement(stats(self.table.dense_ms), stats(self.table.dense_ms), "p10", (1.0, 1.0), 1, False, "torch module")

    def measure(self, model, target):
        factor = self.factors.pop(0) if len(self.factors) > 1 else self.factors[0]
        speedup = target * factor
        member, dense = stats(self.table.dense_ms / speedup), stats(self.table.dense_ms)
        return Measurement(member, dense, "p10", (speedup, speedup), 1, verdict(speedup, target) != "met",
                           "torch module")


class BudgetRecorder:
    """A planner that records the budgets it is asked to plan for."""

    def __init__(self, planner):
        self.planner, self.budgets = planner, []

    def build(self, budget):
        self.budgets.append(budget)
        return self.planner.build(budget)


@pytest.mark.parametrize("factors,expected_replans,status", [
    ([1.0], 0, "met"),  # as predicted: no re-plan
    ([0.8, 1.0], 1, "met"),  # slower than predicted: one tighter re-plan
    ([0.8], None, "missed"),  # never meets: bounded (re-plans, or how far they may move), reported as missed
    ([1.3, 1.0], 1, "met"),  # overshoots 1.10x: a looser plan that still meets is kept
    ([1.3, 0.9], 3, "overshot"),  # every looser plan misses: the first is kept, reported as overshot
    ([0.9, 1.47, 1.0], 2, "met"),  # a miss, then an overshoot: the next budget lies between the two
])
def test_members_are_replanned_until_measured_inside_the_band(setup, tmp_path, factors, expected_replans, status):
    from ziplm_planner.calibrate import CalibrationLoss
    from ziplm_planner.database import build_database
    from ziplm_planner.ziplm import ZipLMPlanner

    loaded, table, calib = setup
    settings = fast_settings(tmp_path)
    calibration = load_calibration(loaded, str(calib), 16, 32)
    loss = CalibrationLoss(loaded.model, loaded.kind, calibration.batches(16))
    planner = BudgetRecorder(ZipLMPlanner(loaded, table, build_database(loaded.model, calibration, table), calibration,
                                     settings, loss))
    target = within(table, 1.5)
    result, model = verified_member(planner, target, table, StubVerifier(table, factors), loss, settings.max_replans)
    budgets = planner.budgets
    if expected_replans is None:  # bounded: every re-plan spent, or the budget at the least re-plans may give it
        assert result.replans == settings.max_replans or budgets[-1] == pytest.approx(replan_bounds(table, target)[0])
    else:
        assert result.replans == expected_replans
    assert result.status == status and result.met == (status == "met") and len(result.history) == result.replans + 1
    assert sum(p.numel() for p in model.parameters()) == result.parameters  # the model of the result kept
    if status != "missed":
        assert result.speedup >= 0.97 * target
        assert result.speedup == min(s for s in result.history if s >= 0.97 * target)  # the closest that meets
    else:
        assert result.speedup == max(result.history)  # none met: the fastest
    assert len(result.predicted_history) == len(budgets)  # each plan tried: the table's speedup for it, within its budget
    assert all(table.dense_ms / budget - 1e-9 <= speedup for budget, speedup in zip(budgets, result.predicted_history))
    assert all(budgets[0] / REPLAN_REACH <= budget <= budgets[0] * REPLAN_REACH for budget in budgets)
    if factors[:2] == [0.9, 1.47]:
        assert budgets[1] < budgets[2] < budgets[0]


def test_next_budget_stays_between_the_budgets_that_met_and_missed():
    # missed at 10 ms (0.9x), met far too fast at 6 ms (1.47x): the scaled guess 8.8 ms is fine
    assert next_budget(6.0, 2.94, 2.0, fast=[6.0], slow=[10.0], bounds=(1.0, 20.0)) == pytest.approx(8.82)
    # a guess at or past a budget that missed falls back to the geometric midpoint
    assert next_budget(6.0, 4.0, 2.0, fast=[6.0], slow=[10.0], bounds=(1.0, 20.0)) == pytest.approx((6.0 * 10.0) ** 0.5)
    # a first miss tightens by the shortfall and 1% more
    assert next_budget(10.0, 1.8, 2.0, fast=[], slow=[10.0], bounds=(1.0, 20.0)) == pytest.approx(10.0 * 0.9 * 0.99)
    # never past the bounds, however far off the measurement
    assert next_budget(10.0, 0.1, 2.0, fast=[], slow=[10.0], bounds=(3.0, 20.0)) == 3.0
    assert next_budget(10.0, 9.0, 2.0, fast=[10.0], slow=[], bounds=(3.0, 15.0)) == 15.0


@pytest.mark.parametrize("speedup,status", [(1.94, "met"), (2.2, "met"), (1.93, "missed"), (2.21, "overshot")])
def test_verdict_accepts_0_97_to_1_10_times_the_target(speedup, status):
    assert verdict(speedup, 2.0) == status


def test_same_seed_table_and_data_give_the_same_family_byte_for_byte(setup, tmp_path, monkeypatch):
    """On a quiet machine (a verifier that measures what the table predicts), every pruning.json is
    reproduced exactly: the plan, the weights' checks, nothing that depends on the clock."""
    import ziplm_planner.pipeline as pipeline

    loaded, table, calib = setup
    monkeypatch.setattr(pipeline, "verifier_for", lambda loaded, table, *args: StubVerifier(table, [1.0]))
    targets = [1.2, within(table, 1.8)]
    for name in ("a", "b"):
        settings = fast_settings(tmp_path, cache_dir=tmp_path / f"cache-{name}")  # each builds its own database
        compress_model(loaded, table, targets, str(calib), tmp_path / name, settings)
    members = sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_dir())
    assert members == ["dense", "x1.2", f"x{targets[1]:g}"]
    for member in members:
        assert (tmp_path / "a" / member / "pruning.json").read_bytes() == \
            (tmp_path / "b" / member / "pruning.json").read_bytes()
        assert (tmp_path / "a" / member / "model.safetensors").read_bytes() == \
            (tmp_path / "b" / member / "model.safetensors").read_bytes()


@pytest.mark.parametrize("backend,model_type,mode", [
    ("onnxruntime", "bert", "prefill"), ("onnxruntime", "llama", "prefill"), ("onnxruntime", "llama", "decode"),
    pytest.param("llamacpp", "llama", "prefill", marks=needs_llama_cpp),
    pytest.param("llamacpp", "llama", "decode", marks=needs_llama_cpp),
])
def test_the_file_timed_is_the_file_that_ships(tmp_path, monkeypatch, backend, model_type, mode):
    """Prefill, or for a decoder one new token after a cached context: the member's model.onnx (ONNX
    Runtime) or model.gguf (llama.cpp) is timed (fed its KV cache in decode mode), ships byte for byte,
    and re-times with `verify`."""
    import ziplm_planner.familydir as familydir
    import ziplm_planner.profiler as profiler
    from ziplm_planner.gguf_export import NO_VOCABULARY

    monkeypatch.setattr(profiler, "model_vocabulary", lambda loaded: NO_VOCABULARY)  # MiniLM's WordPiece is no GGUF's
    loaded = tiny_loaded_with_tokenizer(model_type, causal_lm=model_type == "llama")
    shape = dict(seq_len=16) if mode == "prefill" else dict(seq_len=1, mode="decode", context=12)
    table = measured_table(loaded, backend=backend, **shape, **({"batch_size": 1} if backend == "llamacpp" else {}))
    shipped = backend_named(backend).member_file
    calib = write_sentences(tmp_path / "calib.txt")
    timed = {}
    real_save = familydir.save_member

    def save_and_record(folder, *args, timed_file=None, **kwargs):
        timed[folder.name] = timed_file.read_bytes()
        return real_save(folder, *args, timed_file=timed_file, **kwargs)

    monkeypatch.setattr(familydir, "save_member", save_and_record)
    report = compress_model(loaded, table, [within(table, 1.5)], str(calib), tmp_path / "family",
                            fast_settings(tmp_path, max_replans=0))
    for row in report.rows:
        assert row["timed_file"] == shipped
        assert (tmp_path / "family" / row["folder"] / shipped).read_bytes() == timed[row["folder"]]
        measurement = json.loads((tmp_path / "family" / row["folder"] / "measurement.json").read_text())
        assert measurement["measured_speedup"] == row["measured_speedup"]
    retimed = verify_family(tmp_path / "family", rounds=3)
    assert [r["folder"] for r in retimed] == [r["folder"] for r in report.rows]
    assert retimed[0]["speedup"] == 1.0 and retimed[0]["status"] == "met"
    assert all(r["timed"] == shipped and r["interval"][0] <= r["interval"][1] for r in retimed)
    monkeypatch.setattr(familydir, "save_member", real_save)
    again = compress_model(loaded, table, [within(table, 1.5)], str(calib), tmp_path / "family",
                           fast_settings(tmp_path, max_replans=0))  # every member reused: it still says what was timed
    assert again.rows == report.rows


@pytest.mark.parametrize("text,message", [
    ("1,0.5", "finite number > 1"), ("abc", "got 'abc'"), ("", "empty item"), ("1", "finite number > 1"),
    ("nan", "finite number > 1"), ("inf", "finite number > 1"), ("2,-inf", "finite number > 1"),
    ("1.5,,2", "empty item"), ("2,", "empty item"), ([], "no speedup targets"), ([2.0, float("nan")], "finite"),
])
def test_bad_targets_are_refused(text, message):
    with pytest.raises(UserError, match=message):
        parse_targets(text)


def test_targets_are_parsed_and_sorted():
    assert parse_targets(" 3, 1.5 ,2") == [1.5, 2.0, 3.0]


def test_target_beyond_the_tables_maximum_is_refused(setup, tmp_path):
    loaded, table, calib = setup
    with pytest.raises(UserError, match="maximum speedup"):
        compress_model(loaded, table, [table.max_speedup * 1.1], str(calib), tmp_path / "f", fast_settings(tmp_path))
    assert not (tmp_path / "f").exists()


def test_table_for_another_model_is_refused(setup, tmp_path):
    _, table, calib = setup
    other = tiny_loaded_with_tokenizer("llama", causal_lm=True)
    with pytest.raises(UserError, match="another model"):
        compress_model(other, table, [1.5], str(calib), tmp_path / "f", fast_settings(tmp_path))


def test_missing_calibration_file_is_refused(setup, tmp_path):
    loaded, table, _ = setup
    with pytest.raises(UserError, match="does not exist"):
        compress_model(loaded, table, [1.5], str(tmp_path / "none.txt"), tmp_path / "f", fast_settings(tmp_path))


def test_output_holding_other_files_is_refused_without_overwrite(setup, tmp_path):
    loaded, table, calib = setup
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        compress_model(loaded, table, [1.5], str(calib), out, fast_settings(tmp_path))
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("content", [b"\x00\xff garbage", b'{"source": ', b"[1, 2]", b'"just a string"'])
def test_unreadable_family_manifest_is_another_family(tmp_path, content):
    from ziplm_planner.familydir import prepare_family_dir

    out = tmp_path / "family"
    out.mkdir()
    (out / "family.json").write_bytes(content)
    (out / "x2").mkdir()
    manifest = {"format": "ziplm-planner/family/v1", "source": {"model": "m"}}
    with pytest.raises(UserError, match="holds other files, not a family: use another -o"):
        prepare_family_dir(out, manifest, overwrite=False)
    assert (out / "family.json").read_bytes() == content
    prepare_family_dir(out, manifest, overwrite=True)
    assert json.loads((out / "family.json").read_text()) == manifest and not (out / "x2").exists()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_compress_a_tiny_causal_lm(tmp_path, model_type):
    loaded = tiny_loaded_with_tokenizer(model_type, causal_lm=True)
    table = measured_table(loaded)
    calib = write_sentences(tmp_path / "calib.txt", count=300)
    target = within(table, 1.5)
    report = compress_model(loaded, table, [target], str(calib), tmp_path / "family", fast_settings(tmp_path, max_replans=0))
    row = report.rows[1]
    assert row["predicted_speedup"] >= target * 0.999 and row["parameters"] < report.rows[0]["parameters"]
    member = load_pruned(tmp_path / "family" / row["folder"])
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        assert torch.isfinite(member(input_ids=ids).logits).all()


def test_nan_hessian_names_the_layer(setup, tmp_path):
    import copy

    loaded, table, calib = setup
    broken = copy.copy(loaded)
    broken.model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        model_layers(broken.model)[1].attention.self.value.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="layer 1 attention: Hessian has NaN or Inf"):
        compress_model(broken, table, [1.2], str(calib), tmp_path / "f", fast_settings(tmp_path))


def test_interrupted_run_leaves_no_complete_looking_member_and_resumes_from_cache(setup, tmp_path, monkeypatch):
    import ziplm_planner.familydir as familydir

    loaded, table, calib = setup
    settings = fast_settings(tmp_path, onnx=False, max_replans=0)
    out = tmp_path / "family"
    real_save = familydir.save_member

    def interrupt_on_second_target(folder, *args, **kwargs):
        if folder.name != "dense" and any(p.name.startswith("x") for p in out.iterdir()):
            raise KeyboardInterrupt
        return real_save(folder, *args, **kwargs)

    monkeypatch.setattr(familydir, "save_member", interrupt_on_second_target)
    with pytest.raises(KeyboardInterrupt):
        compress_model(loaded, table, [1.2, within(table, 1.6)], str(calib), out, settings)
    monkeypatch.undo()
    complete = sorted(p.name for p in out.iterdir() if p.is_dir() and (p / "pruning.json").exists())
    assert complete == ["dense", "x1.2"] and not (out / "report.json").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    saved = record_saves(monkeypatch, familydir)
    dense_row = json.loads((out / "dense" / "measurement.json").read_text())
    again = compress_model(loaded, table, [1.2, within(table, 1.6)], str(calib), out, settings)
    assert again.metadata["level_database"]["cached"] and (out / "report.json").exists()
    assert "dense" not in saved  # the complete dense/ is reused, not re-timed
    assert again.rows[0] == {k: v for k, v in dense_row.items() if k not in ("timing", "training")}


def test_a_family_recorded_before_new_settings_existed_goes_on_after_an_upgrade(setup, tmp_path, monkeypatch):
    """A family.json written by a version without some settings (here CAP's and the spec's GGUF type) is
    this run's family where those settings are at their defaults; one that differs in any is not."""
    import ziplm_planner.familydir as familydir

    loaded, table, calib = setup
    settings, out = fast_settings(tmp_path, onnx=False, max_replans=0), tmp_path / "family"
    compress_model(loaded, table, [1.2], str(calib), out, settings)
    manifest = json.loads((out / "family.json").read_text())
    del manifest["source"]["table"]["gguf_type"]
    train = manifest["source"]["settings"]["recovery"]["train"]
    del train["contrastive"], train["weights"]["contrastive"]
    (out / "family.json").write_text(json.dumps(manifest))
    saved = record_saves(monkeypatch, familydir)
    compress_model(loaded, table, [1.2], str(calib), out, settings)
    assert saved == []  # every member reused
    cap = dataclasses.replace(settings, recovery=dataclasses.replace(settings.recovery, train=dataclasses.replace(
        settings.recovery.train, weights=dataclasses.replace(settings.recovery.train.weights, contrastive=0.5))))
    (out / "family.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="already holds a different family"):
        compress_model(loaded, table, [1.2], str(calib), out, cap)


def record_saves(monkeypatch, familydir) -> list[str]:
    """Names of the member folders save_member writes from now on."""
    saved, real_save = [], familydir.save_member

    def save(folder, *args, **kwargs):
        saved.append(folder.name)
        return real_save(folder, *args, **kwargs)

    monkeypatch.setattr(familydir, "save_member", save)
    return saved


@pytest.mark.parametrize("damage", [
    lambda record: record.pop("timing"),  # saved before timings were kept
    lambda record: record["timing"]["member"].pop("runs"),
    lambda record: record.update(calibration_loss=record["calibration_loss"] + 1),  # other data
    lambda record: record.update(predicted_ms=record["predicted_ms"] * 2),  # another table
])
def test_incomplete_or_stale_dense_is_rebuilt(setup, tmp_path, monkeypatch, damage):
    import ziplm_planner.familydir as familydir

    loaded, table, calib = setup
    settings = fast_settings(tmp_path, onnx=False, max_replans=0)
    out = tmp_path / "family"
    compress_model(loaded, table, [1.2], str(calib), out, settings)
    path = out / "dense" / "measurement.json"
    record = json.loads(path.read_text())
    damage(record)
    path.write_text(json.dumps(record))
    saved = record_saves(monkeypatch, familydir)
    again = compress_model(loaded, table, [1.2], str(calib), out, settings)
    assert saved[0] == "dense"
    rewritten = json.loads(path.read_text())
    assert again.rows[0] == {k: v for k, v in rewritten.items() if k not in ("timing", "training")} and "timing" in rewritten


def assert_reloads_as_scored(setup, settings, folder, row):
    """The saved member, rebuilt from its folder, has the calibration loss the report gave the member in memory."""
    from ziplm_planner.calibrate import CalibrationLoss

    loaded, table, calib = setup
    calibration = load_calibration(loaded, str(calib), table.spec.calibration_length, settings.num_samples, settings.seed)
    loss = CalibrationLoss(loaded.model, loaded.kind, calibration.batches(settings.score_samples))(load_pruned(folder))
    assert row["calibration_loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "uniform", "layerdrop", "kwon"])
def test_baselines_make_families_in_the_same_format(setup, tmp_path, method):
    loaded, table, calib = setup
    out = tmp_path / method
    settings = fast_settings(tmp_path, method=method, onnx=False, max_replans=0)
    report = compress_model(loaded, table, [within(table, 1.5)], str(calib), out, settings)
    assert report.metadata["method"] == method
    row = report.rows[1]
    assert row["predicted_speedup"] >= row["target"] * 0.999
    assert_reloads_as_scored(setup, settings, out / row["folder"], row)


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(UserError, match="unknown method 'obs'"):
        fast_settings(tmp_path, method="obs")


def test_oneshot_recovery_distils_each_member_and_reports_it(setup, tmp_path, caplog):
    from ziplm_planner.settings import LossWeights, RecoverySettings, TrainSettings

    loaded, table, calib = setup
    # the distillation terms alone: a tiny random encoder pools every sentence alike, and CAP's term, pulling
    # the examples apart, moves the output away from the teacher's that the calibration loss measures
    train = TrainSettings(tokens=3000, batch_size=8, learning_rate=1e-3, log_every=2,
                          weights=LossWeights(contrastive=0.0))
    # with its ONNX export: a student trained under autocast must export in float32
    settings = fast_settings(tmp_path, max_replans=0, recovery=RecoverySettings("oneshot", None, train))
    out = tmp_path / "family"
    with caplog.at_level("INFO", logger="ziplm_planner"):
        report = compress_model(loaded, table, [within(table, 1.8)], str(calib), out, settings)
    assert re.search(r"training data done in .*tokens; \d+\.\d passes per member", caplog.text)
    row = report.rows[1]
    assert row["recovery"] == "oneshot" and row["train_steps"] > 0 and row["train_tokens"] >= 3000
    assert row["calibration_loss"] < row["calibration_loss_before_recovery"]
    assert report.rows[0]["recovery"] == "none"
    assert report.metadata["train_precision"] in ("no", "bf16")  # what "auto" chose on this CPU
    assert (report.metadata["train_batch_size"], report.metadata["train_loss_weights"]["squarehead"]) == (8, 1)
    measurement = json.loads((out / row["folder"] / "measurement.json").read_text())
    assert measurement["training"]["curve"][-1]["step"] == row["train_steps"]
    assert not list(out.glob(".train-*"))  # checkpoints go once the member is saved
    assert_reloads_as_scored(setup, settings, out / row["folder"], row)  # the trained weights, not the pruned ones


@pytest.mark.parametrize("after_training", [1.0, 0.9])
def test_a_trained_member_that_retimes_below_its_band_is_pruned_on(setup, tmp_path, monkeypatch, after_training):
    """Verified inside its band, trained, then re-timed: where the re-timing falls below the band the
    trained member is pruned on (re-planned tighter from its trained weights) until it measures inside;
    the report and card say so. Inside the band, the trained member ships as it is."""
    import ziplm_planner.pipeline as pipeline
    from ziplm_planner.settings import RecoverySettings, TrainSettings

    loaded, table, calib = setup
    # verified at the target; after training `after_training` x it; pruned on: the same shapes again, then met
    factors = [1.0, after_training, after_training, 1.0]
    monkeypatch.setattr(pipeline, "verifier_for", lambda loaded, table, *args: StubVerifier(table, factors))
    train = TrainSettings(tokens=500, batch_size=8, learning_rate=1e-3)
    settings = fast_settings(tmp_path, onnx=False, max_replans=3, recovery=RecoverySettings("oneshot", None, train))
    target = within(table, 1.4)
    out = tmp_path / "family"
    row = compress_model(loaded, table, [target], str(calib), out, settings).rows[1]
    assert row["status"] == "met" and row["recovery"] == "oneshot"
    card = (out / row["folder"] / "README.md").read_text()
    assert row["speedup_before_training"] == pytest.approx(target, abs=1e-4)  # as verified, before training
    if after_training == 1.0:
        assert row["speedup_after_training"] is None and row["replans"] == 0 and "pruned on" not in card
        return
    assert row["speedup_after_training"] == pytest.approx(0.9 * target, abs=1e-4)
    assert row["replans"] == 1 and row["speedups_tried"] == pytest.approx([0.9 * target, target], abs=1e-4)
    assert row["predicted_speedups_tried"][1] > row["predicted_speedups_tried"][0]  # a tighter plan
    assert f"verified at {target:.2f}x before training, it re-timed at {0.9 * target:.2f}x after, below its band" in card
    assert_reloads_as_scored(setup, settings, out / row["folder"], row)  # the model pruned on is what ships


@pytest.mark.parametrize("bad,message", [
    ({"recovery": "gradually"}, "unknown recovery"),
    ({"train": {"tokens": 0}}, "at least 1 token"),
    ({"train": {"seq_len": 1}}, "at least 2 tokens"),
])
def test_bad_recovery_settings_are_refused(bad, message):
    from ziplm_planner.settings import RecoverySettings, TrainSettings

    with pytest.raises(UserError, match=message):
        RecoverySettings(bad.get("recovery", "oneshot"), None, TrainSettings(**bad.get("train", {})))


def test_training_defaults_follow_the_model_and_yield_to_what_is_given():
    from ziplm_planner.recovery import for_model, training_length
    from ziplm_planner.settings import LossWeights, TrainSettings

    decoder, encoder = tiny_loaded("llama", causal_lm=True), tiny_loaded("bert")
    positions = decoder.model.config.max_position_embeddings  # 80: fewer than the 512 a real decoder gets
    # a decoder: one long window per step, no SquareHead; an encoder: 16 sentences of the calibration length
    resolved = [for_model(loaded, TrainSettings(), 16) for loaded in (decoder, encoder)]
    # and CAP's contrastive term for the encoder alone (BENCHMARKS, issue 32)
    assert [(t.batch_size, t.seq_len, t.weights.squarehead, t.weights.contrastive) for t in resolved] == \
        [(1, positions, 0, 0), (16, 16, 1, 0.1)]
    given = TrainSettings(batch_size=3, seq_len=24, weights=LossWeights(squarehead=0.5, contrastive=0.2))
    assert for_model(decoder, given, 16) == given
    with pytest.raises(UserError, match=f"longer than the model's {positions} positions"):
        training_length(decoder, positions + 1, 16)


def test_missing_training_data_is_refused(setup, tmp_path):
    from ziplm_planner.settings import RecoverySettings

    loaded, table, calib = setup
    settings = fast_settings(tmp_path, onnx=False, recovery=RecoverySettings("oneshot", str(tmp_path / "none.txt")))
    with pytest.raises(UserError, match="none.txt"):
        compress_model(loaded, table, [1.2], str(calib), tmp_path / "f", settings)
    assert not (tmp_path / "f").exists()  # refused before the family folder is made


@pytest.mark.parametrize("method", ["ziplm", "magnitude"])  # magnitude: GMP*
def test_gradual_recovery_cuts_each_member_from_the_last_one_distilled(setup, tmp_path, method):
    from ziplm_planner.export import read_record
    from ziplm_planner.settings import RecoverySettings, TrainSettings

    loaded, table, calib = setup
    train = TrainSettings(tokens=2000, batch_size=8, learning_rate=1e-3)
    settings = fast_settings(tmp_path, onnx=False, max_replans=0, method=method,
                             recovery=RecoverySettings("gradual", None, train))
    out = tmp_path / "family"
    targets = [1.2, within(table, 1.8)]
    report = compress_model(loaded, table, targets, str(calib), out, settings)
    first, second = (read_record(out / row["folder"])["plan"]["layers"] for row in report.rows[1:])
    for a, b in zip(first, second):  # nested: the second keeps a subset of what the first kept
        assert set(b["attention"]) <= set(a["attention"]) and set(b["ffn"]) <= set(a["ffn"])
    assert [row["recovery"] for row in report.rows] == ["none", "gradual", "gradual"]
    assert report.rows[2]["parameters"] < report.rows[1]["parameters"]
    for row in report.rows[1:]:
        member = load_pruned(out / row["folder"])
        assert sum(p.numel() for p in member.parameters()) == row["parameters"]


def test_cap_in_a_gradual_run_takes_every_model_trained_before_as_a_snapshot_teacher(setup, tmp_path, monkeypatch):
    """CAP's snapshot term: the first member learns from the dense model alone, the second from it and the
    first; the contrastive term is in the loss curve of each."""
    import ziplm_planner.recovery as recovery
    from ziplm_planner.settings import ContrastiveSettings, LossWeights, RecoverySettings, TrainSettings

    loaded, table, calib = setup
    seen, real_distil = [], recovery.distil

    def distil_counting_snapshots(*args, snapshots=(), **kwargs):
        seen.append([sum(p.numel() for p in s.parameters()) for s in snapshots])
        assert all(not p.requires_grad for s in snapshots for p in s.parameters())
        return real_distil(*args, snapshots=snapshots, **kwargs)

    monkeypatch.setattr(recovery, "distil", distil_counting_snapshots)
    train = TrainSettings(tokens=1000, batch_size=8, learning_rate=1e-3,
                          weights=LossWeights(task=0.0, kl=1.0, squarehead=1.0, contrastive=0.5),
                          contrastive=ContrastiveSettings(teachers=("dense", "snapshots")))
    settings = fast_settings(tmp_path, onnx=False, max_replans=0, recovery=RecoverySettings("gradual", None, train))
    out = tmp_path / "family"
    report = compress_model(loaded, table, [1.2, within(table, 1.8)], str(calib), out, settings)
    assert seen == [[], [report.rows[1]["parameters"]]]
    for row in report.rows[1:]:
        curve = json.loads((out / row["folder"] / "measurement.json").read_text())["training"]["curve"]
        assert all(point["contrastive"] > 0 for point in curve)


def test_intermediate_speedups_are_evenly_spaced_in_log_speedup():
    from ziplm_planner.member import intermediate_speedups

    assert intermediate_speedups(1.5, 3.0, 1) == []
    assert intermediate_speedups(1.0, 2.0, 2) == pytest.approx([2 ** 0.5])
    assert intermediate_speedups(2.0, 16.0, 3) == pytest.approx([4.0, 8.0])


def test_gradual_recovery_in_steps_reaches_each_member_through_intermediate_ones(setup, tmp_path):
    from ziplm_planner.export import read_record
    from ziplm_planner.settings import RecoverySettings, TrainSettings

    loaded, table, calib = setup
    train = TrainSettings(tokens=2000, batch_size=8, learning_rate=1e-3)
    settings = fast_settings(tmp_path, onnx=False, max_replans=0,
                             recovery=RecoverySettings("gradual", None, train, prune_steps=2))
    out = tmp_path / "family"
    targets = [1.2, within(table, 1.8)]
    report = compress_model(loaded, table, targets, str(calib), out, settings)
    plans = [read_record(out / row["folder"])["plan"]["layers"] for row in report.rows[1:]]
    for a, b in zip(*plans):  # still nested
        assert set(b["attention"]) <= set(a["attention"]) and set(b["ffn"]) <= set(a["ffn"])
    for row, start, target in zip(report.rows[1:], [1.0, targets[0]], targets):
        assert row["prune_steps"] == 2
        training = json.loads((out / row["folder"] / "measurement.json").read_text())["training"]
        steps = training["prune_steps"]
        assert [step["speedup"] for step in steps] == pytest.approx([(start * target) ** 0.5, target], abs=1e-4)
        assert steps[0]["predicted_speedup"] >= steps[0]["speedup"] - 1e-4  # planned within its budget
        assert row["train_tokens"] == sum(step["tokens"] for step in steps)
        assert all(step["tokens"] >= train.tokens / 2 for step in steps)  # the budget, split evenly
        curve = training["curve"]  # one curve over both steps, counted from the first
        assert {point["prune_step"] for point in curve} == {1, 2}
        assert [p["tokens"] for p in curve] == sorted(p["tokens"] for p in curve) and curve[-1]["tokens"] == row["train_tokens"]
    assert not list(out.glob(".train-*"))  # the steps' checkpoints go with the member's


def test_prune_steps_need_gradual_recovery():
    from ziplm_planner.settings import RecoverySettings

    assert RecoverySettings("gradual", prune_steps=3).step_train.tokens == -(-RecoverySettings().train.tokens // 3)
    with pytest.raises(UserError, match="needs --recovery gradual"):
        RecoverySettings("oneshot", prune_steps=2)
    with pytest.raises(UserError, match="at least 1"):
        RecoverySettings("gradual", prune_steps=0)


def test_corrected_members_keep_the_dense_inputs_structures_with_other_weights(setup, tmp_path):
    from ziplm_planner.export import read_record

    loaded, table, calib = setup
    plans, weights = {}, {}
    for inputs in ("dense", "corrected"):
        settings = fast_settings(tmp_path, onnx=False, max_replans=0, calibration_inputs=inputs)
        report = compress_model(loaded, table, [within(table, 1.8)], str(calib), tmp_path / inputs, settings)
        folder = tmp_path / inputs / report.rows[1]["folder"]
        plans[inputs], weights[inputs] = read_record(folder)["plan"], load_pruned(folder).state_dict()
    assert plans["corrected"] == plans["dense"]
    assert weights["corrected"].keys() == weights["dense"].keys()
    assert any(not torch.equal(weights["corrected"][k], weights["dense"][k]) for k in weights["dense"])


def test_gradual_recovery_refuses_sequential_inputs(tmp_path):
    from ziplm_planner.settings import RecoverySettings

    with pytest.raises(UserError, match="--recovery gradual .* drop --calibration-inputs sequential"):
        fast_settings(tmp_path, recovery=RecoverySettings("gradual"), calibration_inputs="sequential")


def run_on_two_processes(setup, folder, *options):
    """tests/distributed_compress.py under torchrun, two CPU ranks over gloo, on `folder`."""
    import subprocess
    import sys
    from pathlib import Path

    loaded, table, calib = setup
    table.save(folder / "table.json")
    (folder / "calib.txt").write_text(calib.read_text())
    root = Path(__file__).parents[1]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(root / "tests" / "distributed_compress.py"), str(folder), f"1.2,{within(table, 1.8)}",
                           *options],
                          cwd=root, capture_output=True, text=True, timeout=600)


def test_gradual_family_on_two_processes_is_complete_and_both_end_with_the_same_weights(setup, tmp_path):
    """The main rank prunes, measures and writes; both train."""
    result = run_on_two_processes(setup, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "family" / "report.json").read_text())
    assert [row["recovery"] for row in report["members"]] == ["none", "gradual", "gradual"]
    assert [row.get("prune_steps") for row in report["members"]] == [None, 2, 2]  # intermediate models shared too
    assert (tmp_path / "rank0.sha256").read_text() == (tmp_path / "rank1.sha256").read_text()


def test_a_resumed_cap_run_gives_every_process_the_reused_members_as_snapshots(setup, tmp_path):
    """CAP's snapshot teachers on two processes: a member an earlier run trained is reused by the main
    process only (it alone reads the family), yet every process must hold it as a teacher. Weights
    agree across processes whatever their losses (gradients are averaged), so the count is compared."""
    assert run_on_two_processes(setup, tmp_path, "cap").returncode == 0
    last = json.loads((tmp_path / "family" / "report.json").read_text())["members"][-1]["folder"]
    shutil.rmtree(tmp_path / "family" / last)  # the first member is reused, the last made again
    result = run_on_two_processes(setup, tmp_path, "cap")
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{rank}.snapshots").read_text()) for rank in (0, 1)]
    assert seen[0] == seen[1] == [1, 2]  # the last member's step: the reused member; the member: and the step


def test_when_the_main_process_fails_the_others_stop_with_it(setup, tmp_path):
    """An output folder holding another family stops the main process after the others began waiting for
    the first model: they are told, and the run ends at once instead of at the process group's timeout."""
    (tmp_path / "family").mkdir()
    (tmp_path / "family" / "family.json").write_text('{"source": {"model": "another"}}')
    result = run_on_two_processes(setup, tmp_path)
    assert result.returncode != 0
    assert "already holds a different family" in result.stderr
    assert "the main process stopped on an error" in result.stderr
    assert not list(tmp_path.glob("rank*.sha256"))


@pytest.mark.parametrize("prune_steps", [1, 2])
def test_an_interrupted_gradual_run_resumes_to_the_same_family(setup, tmp_path, monkeypatch, prune_steps):
    """On a quiet machine (a verifier that measures what the table predicts), stopping after the first
    member (and, in steps, after the second one's intermediate step) and running again reuses that
    member and ends with the family an uninterrupted run makes."""
    import ziplm_planner.familydir as familydir
    import ziplm_planner.pipeline as pipeline
    from ziplm_planner.settings import RecoverySettings, TrainSettings

    loaded, table, calib = setup
    monkeypatch.setattr(pipeline, "verifier_for", lambda loaded, table, *args: StubVerifier(table, [1.0]))
    train = TrainSettings(tokens=1500, batch_size=8, learning_rate=1e-3)
    targets = [1.2, within(table, 1.8)]

    def run(name):
        settings = fast_settings(tmp_path, onnx=False, max_replans=0, cache_dir=tmp_path / f"cache-{name}",
                                 recovery=RecoverySettings("gradual", None, train, prune_steps))
        return compress_model(loaded, table, targets, str(calib), tmp_path / name, settings)

    run("whole")
    real_save = familydir.save_member

    def stop_at_the_second_member(folder, *args, **kwargs):
        if folder.name == f"x{targets[1]:g}":
            raise KeyboardInterrupt
        return real_save(folder, *args, **kwargs)

    monkeypatch.setattr(familydir, "save_member", stop_at_the_second_member)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.setattr(familydir, "save_member", real_save)
    saved = record_saves(monkeypatch, familydir)
    run("resumed")
    assert saved == [f"x{targets[1]:g}"]  # dense and the first member were reused
    for member in ("dense", "x1.2", f"x{targets[1]:g}"):
        for name in ("pruning.json", "model.safetensors"):
            assert (tmp_path / "whole" / member / name).read_bytes() == (tmp_path / "resumed" / member / name).read_bytes()


@pytest.mark.parametrize("backend", ["onnxruntime", "llamacpp"])
def test_a_held_member_needs_no_timed_file_a_shipped_one_does(setup, tmp_path, backend):
    """A verified member held for training is timed again once trained: it is reused without the file its
    backend timed (model.onnx, model.gguf); a shipped member is complete only with it."""
    from ziplm_planner.export import save_member
    from ziplm_planner.familydir import held_folder, measurement_record, saved_result
    from ziplm_planner.surgery import PruningPlan
    from ziplm_planner.verify import MemberResult

    loaded, table, _ = setup
    table = dataclasses.replace(table, spec=dataclasses.replace(table.spec, backend=backend, batch_size=1))
    plan = PruningPlan.dense(table.shape)
    measurement = StubVerifier(table, [1.0]).measure(loaded.model, 1.3)
    result = MemberResult(1.3, "x1.3", plan, table.predict(plan.kept_counts()), measurement, 0.5, 100)
    folder = held_folder(tmp_path, "x1.3")
    save_member(folder, loaded.model, None, plan, loaded.kind, {"target": 1.3}, onnx=False,
                measurement=measurement_record(result, table.dense_ms))
    assert saved_result(folder, 1.3, table, onnx=False, shipped=False) is not None
    assert saved_result(folder, 1.3, table, onnx=False) is None


def test_a_member_interrupted_in_training_is_trained_on_as_verified_when_the_machine_has_slowed(setup, tmp_path,
                                                                                               monkeypatch):
    """Stopped after the second member was verified and trained but before it was saved, the run is
    resumed on a machine now slower than its table: verifying again would re-plan that member tighter
    (the measured speedup would miss), losing its training. It is not verified again: the model the
    first run verified is trained on from its checkpoint, and the family equals an uninterrupted run's."""
    import ziplm_planner.familydir as familydir
    import ziplm_planner.pipeline as pipeline
    from ziplm_planner.settings import RecoverySettings, TrainSettings

    loaded, table, calib = setup
    verifiers = {"quiet": [1.0], "slower": [0.8, 1.0]}  # slower: a first plan measured now would miss
    machine = {"now": "quiet"}
    monkeypatch.setattr(pipeline, "verifier_for",
                        lambda loaded, table, *args: StubVerifier(table, verifiers[machine["now"]]))
    train = TrainSettings(tokens=1500, batch_size=8, learning_rate=1e-3)
    targets = [1.2, within(table, 1.8)]
    second = f"x{targets[1]:g}"

    def run(name):
        settings = fast_settings(tmp_path, onnx=False, max_replans=2, cache_dir=tmp_path / f"cache-{name}",
                                 recovery=RecoverySettings("gradual", None, train, 1))
        return compress_model(loaded, table, targets, str(calib), tmp_path / name, settings)

    run("whole")
    real_save = familydir.save_member

    def stop_at_the_second_member(folder, *args, **kwargs):
        if folder.name == second:
            raise KeyboardInterrupt
        return real_save(folder, *args, **kwargs)

    monkeypatch.setattr(familydir, "save_member", stop_at_the_second_member)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    assert (tmp_path / "resumed" / f".verified-{second}").is_dir()
    monkeypatch.setattr(familydir, "save_member", real_save)
    machine["now"] = "slower"
    report = run("resumed")
    assert report.rows[2]["replans"] == 0  # as the first run verified it
    for name in ("pruning.json", "model.safetensors"):
        assert (tmp_path / "whole" / second / name).read_bytes() == (tmp_path / "resumed" / second / name).read_bytes()
    assert not list((tmp_path / "resumed").glob(".verified-*")) and not list((tmp_path / "resumed").glob(".train-*"))


def test_a_rerun_with_other_settings_is_another_family(setup, tmp_path):
    loaded, table, calib = setup
    compress_model(loaded, table, [1.2], str(calib), tmp_path / "f", fast_settings(tmp_path, onnx=False))
    with pytest.raises(UserError, match="different family"):
        compress_model(loaded, table, [1.2], str(calib), tmp_path / "f", fast_settings(tmp_path, onnx=False, seed=1))


def test_a_family_is_resumed_from_data_copied_anew_and_refused_on_data_changed(setup, tmp_path, monkeypatch):
    """A restarted job that fetched its data again (same text, new modification times) goes on with the
    family; training text that changed makes it another family."""
    import os
    import shutil

    import ziplm_planner.familydir as familydir
    from ziplm_planner.settings import RecoverySettings, TrainSettings

    loaded, table, calib = setup
    text = tmp_path / "text.txt"
    shutil.copy(calib, text)
    settings = fast_settings(tmp_path, onnx=False, max_replans=0, recovery=RecoverySettings(
        "oneshot", str(text), TrainSettings(tokens=500, batch_size=8)))
    compress_model(loaded, table, [1.2], str(calib), tmp_path / "f", settings)
    later = os.stat(calib).st_mtime + 3600
    for copied in (calib, text):
        shutil.copy(copied, tmp_path / "fresh")
        os.replace(tmp_path / "fresh", copied)
        os.utime(copied, (later, later))
    saved = record_saves(monkeypatch, familydir)
    compress_model(loaded, table, [1.2], str(calib), tmp_path / "f", settings)
    assert saved == []
    with open(text, "a") as file:
        file.write("A sentence the first run never trained on.\n")
    with pytest.raises(UserError, match="different family"):
        compress_model(loaded, table, [1.2], str(calib), tmp_path / "f", settings)


def test_training_data_shorter_than_a_batch_is_refused_before_pruning(setup, tmp_path):
    from ziplm_planner.settings import RecoverySettings, TrainSettings

    loaded, table, calib = setup
    short = write_sentences(tmp_path / "short.txt", count=3)
    settings = fast_settings(tmp_path, onnx=False,
                             recovery=RecoverySettings("oneshot", str(short), TrainSettings(batch_size=8)))
    with pytest.raises(UserError, match="fewer than one batch"):
        compress_model(loaded, table, [1.2], str(calib), tmp_path / "f", settings)
    assert not (tmp_path / "f").exists()
