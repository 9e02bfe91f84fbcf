"""The conventions command-line users expect: --version, -h at every level, -v after the command, whole
one-line summaries in the group's help, and bad paths and ranges refused before torch is imported."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ziplm_planner
from ziplm_planner.cli import cli

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "profiles" / "minilm-cpu2-onnxruntime-b8s128.json"

# Runs the command line with the arguments after -c, then says whether torch was imported on the way.
PROBE = """import sys
from ziplm_planner.cli import main
sys.argv = ["ziplm-planner", *sys.argv[1:]]
try:
    main()
finally:
    print("torch imported" if "torch" in sys.modules else "torch not imported")
"""


def run_probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def command_paths(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, (*path, name))


def test_version_is_the_package_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"ziplm-planner, version {ziplm_planner.__version__}\n"


@pytest.mark.parametrize("path", [p for p, _ in command_paths(cli)] + [("profile", "minilm")],
                         ids=lambda p: " ".join(p) or "ziplm-planner")
def test_dash_h_is_help_at_every_level(path):
    """`profile minilm -h` is `profile run`'s help: the profile group runs `run` for a model."""
    short, long = (CliRunner().invoke(cli, [*path, flag]) for flag in ("-h", "--help"))
    assert short.exit_code == 0 and short.stdout == long.stdout
    assert "Usage: " in short.stdout and "-h, --help" in short.stdout


@pytest.mark.parametrize("group", [cli, cli.commands["profile"]], ids=["ziplm-planner", "profile"])
def test_group_help_shows_every_summary_whole_on_one_line(group):
    """A summary click cuts ends with "..."; one wrapped onto a second line starts the next line with spaces."""
    text = CliRunner().invoke(group, ["--help"], prog_name="ziplm-planner").stdout
    lines = text.split("Commands:\n", 1)[1].splitlines()
    for name, command in group.commands.items():
        assert command.short_help and not command.short_help.endswith("...")
        assert any(line.split() == [name, *command.short_help.split()] for line in lines), (name, lines)
    assert not [line for line in lines if line.startswith(" " * 4)], "a summary is wrapped"


@pytest.mark.parametrize("args", [["verify", "fam", "-vv"], ["-v", "verify", "fam", "-v"], ["verify", "--verbose", "fam", "-v"],
                                  ["verify", "fam", "--", "-vv"]])
def test_verbosity_counts_before_and_after_the_command(monkeypatch, args):
    """Flags after `--` are arguments, not verbosity."""
    levels, seen = [], []
    monkeypatch.setattr(logging, "basicConfig", lambda level, **kw: levels.append(level))
    monkeypatch.setattr("ziplm_planner.api.verify_family", lambda family, rounds: seen.append(family) or [])
    result = CliRunner().invoke(cli, args)
    if "--" in args:
        assert result.exit_code == 2 and "unexpected extra argument (-vv)" in result.output
        assert levels == [logging.WARNING] and seen == []  # the group ran at the default level
    else:
        assert result.exit_code == 0, result.output
        assert levels == [logging.DEBUG] and seen == [Path("fam")]


def test_no_command_has_an_option_the_verbosity_flags_could_be():
    for path, command in command_paths(cli):
        if path:
            assert not [opt for p in command.params for opt in getattr(p, "opts", ()) if opt in ("-v", "--verbose")]


FAMILY_WITHOUT_REPORT = "{tmp}/fam"  # made by the test: a folder, no report.json
COMPRESS_CALIB = ["compress", "minilm", "--profile", str(TABLE), "--targets", "2", "--calib"]  # the --calib file next


@pytest.mark.parametrize("args,message", [
    (["profile", "minilm", "-o", "{tmp}/missing/t.json"], "cannot write {tmp}/missing/t.json: folder {tmp}/missing "
                                                          "does not exist"),
    (["profile", "minilm", "--batch-size", "0", "-o", "{tmp}/t.json"], "batch size must be at least 1"),
    ([*COMPRESS_CALIB, "{tmp}/none.txt", "-o", "{tmp}/f"],
     "--calib file {tmp}/none.txt does not exist; check the path"),
    ([*COMPRESS_CALIB, "{tmp}/fam", "-o", "{tmp}/f"],
     "--calib file {tmp}/fam is a directory"),
    ([*COMPRESS_CALIB, "x", "--train-data", "{tmp}/none.txt",
      "-o", "{tmp}/f"], "--train-data file {tmp}/none.txt does not exist"),
    ([*COMPRESS_CALIB, "x", "-o", "{tmp}/afile/f"],
     "afile is a file, not a folder"),
    ([*COMPRESS_CALIB, "x", "--verify-rounds", "1",
      "-o", "{tmp}/f"], "verify rounds must be at least 2"),
    (["generate-text", "smollm2", "--prompts", "{tmp}/none.txt", "-o", "{tmp}/t.txt"],
     "--prompts file {tmp}/none.txt does not exist"),
    (["generate-text", "smollm2", "--tokens", "0", "-o", "{tmp}/t.txt"], "generation needs at least 1 token"),
    (["evaluate", FAMILY_WITHOUT_REPORT, "--task", "stsb", "--data", "x"], "{tmp}/fam has no report.json"),
    (["evaluate", "{tmp}/nothing", "--task", "stsb", "--data", "x"], "family directory {tmp}/nothing does not exist"),
    (["evaluate", "{tmp}/fam", "--task", "stsb", "--data", "x", "--max-tokens", "0"],
     "Invalid value for '--max-tokens': 0 is not in the range x>=1."),
    (["evaluate", "{tmp}/fam", "--task", "none", "--data", "x"], "Invalid value for '--task': 'none' is not one of"),
    (["verify", FAMILY_WITHOUT_REPORT], "{tmp}/fam has no report.json"),
    (["verify", "{tmp}/afile"], "{tmp}/afile is not a folder"),
    (["verify", "{tmp}/fam", "--rounds", "1"], "Invalid value for '--rounds': 1 is not in the range x>=2."),
    (["plot", FAMILY_WITHOUT_REPORT, "-o", "{tmp}/p.png"], "has no report.json"),
    (["export-gguf", FAMILY_WITHOUT_REPORT], "{tmp}/fam has no report.json"),
    (["export-gguf", FAMILY_WITHOUT_REPORT, "--type", "q4_k"], "Invalid value for '--type': 'q4_k' is not one of"),
    (["profile", "show", "{tmp}/none.json"], "latency table {tmp}/none.json does not exist"),
    (["profile", "{tmp}/no-model", "-o", "{tmp}/t.json"], "model path {tmp}/no-model does not exist"),
    (["compress", "minilm", "--profile", "{tmp}/none.json", "--targets", "2", "--calib", "x", "-o", "{tmp}/f"],
     "latency table {tmp}/none.json does not exist"),
    (["compress", "{tmp}/no-model", "--profile", str(TABLE), "--targets", "2", "--calib", "x", "-o", "{tmp}/f"],
     "model path {tmp}/no-model does not exist"),
    (["compress", "minilm", "--profile", str(TABLE), "--targets", "2,2", "--calib", "x", "-o", "{tmp}/f"],
     "target 2 is given more than once"),
    (["compress", "minilm", "--profile", str(TABLE), "--targets", "1e9", "--calib", "x", "-o", "{tmp}/f"],
     "beyond this table's maximum speedup"),
    ([*COMPRESS_CALIB, "x", "--cache-dir", "{tmp}/afile",
      "-o", "{tmp}/f"], "--cache-dir {tmp}/afile is a file"),
])
def test_bad_paths_and_ranges_are_refused_before_torch_is_imported(tmp_path, args, message):
    (tmp_path / "fam").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    before = sorted(tmp_path.iterdir())
    result = run_probe(*(a.format(tmp=tmp_path) for a in args))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message.format(tmp=tmp_path) in result.stderr, result.stderr
    assert result.stdout == "torch not imported\n"
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_the_probe_sees_torch_when_a_command_imports_it(tmp_path):
    """The check above can fail: a refusal that needs the model's config (transformers, torch) is seen."""
    result = run_probe("generate-text", "minilm", "-o", str(tmp_path / "t.txt"))
    assert result.returncode == 2 and "minilm is not a causal language model" in result.stderr
    assert result.stdout == "torch imported\n"


def test_a_bad_parameter_is_one_line_with_exit_2(monkeypatch, capsys):
    from ziplm_planner.cli import main

    monkeypatch.setattr(sys, "argv", ["ziplm-planner", "verify", "fam", "--rounds", "x"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2
    assert capsys.readouterr().err == "error: Invalid value for '--rounds': 'x' is not a valid integer range.\n"
