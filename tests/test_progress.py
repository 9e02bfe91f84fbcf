"""Progress a newcomer can follow: stage lines with elapsed time on stderr, bars only on a terminal."""

import io
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ziplm_planner import progress
from ziplm_planner.cli import cli
from ziplm_planner.table import LatencyTable
from tiny_models import tiny_loaded_with_tokenizer, write_sentences

ESCAPES = re.compile(r"\r|\x1b\[")
ROOT = Path(__file__).resolve().parents[1]


def stage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == progress.STAGE_LOGGER]


def test_stage_logs_its_start_and_its_elapsed_time_nested_indented(caplog):
    with caplog.at_level(logging.INFO, logger=progress.STAGE_LOGGER):
        with progress.stage("member 1 of 2", "target 2x") as step:
            with progress.stage("export x2"):
                pass
            step.outcome = "measured 2.01x"
    lines = stage_lines(caplog)
    assert lines[0] == "member 1 of 2: target 2x ..." and lines[1] == "  export x2 ..."
    assert re.fullmatch(r"  export x2 done in \d+\.\d s", lines[2])
    assert re.fullmatch(r"member 1 of 2 done in \d+\.\d s \(measured 2\.01x\)", lines[3])


@pytest.mark.parametrize("seconds,shown", [(0.04, "0.0 s"), (14.66, "14.7 s"), (89.9, "89.9 s"), (90, "1 min 30 s"),
                                            (119.7, "2 min 0 s"), (3725.2, "62 min 5 s")])
def test_durations_read_naturally(seconds, shown):
    assert progress.duration(seconds) == shown


def test_a_failed_stage_logs_no_done_line(caplog):
    with caplog.at_level(logging.INFO, logger=progress.STAGE_LOGGER), pytest.raises(ValueError):
        with progress.stage("calibration"):
            raise ValueError("too short")
    assert stage_lines(caplog) == ["calibration ..."]
    with caplog.at_level(logging.INFO, logger=progress.STAGE_LOGGER), progress.stage("next"):
        pass
    assert stage_lines(caplog)[-2] == "next ..."  # not indented: the failed stage is closed


def test_stages_are_silent_until_shown(capsys):
    with progress.stage("quiet"):
        pass
    assert capsys.readouterr().err == ""
    stop = progress.show_stages()
    try:
        with progress.stage("shown"):
            pass
    finally:
        stop()
    with progress.stage("quiet again"):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[ziplm] shown ..." and err[1].startswith("[ziplm] shown done in ") and len(err) == 2


@pytest.mark.parametrize("setting,tty,drawn", [
    (None, False, False), (None, True, True), ("1", False, True), ("0", True, False)])
def test_bars_are_drawn_on_a_terminal_or_when_asked(monkeypatch, setting, tty, drawn):
    stream = io.StringIO()
    stream.isatty = lambda: tty
    monkeypatch.setattr("sys.stderr", stream)
    if setting is None:
        monkeypatch.delenv("ZIPLM_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("ZIPLM_PROGRESS", setting)
    assert progress.bars_enabled() == drawn
    assert list(progress.bar(range(3), desc="steps")) == [0, 1, 2]
    assert ("steps" in stream.getvalue()) == drawn
    assert list(progress.bar(range(3), desc="off", disable=True)) == [0, 1, 2]
    assert "off" not in stream.getvalue()


# --- the CLI, with stderr going to a file -----------------------------------------------------------


def run(*args):
    """The CLI in this process; click's runner gives it a stderr that is not a terminal."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result


def check_redirected(stderr: str, stdout: str) -> None:
    assert not ESCAPES.search(stderr), repr(stderr)
    assert "[ziplm]" not in stdout


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny BERT folder profiled and compressed by the CLI: (family, target, calibration text, {command: result})."""
    root = tmp_path_factory.mktemp("progress")
    loaded = tiny_loaded_with_tokenizer("bert")
    loaded.model.save_pretrained(root / "model")
    loaded.tokenizer.save_pretrained(root / "model")
    results = {"profile": run("profile", root / "model", "--batch-size", 2, "--seq-len", 16, "--threads", 1,
                              "--ffn-step", 16, "--rounds", 3, "--retries", 0, "-o", root / "table.json")}
    table = LatencyTable.load(root / "table.json")
    target = round(min(1.3, 1 + 0.8 * (table.max_speedup - 1)), 2)  # reachable whatever the timings
    calib, family = write_sentences(root / "calib.txt"), root / "family"
    results["compress"] = run("compress", root / "model", "--profile", root / "table.json", "--targets", target,
                              "--calib", calib, "--num-samples", 48, "--search-evaluations", 4, "--score-samples", 16,
                              "--no-onnx", "--cache-dir", root / "cache", "-o", family)
    return family, target, calib, results


def stage_names(stderr: str) -> list[str]:
    """The stage lines of stderr without their prefix and indentation; fails on any other line."""
    lines = stderr.splitlines()
    assert all(line.startswith(progress.PREFIX) for line in lines), stderr  # the default verbosity: stages only
    return [line.removeprefix(progress.PREFIX).strip() for line in lines]


def test_profile_names_each_stage_and_draws_no_bars(compressed):
    result = compressed[3]["profile"]
    check_redirected(result.stderr, result.stdout)
    stages = stage_names(result.stderr)
    for start in ("load model: ", "profile: ", "building blocks: ", "timing blocks: ", "additivity check: "):
        assert any(line.startswith(start) for line in stages), (start, stages)
    assert re.fullmatch(r"profile done in \d+\.\d s", stages[-1]), stages


def test_compress_names_each_stage_and_draws_no_bars(compressed):
    _, target, _, results = compressed
    result = results["compress"]
    check_redirected(result.stderr, result.stdout)
    stages = stage_names(result.stderr)
    for start in ("load model: ", "calibration: 48 samples of 16 tokens", "level database: 2 layers",
                  "dense reference: ", "export dense: ", f"member 1 of 1: target {target:g}x", f"export x{target:g}: "):
        assert any(line.startswith(start) for line in stages), (start, stages)
    assert any(re.fullmatch(r"level database done in \d+\.\d s \(cached in .*\)", line) for line in stages), stages
    assert any(re.fullmatch(r"member 1 of 1 done in \d+\.\d s \(measured \d+\.\d\dx.*\)", line) for line in stages)


def test_evaluate_names_its_stage_and_draws_no_bars(compressed, tmp_path):
    family, _, calib, _ = compressed
    result = run("evaluate", shutil.copytree(family, tmp_path / "family"), "--task", "fidelity", "--data", calib)
    check_redirected(result.stderr, result.stdout)
    assert "[ziplm] evaluate fidelity: 2 models of " in result.stderr
    assert "[ziplm] evaluate fidelity done in " in result.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_plot_to_a_file_shows_stage_lines_once_and_info_logs_behind_v(compressed, tmp_path, verbose):
    """A real process with stderr in a file, as a newcomer's redirected log."""
    family = compressed[0]
    with open(tmp_path / "err.log", "w") as err:
        done = subprocess.run([sys.executable, "-m", "ziplm_planner", *(["-v"] if verbose else []), "plot", family,
                               "-o", tmp_path / "frontier.png"], cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                              env={**os.environ, "ZIPLM_PROGRESS": ""})
    stderr = (tmp_path / "err.log").read_text()
    assert done.returncode == 0, stderr
    check_redirected(stderr, done.stdout)
    assert stderr.count("[ziplm] plot: ") == 2  # the frontier and the per-layer picture, each shown once
    assert ("INFO ziplm_planner.plot: wrote" in stderr) == verbose
