"""Arguments of profile, profile show, generate-text and compress that can be checked are refused before a
model loads: one line on stderr, exit status 2, nothing written."""

import io
import logging
import sys
from pathlib import Path

import pytest
import torch

from ziplm_planner import api
from ziplm_planner.cli import main
from ziplm_planner.errors import UserError
from ziplm_planner.spec import InferenceSpec
from tiny_models import write_sentences

TABLE = Path(__file__).parents[1] / "profiles" / "minilm-cpu2-onnxruntime-b8s128.json"


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Every refusal here comes before a model loads: loading one fails the test."""
    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("ziplm_planner.models.load_model", load_model)


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ziplm-planner", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def assert_refused(code: int, err: str, message: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.fixture
def no_cuda(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])


SMOLLM2_TABLE = Path(__file__).parents[1] / "profiles" / "smollm2-cpu2-llamacpp-f16-b1d256.json"


def test_llamacpp_without_llama_cpp_python_is_refused_naming_the_extra(monkeypatch, capsys, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    code, err = run_cli(monkeypatch, capsys, "profile", "smollm2", "--backend", "llamacpp", "-o", tmp_path / "t.json")
    assert_refused(code, err, "llama.cpp needs llama-cpp-python: pip install 'ziplm-planner[llamacpp]'")
    code, err = run_cli(monkeypatch, capsys, "compress", "smollm2", "--profile", SMOLLM2_TABLE, "--targets", "2",
                        "--calib", write_sentences(tmp_path / "c.txt"), "-o", tmp_path / "f")
    assert_refused(code, err, "llama.cpp needs llama-cpp-python")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


@pytest.mark.parametrize("command", ["profile", "compress"])
def test_an_encoder_on_llamacpp_is_refused_from_its_config(monkeypatch, capsys, tmp_path, command):
    args = (["profile", "minilm", "--backend", "llamacpp", "-o", tmp_path / "t.json"] if command == "profile" else
            ["compress", "minilm", "--profile", SMOLLM2_TABLE, "--targets", "2", "--calib",
             write_sentences(tmp_path / "c.txt"), "-o", tmp_path / "f"])
    code, err = run_cli(monkeypatch, capsys, *args)
    assert_refused(code, err, "llama.cpp runs the Llama-style decoders written here (llama, mistral), not bert")
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "f").exists()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_profile_on_cuda_without_cuda_is_refused(monkeypatch, capsys, tmp_path, no_cuda, backend):
    code, err = run_cli(monkeypatch, capsys, "profile", "minilm", "--device", "cuda", "--backend", backend,
                        "-o", tmp_path / "t.json")
    assert_refused(code, err, f"--device cuda: {backend} here sees no CUDA GPU")
    assert "--device cpu" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="sees no CUDA GPU"):  # the API too
        api.profile("minilm", tmp_path / "t.json", spec=InferenceSpec(device="cuda", backend=backend))
    assert list(tmp_path.iterdir()) == []


def test_a_cuda_table_still_reads_without_cuda(no_cuda):
    """The device is checked where a spec is timed, not in the spec: a cuda table is shown anywhere."""
    assert InferenceSpec(device="cuda").device == "cuda"


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_profile_threads_below_one_is_refused(monkeypatch, capsys, tmp_path, threads):
    code, err = run_cli(monkeypatch, capsys, "profile", "minilm", "--threads", threads, "-o", tmp_path / "t.json")
    assert_refused(code, err, f"threads must be at least 1, got {threads}")
    assert list(tmp_path.iterdir()) == []


def test_profile_show_of_a_directory_says_so(monkeypatch, capsys, tmp_path):
    code, err = run_cli(monkeypatch, capsys, "profile", "show", tmp_path)
    assert_refused(code, err, f"latency table {tmp_path} is a directory: give the file `ziplm-planner profile -o`")
    assert list(tmp_path.iterdir()) == []


class Foreign:  # what torch's weights_only loader refuses, with a paragraph of advice
    pass


def test_an_unreadable_cache_entry_is_one_line_of_our_own(tmp_path, caplog):
    from ziplm_planner.database import load_cached

    path = tmp_path / "leveldb-k.pt"
    torch.save(Foreign(), path)
    with caplog.at_level(logging.WARNING, logger="ziplm_planner.database"):
        assert load_cached(path) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"deleting unreadable level-database cache entry {path} (UnpicklingError); recomputing it"]
    assert not path.exists()


@pytest.mark.parametrize("setting,drawn", [(None, False), ("1", True)])
def test_the_gguf_dequantisation_bar_follows_our_rule(monkeypatch, setting, drawn):
    from transformers import modeling_gguf_pytorch_utils as gguf

    from ziplm_planner.progress import transformers_bars

    stderr = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", stderr)
    if setting is None:
        monkeypatch.delenv("ZIPLM_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("ZIPLM_PROGRESS", setting)
    original = gguf.tqdm
    with transformers_bars():
        for _ in gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", file=sys.stderr):
            pass
    assert ("de-quantizing" in stderr.getvalue()) == drawn
    assert gguf.tqdm is original  # put back after the block


@pytest.mark.parametrize("content,message", [
    (bytes(range(128, 256)) * 8, "is not UTF-8 text"), (b"", "contains no samples"),
    (None, "does not exist"), ("dir", "is a directory"),
])
def test_unusable_prompts_are_refused_before_the_model_loads(monkeypatch, capsys, tmp_path, content, message):
    prompts = tmp_path / "prompts.txt"
    if content == "dir":
        prompts.mkdir()
    elif content is not None:
        prompts.write_bytes(content)
    before = sorted(tmp_path.iterdir())
    code, err = run_cli(monkeypatch, capsys, "generate-text", "smollm2", "--prompts", prompts, "-o", tmp_path / "g.txt")
    assert_refused(code, err, message)
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("cache,message", [("afile", "is a file"), ("afile/sub", "is inside {tmp}/afile, which is a file")])
def test_a_cache_dir_that_cannot_be_a_folder_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path,
                                                                               cache, message):
    (tmp_path / "afile").write_text("not a folder")
    calib = write_sentences(tmp_path / "calib.txt", count=5000)
    code, err = run_cli(monkeypatch, capsys, "compress", "minilm", "--profile", TABLE, "--targets", "2", "--calib",
                        calib, "--cache-dir", tmp_path / cache, "-o", tmp_path / "f")
    assert_refused(code, err, f"--cache-dir {tmp_path / cache} {message.format(tmp=tmp_path)}")
    assert "give a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "calib.txt"]
