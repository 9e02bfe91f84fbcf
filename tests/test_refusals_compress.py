"""compress refuses bad input before the work it would spoil: one line, exit status 2, nothing written,
in one process and in every process of a torchrun launch."""

import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import measured_table, tiny_loaded_with_tokenizer, write_sentences
from ziplm_planner.calibrate import load_calibration, min_calibration_tokens
from ziplm_planner.cli import main
from ziplm_planner.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved as a Hugging Face folder (with the MiniLM tokenizer), its table and calibration text:
    what the command line loads."""
    folder = tmp_path_factory.mktemp("saved")
    loaded = tiny_loaded_with_tokenizer("bert")
    loaded.model.save_pretrained(folder / "model")
    loaded.tokenizer.save_pretrained(folder / "model")
    measured_table(loaded).save(folder / "table.json")
    write_sentences(folder / "calib.txt", count=300)
    return folder


def compress_args(saved: Path, calib: Path, output: Path, *extra: str) -> list[str]:
    return ["compress", str(saved / "model"), "--profile", str(saved / "table.json"), "--targets", "1.2",
            "--calib", str(calib), "--no-onnx", "--cache-dir", str(output.parent / "cache"), *extra, "-o", str(output)]


def run_cli(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["ziplm-planner", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_calibration_data_shorter_than_the_hessians_need_is_refused_before_pruning(saved, tmp_path, monkeypatch,
                                                                                   capsys):
    """One 6-word line is 8 tokens with [CLS] and [SEP]; the tiny model's widest layer has 48 inputs."""
    short = tmp_path / "short.txt"
    short.write_text("the cat sleeps under the tree\n")
    code, err = run_cli(monkeypatch, capsys, compress_args(saved, short, tmp_path / "family"))
    assert code == 2
    assert error_lines(err) == [f"error: calibration data {short} gives 1 sample(s) of the 512 asked for, 8 real "
                                "tokens in all: the Hessians need at least 48 (one per input of the widest layer); "
                                "give more text"]
    assert "Traceback" not in err and "using all" not in err  # no warning that it goes on with what there is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]  # no family, no level database


def test_an_output_folder_of_other_files_is_refused_before_the_model_loads(saved, tmp_path, monkeypatch, capsys):
    family = tmp_path / "family"
    family.mkdir()
    (family / "notes.txt").write_text("the user's")
    monkeypatch.setattr("ziplm_planner.api._loaded", lambda model: pytest.fail("the model was loaded"))
    code, err = run_cli(monkeypatch, capsys, compress_args(saved, saved / "calib.txt", family))
    assert code == 2 and error_lines(err) == [f"error: output directory {family} holds other files, not a family: "
                                              "use another -o (or --overwrite to replace them)"]
    assert [p.name for p in family.iterdir()] == ["notes.txt"]


def test_enough_samples_too_short_for_the_hessians_ask_for_more_samples(saved, caplog):
    loaded = tiny_loaded_with_tokenizer("bert")
    with pytest.raises(UserError, match=r"gives 2 sample\(s\) of the 2 asked for, \d+ real tokens in all: the "
                                        "Hessians need at least 48 .* raise --num-samples or give longer samples"):
        load_calibration(loaded, str(saved / "calib.txt"), 16, 2)
    assert load_calibration(loaded, str(saved / "calib.txt"), 16, 16).tokens.num_tokens >= 48
    assert not caplog.records
    assert load_calibration(loaded, str(saved / "calib.txt"), 16, 512).num_samples == 300  # enough, if fewer
    assert "gives 300 samples, fewer than the 512 asked for; using all" in caplog.text


def test_the_hessians_need_a_token_per_input_of_the_widest_output_projection():
    shape = tiny_loaded_with_tokenizer("bert").shape
    assert min_calibration_tokens(shape) == max(shape.num_heads * shape.head_dim, shape.intermediate_size) == 48


def test_a_refusal_under_torchrun_is_every_process_exiting_2(saved, tmp_path):
    """The main process refuses an output folder holding another family (it reads its manifest after the
    processes have met); the other one is told and stops too. Each says one line and exits 2 of its own
    accord, not killed by the launcher when the first one exits. torchrun itself then reports the
    failure (its ChildFailedError, listing each process's exit code) and exits 1: it does so for any
    process that exits other than 0, and the processes cannot change that."""
    family = tmp_path / "family"
    family.mkdir()
    (family / "family.json").write_text('{"source": {"model": "another"}}')
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                             "ziplm_planner", *compress_args(saved, saved / "calib.txt", family, "--recovery",
                                                             "oneshot", "--train-tokens", "1000")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert sorted(error_lines(result.stderr)) == [
        "error: output directory " + str(family) + " already holds a different family or other files: use "
        "--overwrite or another -o",
        "error: the main process stopped on an error (its output says which): this one stops too"]
    exit_codes = [line.split(":")[1].split()[0] for line in result.stderr.splitlines()
                  if line.strip().startswith("exitcode")]
    assert exit_codes == ["2", "2"], result.stderr[-3000:]
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr  # torchrun's, no process's
    assert [p.name for p in family.iterdir()] == ["family.json"]
