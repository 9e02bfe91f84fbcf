"""The verifier times members only on the machine its table describes: a wrong table or a busy machine
stops the run with one line instead of walking members past their targets, and `--no-verify` ships the
planned members marked unverified."""

import dataclasses
import json
import logging
import multiprocessing
import time

import pytest

import ziplm_planner.verify as verify
from ziplm_planner.cli import format_report
from ziplm_planner.environment import CpuSnapshot
from ziplm_planner.pipeline import compress_model
from ziplm_planner.plot import plot_frontier, read_family
from ziplm_planner.progress import STAGE_LOGGER
from ziplm_planner.retime import verify_family
from ziplm_planner.settings import CompressSettings
from ziplm_planner.verify import TIMING_COLUMNS, MachineCheck, MachineDisagrees
from tiny_models import measured_table, tiny_loaded_with_tokenizer, write_sentences


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    loaded = tiny_loaded_with_tokenizer("bert")
    return loaded, measured_table(loaded), write_sentences(tmp_path_factory.mktemp("data") / "calib.txt")


def settings(tmp_path, **kw) -> CompressSettings:
    return CompressSettings(**{"num_samples": 48, "search_evaluations": 4, "score_samples": 16, "verify_rounds": 3,
                               "max_replans": 0, "cache_dir": tmp_path / "cache", **kw})


def scaled(table, factor: float):
    """The table with every time `factor` times what this machine measured."""
    records = [{**r, "time_ms": r["time_ms"] * factor} for r in table.records]
    return dataclasses.replace(table, records=records, offset_ms=table.offset_ms * factor,
                               line_from_ms=table.line_from_ms * factor)


@pytest.mark.machine_check
def test_machine_check_names_what_disagrees_beyond_the_tolerance():
    assert MachineCheck(110.0, 100.0, 0.05, 11.0, 10.0).problems(1.5) == []
    assert MachineCheck(70.0, 100.0, None).problems(1.5) == []  # faster within 1.5x; the load unknown
    slow = MachineCheck(400.0, 100.0, 0.0).problems(1.5)
    assert slow == ["the dense model measured 400 ms against the table's 100 ms"]
    fast = MachineCheck(50.0, 100.0, 0.0, 30.0, 10.0).problems(1.5)  # another machine: faster, and the fixed part
    assert fast == ["the dense model measured 50 ms against the table's 100 ms",
                    "the fixed part measured 30 ms against the table's 10 ms"]
    assert MachineCheck(100.0, 100.0, 0.6).problems(1.5) == ["other processes used 60% of the cores (sound: <= 25%)"]


@pytest.mark.machine_check
@pytest.mark.parametrize("factor", [10.0, 0.1])
def test_a_table_that_is_not_this_machines_stops_the_run_before_any_member(setup, tmp_path, monkeypatch, factor):
    loaded, table, calib = setup
    monkeypatch.setattr(verify, "SETTLE_WAITS", (0.0,))
    out = tmp_path / "family"
    with pytest.raises(MachineDisagrees, match=r"the dense model measured .* ms against the table's .* ms.*"
                                               r"Profile this machine.*--no-verify") as error:
        compress_model(loaded, scaled(table, factor), [1.2], str(calib), out, settings(tmp_path))
    assert "\n" not in str(error.value)
    assert not (out / "report.json").exists() and not (out / "dense").exists()


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.machine_check
@pytest.mark.skipif(CpuSnapshot.now().machine_busy is None, reason="the OS does not report the machine's CPU time")
def test_a_machine_busy_with_other_work_stops_the_run(setup, tmp_path, monkeypatch):
    """Other processes keeping every core busy while the dense model is timed: the verifier waits, times
    again, and stops, whatever the timings (the load itself is over the profiler's limit)."""
    loaded, table, calib = setup
    monkeypatch.setattr(verify, "SETTLE_WAITS", (0.0,))
    spinners = [multiprocessing.get_context("spawn").Process(target=spin, args=(120.0,))
                for _ in range(multiprocessing.cpu_count() + 1)]
    for process in spinners:
        process.start()
    time.sleep(1.0)  # spawned interpreters start up before they load the cores
    try:
        with pytest.raises(MachineDisagrees, match="verification stopped: .*other processes used"):
            compress_model(loaded, table, [1.2], str(calib), tmp_path / "family",
                           settings(tmp_path, verify_rounds=30, machine_tolerance=1e9))
    finally:
        for process in spinners:
            process.kill()
    assert not (tmp_path / "family" / "report.json").exists()


@pytest.mark.machine_check
def test_a_passing_disagreement_is_waited_out(setup, tmp_path, monkeypatch, caplog):
    loaded, table, calib = setup
    answers = iter([["the dense model measured 900 ms against the table's 100 ms"]])
    monkeypatch.setattr(MachineCheck, "problems", lambda self, tolerance: next(answers, []))
    waits = []
    monkeypatch.setattr(verify.time, "sleep", waits.append)
    caplog.set_level(logging.INFO, logger=STAGE_LOGGER)
    report = compress_model(loaded, table, [1.2], str(calib), tmp_path / "family", settings(tmp_path))
    assert waits == [verify.SETTLE_WAITS[0]]
    assert "not re-planning on these timings; waiting 15 s to time again" in caplog.text
    assert [row["status"] != "unverified" for row in report.rows] == [True, True]


def test_no_verify_ships_the_planned_members_marked_unverified(setup, tmp_path, capsys):
    loaded, table, calib = setup
    out = tmp_path / "family"
    report = compress_model(loaded, table, [1.2, 1.4], str(calib), out, settings(tmp_path, verify=False))
    assert [row["status"] for row in report.rows] == ["unverified"] * 3
    for row in report.rows:
        assert all(row[column] is None for column in TIMING_COLUMNS) and row["met_target"] is False
        assert row["replans"] == 0 and (out / row["folder"] / "model.onnx").is_file()
        assert json.loads((out / row["folder"] / "measurement.json").read_text())["timing"] is None
    assert "unverified" in format_report(report.rows)
    # timed later, on the machine where they will run
    timed = verify_family(out, rounds=2)
    assert [r["reported_speedup"] for r in timed] == [None] * 3 and all(r["speedup"] > 0 for r in timed)
    assert [p.name for p in plot_frontier([read_family(out)], tmp_path / "f.png")] == ["f.png", "f.svg"]
    # a rerun of the same family reuses them, still unverified
    again = compress_model(loaded, table, [1.2, 1.4], str(calib), out, settings(tmp_path, verify=False))
    assert again.rows == report.rows


def test_timing_columns_are_the_same_verified_or_not(setup, tmp_path):
    loaded, table, calib = setup
    report = compress_model(loaded, table, [1.2], str(calib), tmp_path / "family", settings(tmp_path))
    assert all(set(TIMING_COLUMNS) <= set(row) for row in report.rows)


@pytest.mark.parametrize("tolerance", [1.0, 0.5, float("nan")])
def test_machine_tolerance_is_above_one(tolerance):
    from ziplm_planner.errors import UserError

    with pytest.raises(UserError, match="machine tolerance must be a number > 1"):
        CompressSettings(machine_tolerance=tolerance)


def test_no_verify_with_gradual_recovery_trains_and_ships_unverified_members(setup, tmp_path):
    from ziplm_planner.settings import RecoverySettings, TrainSettings

    loaded, table, calib = setup
    recovery = RecoverySettings("gradual", None, TrainSettings(tokens=1000, batch_size=8, learning_rate=1e-3))
    report = compress_model(loaded, table, [1.1, 1.2], str(calib), tmp_path / "family",
                            settings(tmp_path, verify=False, recovery=recovery))
    assert [row["status"] for row in report.rows] == ["unverified"] * 3
    assert [row["recovery"] for row in report.rows] == ["none", "gradual", "gradual"]
    assert all(row["train_steps"] > 0 for row in report.rows[1:])


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_file_backend_is_timed_in_a_process_of_its_own(setup, tmp_path, monkeypatch, backend):
    """The files a member ships are timed as a server loads them: in a new process, not in the one that
    pruned and trained (where the same file measured 12% slower). The module torch runs is timed here.
    The child's CPU time counts as this run's own, not as other work on the machine."""
    import copy
    import os

    loaded, table, _ = setup
    table = dataclasses.replace(table, spec=dataclasses.replace(table.spec, backend=backend))
    here = []
    real = verify.interleaved_samples
    monkeypatch.setattr(verify, "interleaved_samples", lambda *args: here.append(1) or real(*args))
    verifier = verify.Verifier(loaded, table, 3, tmp_path, 1.5)
    children = os.times().children_user + os.times().children_system
    measurement = verifier.measure(copy.deepcopy(loaded.model), 1.0)
    assert bool(here) == (backend == "torch")
    assert measurement.speedup > 0 and measurement.rounds >= 3
    if backend != "torch":
        assert measurement.timed_file.suffix == ".onnx"
        assert os.times().children_user + os.times().children_system > children
