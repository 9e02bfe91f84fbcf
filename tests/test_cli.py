"""The CLI: bad input is one line on stderr, exit status 2, no traceback, nothing left behind."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from ziplm_planner.cli import cli, flag, main
from ziplm_planner.settings import (CLI, CompressSettings, ContrastiveSettings, GenerationSettings, LossWeights, ProfileSettings,
                                    RecoverySettings, TrainSettings)
from ziplm_planner.spec import InferenceSpec

ROOT = Path(__file__).resolve().parents[1]


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["ziplm-planner", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def unsupported_model(tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    return folder


TABLE = Path(__file__).parents[1] / "profiles" / "minilm-cpu2-onnxruntime-b8s128.json"
COMPRESS = ["compress", "minilm", "--profile", str(TABLE), "--targets", "2", "--calib", "x"]


@pytest.mark.parametrize("args,message", [
    (["profile", "/no/such/model", "-o", "{tmp}/t.json"], "model path /no/such/model does not exist"),
    (["profile", "minilm", "--batch-size", "0", "-o", "{tmp}/t.json"], "batch size must be at least 1"),
    (["profile", "minilm", "--seq-len", "0", "-o", "{tmp}/t.json"], "seq len must be at least 1"),
    (["profile", "minilm", "--retries", "-1", "-o", "{tmp}/t.json"], "retries must be >= 0"),
    (["profile", "minilm", "-o", "/no/such/dir/t.json"], "folder /no/such/dir does not exist"),
    (["profile", "{model}", "-o", "{tmp}/t.json"], "unsupported architecture 't5'"),
    (["profile", "ziplm-planner-tests/no-such-model", "-o", "{tmp}/t.json"], "not in the local Hugging Face cache"),
    (["profile", "show", "{tmp}/missing.json"], "does not exist"),
    (["compress", "minilm", "--profile", "{tmp}/missing.json", "--targets", "2", "--calib", "x", "-o", "{tmp}/f"],
     "does not exist"),
    (["compress", "minilm", "--profile", "x.json", "--targets", "0.5", "--calib", "x", "-o", "{tmp}/f"], "must be a finite number > 1"),
    (["compress", "minilm", "--profile", "x.json", "--targets", "two", "--calib", "x", "-o", "{tmp}/f"], "must be numbers"),
    (["compress", "minilm", "--profile", "x.json", "--targets", "nan", "--calib", "x", "-o", "{tmp}/f"], "finite number > 1"),
    (["compress", "minilm", "--profile", "x.json", "--targets", "2,inf", "--calib", "x", "-o", "{tmp}/f"], "finite number"),
    (["compress", "minilm", "--profile", "x.json", "--targets", "1.5,,2", "--calib", "x", "-o", "{tmp}/f"], "empty item"),
    (["demo", "--targets", "nan", "-o", "{tmp}/f"], "finite number > 1"),
    (["compress", "minilm", "--profile", "x.json", "--targets", "2,3,2.0", "--calib", "x", "-o", "{tmp}/f"],
     "target 2 is given more than once in '2,3,2.0' (one member, x2): give each speedup once"),
    (["demo", "--targets", "2,2", "-o", "{tmp}/f"], "target 2 is given more than once"),
    (["compress", "minilm", "--profile", str(TABLE), "--targets", "2", "--calib", "{tmp}/none.txt", "-o", "{tmp}/f"],
     "error: --calib file "),
    ([*COMPRESS, "--train-data", "{tmp}/none.txt", "-o", "{tmp}/f"], "error: --train-data file "),
    ([*COMPRESS, "--train-data", "x,{tmp}/none.txt", "-o", "{tmp}/f"], "none.txt does not exist"),
    (["compress", "{model}", "--profile", str(TABLE), "--targets", "1000", "--calib", "x", "-o", "{tmp}/f"],
     "beyond this table's maximum speedup"),
    ([*COMPRESS, "-o", "/proc/family"], "folder /proc is not writable"),
    ([*COMPRESS, "-o", "{tmp}/afile/f"], "afile is a file, not a folder"),
    ([*COMPRESS, "-o", "{tmp}/afile"], "afile is a file: give a directory"),
    (["profile", "minilm", "-o", "/proc/t.json"], "folder /proc is not writable"),
    (["profile", "minilm", "-o", "{tmp}/afile/t.json"], "afile is a file, not a folder"),
    (["demo", "-o", "/proc/demo"], "folder /proc is not writable"),
    (["demo", "-o", "{tmp}/afile/demo"], "afile is a file, not a folder"),
    ([*COMPRESS, "--prune-steps", "2", "-o", "{tmp}/f"], "it needs --recovery gradual"),
    ([*COMPRESS, "--recovery", "gradual", "--prune-steps", "0", "-o", "{tmp}/f"], "at least 1, got 0"),
    ([*COMPRESS, "--verify-rounds", "1", "-o", "{tmp}/f"], "verify rounds must be at least 2"),
    ([*COMPRESS, "--max-replans", "-1", "-o", "{tmp}/f"], "max re-plans at least 0"),
    (["generate-text", "minilm", "-o", "{tmp}/t.json"], "name the output .txt or .raw"),
    (["generate-text", "minilm", "--prompt-tokens", "128", "-o", "{tmp}/t.txt"], "fewer than the 128 tokens"),
    (["generate-text", "minilm", "-o", "{tmp}/t.txt"], "minilm is not a causal language model"),
    (["evaluate", "{tmp}", "--task", "stsb", "--data", "x"], "has no report.json"),
    (["plot", "{tmp}/nothing", "-o", "{tmp}/p.png"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, unsupported_model, args, message):
    (tmp_path / "afile").write_text("not a folder")
    args = [a.format(tmp=tmp_path, model=unsupported_model) for a in args]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not any((tmp_path / name).exists() for name in ("t.json", "t.txt", "f"))


def test_unknown_option_is_a_usage_error(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "profile", "minilm", "--bogus")
    assert code == 2 and "No such option" in err


def test_ctrl_c_in_a_command_is_the_interrupted_line_and_exit_130(monkeypatch, capsys, tmp_path):
    from ziplm_planner.table import LatencyTable

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(LatencyTable, "load", staticmethod(interrupted))
    code, _, err = run_cli(monkeypatch, capsys, "profile", "show", str(tmp_path / "t.json"))
    assert code == 130
    assert err.strip() == "interrupted: nothing incomplete was left behind as complete"


def command_paths(command, path=()):
    """(path, command) for the group and every command under it, e.g. (("profile", "show"), show)."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, (*path, name))


def test_help_of_every_command_loads_no_heavy_library():
    """--help must answer at once: torch and transformers alone take seconds to import."""
    heavy = ("torch", "transformers", "onnxruntime", "matplotlib", "pandas")
    argvs = [["ziplm-planner", *path, "--help"] for path, _ in command_paths(cli)]
    code = ("import runpy, sys\n"
            f"for sys.argv in {argvs!r}:\n"
            "    try:\n"
            "        runpy.run_module('ziplm_planner', run_name='__main__')\n"
            "    except SystemExit as done:\n"
            "        assert not done.code, done.code\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "Usage: ziplm-planner compress" in result.stdout
    assert result.stdout.splitlines()[-1] == "[]", result.stdout.splitlines()[-1]


@pytest.mark.parametrize("path,command", list(command_paths(cli)), ids=lambda p: " ".join(p) if isinstance(p, tuple) else "")
def test_every_option_and_argument_is_explained(path, command):
    """Options carry their own help; click arguments have none, so the command's text must name them."""
    text = f"{command.help or ''} {command.epilog or ''}"
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{' '.join(path)} {param.opts[-1]} has no help"
        else:
            assert param.human_readable_name in text, f"{' '.join(path)}: {param.human_readable_name} is not explained"
            if not param.required:
                assert f"Default: {param.default}" in text, f"{' '.join(path)}: the default of {param.human_readable_name}"


def test_compress_help_says_what_model_can_be():
    result = CliRunner().invoke(cli, ["compress", "--help"])
    text = " ".join(result.stdout.split())
    assert result.exit_code == 0
    for words in ("Hugging Face model folder or hub id", ".gguf file", "minilm, smollm2", "Default: minilm"):
        assert words in text, words


# Settings fields with no option: set from Python only.
PYTHON_ONLY = {"CompressSettings.dampening", "TrainSettings.weight_decay", "TrainSettings.max_grad_norm",
               "TrainSettings.log_every", "TrainSettings.checkpoint_every", "ProfileSettings.warmup",
               "ProfileSettings.additivity_models", "ProfileSettings.additivity_rounds", "ProfileSettings.seed"}
SETTINGS_OF = {"compress": (CompressSettings,), "profile run": (InferenceSpec, ProfileSettings),
               "generate-text": (GenerationSettings,)}
API_OPTIONS = {"--profile", "--targets", "--calib", "--overwrite", "--output", "--prompts", "--help"}  # not settings


def settings_fields(cls):
    """(owner class, field) for every field of `cls` and of the settings nested in it."""
    for f in dataclasses.fields(cls):
        yield cls, f
        if dataclasses.is_dataclass(f.default_factory):
            yield from settings_fields(f.default_factory)


def leaves(settings, path=""):
    """{"Class.field": value} for every field of `settings` that is not itself settings."""
    values = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            values.update(leaves(value))
        else:
            values[f"{type(settings).__name__}.{f.name}"] = value
    return values


def command_named(path: str) -> click.Command:
    command = cli
    for name in path.split():
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", list(SETTINGS_OF))
def test_every_settings_field_is_one_option_or_python_only(path):
    """An option is declared once, by one field; every other field reads an option or says it has none."""
    options = [opt for p in command_named(path).params if isinstance(p, click.Option) for opt in p.opts
               if opt.startswith("--")]
    declared, read, python_only, owners = [], set(), set(), set()
    for owner, f in (pair for cls in SETTINGS_OF[path] for pair in settings_fields(cls)):
        name, option = f"{owner.__name__}.{f.name}", f.metadata.get(CLI)
        owners.add(owner.__name__)
        if CLI not in f.metadata:
            assert dataclasses.is_dataclass(f.default_factory), f"{name} says nothing of the command line"
        elif option is None:
            python_only.add(name)
        else:
            read.add(flag(f, option))
            declared += [flag(f, option)] if option.help else []
    assert sorted(declared) == sorted(read), "each option declared by exactly one field"
    assert sorted(options) == sorted(set(options)), "no option twice"
    assert set(options) - API_OPTIONS == read
    assert python_only == {name for name in PYTHON_ONLY if name.split(".")[0] in owners}


def fake_table():
    return SimpleNamespace(additivity_errors=lambda: (0.0, 0.0), dense_ms=1.0, fixed_share=0.1, max_speedup=2.0,
                           metadata={"profile_seconds": 1.0}, save=lambda path: None)


@pytest.fixture
def captured(monkeypatch):
    """What the commands hand the library: (spec,) settings, by the function called."""
    seen = {}
    monkeypatch.setattr("ziplm_planner.api._loaded", lambda model: model)
    monkeypatch.setattr("ziplm_planner.api.check_runs_here", lambda spec: None)  # --device cuda on a CPU machine
    # returns None, as a distributed run's other processes do: nothing to print
    monkeypatch.setattr("ziplm_planner.pipeline.compress_model", lambda *args: seen.update(compress=args[5]))
    monkeypatch.setattr("ziplm_planner.profiler.profile_model",
                        lambda loaded, spec, settings: seen.update(profile=(spec, settings)) or fake_table())

    def generate_text(model, output, prompts, settings):
        seen.update(generate=settings)
        return SimpleNamespace(samples=["a"], new_tokens=1, tokens_per_second=1.0)

    monkeypatch.setattr("ziplm_planner.api.generate_text", generate_text)
    return seen


def test_the_commands_defaults_are_the_settings_defaults(captured, tmp_path):
    for args in ([*COMPRESS, "-o", str(tmp_path / "f")], ["profile", "minilm", "-o", str(tmp_path / "t.json")],
                 ["generate-text", "smollm2", "-o", str(tmp_path / "g.txt")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    assert captured["compress"] == CompressSettings()
    assert captured["profile"] == (InferenceSpec(threads=os.cpu_count()), ProfileSettings())  # all cores, as before
    assert captured["generate"] == GenerationSettings()


def test_compress_options_reach_the_settings(captured, tmp_path):
    train_data = tmp_path / "t.txt"
    train_data.write_text("training text\n")
    result = CliRunner().invoke(cli, [
        *COMPRESS, "--method", "magnitude", "--num-samples", "9", "--seed", "3", "--calibration-inputs", "corrected",
        "--block-errors", "relative", "--search-evaluations", "7", "--score-samples", "5", "--score-on", "held-out",
        "--verify-rounds", "40", "--max-replans", "1", "--no-verify", "--machine-tolerance", "2.5", "--no-onnx",
        "--cache-dir", str(tmp_path / "cache"),
        "--recovery", "gradual", "--train-data", str(train_data), "--train-tokens", "1000", "--train-batch-size", "2",
        "--train-seq-len", "256", "--learning-rate", "1e-3", "--warmup", "0.2", "--loss-weights", "0.5,2,0,0.3",
        "--temperature", "3", "--contrastive-teachers", "dense,classes", "--contrastive-temperature", "0.2",
        "--contrastive-memory", "64", "--train-precision", "no", "--prune-steps", "2", "-o", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    train = TrainSettings(tokens=1000, batch_size=2, seq_len=256, learning_rate=1e-3, warmup=0.2,
                          weights=LossWeights(0.5, 2, 0, 0.3, temperature=3), precision="no", seed=3,  # --seed: both
                          contrastive=ContrastiveSettings(("dense", "classes"), 0.2, 64))
    expected = CompressSettings(method="magnitude", num_samples=9, seed=3, calibration_inputs="corrected",
                                block_errors="relative", search_evaluations=7, score_samples=5, score_on="held-out",
                                verify_rounds=40, max_replans=1, verify=False, machine_tolerance=2.5, onnx=False,
                                cache_dir=tmp_path / "cache",
                                recovery=RecoverySettings("gradual", str(train_data), train, prune_steps=2))
    assert captured["compress"] == expected
    unchanged = {name for name, value in leaves(expected).items() if leaves(CompressSettings())[name] == value}
    assert unchanged == {"CompressSettings.dampening"} | {n for n in PYTHON_ONLY if n.startswith("TrainSettings")}


def test_profile_options_reach_the_spec_and_settings(captured, tmp_path):
    result = CliRunner().invoke(cli, [
        "profile", "minilm", "--backend", "onnxruntime", "--device", "cuda", "--dtype", "float32", "--threads", "3",
        "--batch-size", "2", "--seq-len", "64", "--mode", "decode", "--context", "16", "--ffn-step", "32",
        "--rounds", "5", "--estimator", "median", "--retries", "0", "-o", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    spec, settings = captured["profile"]
    assert spec == InferenceSpec(backend="onnxruntime", device="cuda", threads=3, batch_size=2, seq_len=1,
                                 mode="decode", context=16)  # decode times one new token
    assert settings == ProfileSettings(ffn_step=32, rounds=5, estimator="median", retries=0)


def test_generate_text_options_reach_the_settings(monkeypatch, tmp_path):
    seen = []

    def generate_text(model, output, prompts, settings):
        seen.append((model, output, prompts, settings))
        return SimpleNamespace(samples=["a"], new_tokens=1, tokens_per_second=1.0)

    monkeypatch.setattr("ziplm_planner.api.generate_text", generate_text)
    result = CliRunner().invoke(cli, ["generate-text", "smollm2", "--prompts", "p.txt", "--tokens", "99", "--seq-len", "64",
                                      "--prompt-tokens", "5", "--batch-size", "3", "--temperature", "0.7", "--top-p", "0.9",
                                      "--precision", "no", "--seed", "4", "-o", str(tmp_path / "g.txt")])
    assert result.exit_code == 0, result.output
    model, output, prompts, settings = seen[0]
    assert (model, output, prompts) == ("smollm2", tmp_path / "g.txt", "p.txt")
    assert settings == GenerationSettings(tokens=99, seq_len=64, prompt_tokens=5, batch_size=3, temperature=0.7,
                                          top_p=0.9, precision="no", seed=4)
