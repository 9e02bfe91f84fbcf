"""The backend registry: each backend runs a block, a whole model and a shipped member as eager torch
computes them, and scores a member with the same outputs; its names are the ones a spec accepts."""

import numpy as np
import pytest
import torch

from ziplm_planner import spec
from ziplm_planner.backends import BACKENDS, MODEL_GGUF, MODEL_ONNX, backend_for, backend_named
from ziplm_planner.errors import UserError
from ziplm_planner.export import load_pruned, save_member
from ziplm_planner.profiler import workload
from ziplm_planner.spec import InferenceSpec
from ziplm_planner.surgery import PruningPlan
from tiny_models import needs_llama_cpp, random_batch, tiny_loaded

TESTED = ("torch", "onnxruntime")  # the backends test_a_backend_runs_what_torch_computes covers
TESTED_ON_GGUF = ("llamacpp",)  # ... and test_llamacpp_runs_the_members_gguf_as_torch_computes


def test_every_registered_backend_has_a_test():
    assert set(BACKENDS) == {*TESTED, *TESTED_ON_GGUF}
    # a backend without a block runner times its blocks stacked in whole models (profiler.py)
    assert {name for name, backend in BACKENDS.items() if backend.runs_whole_models_only} == set(TESTED_ON_GGUF)
    # a backend that ships a file of its own writes it and runs it (the verifier, in a process of its own)
    assert [name for name, backend in BACKENDS.items() if backend.file is None] == ["torch"]
    assert all((backend.file is None) == (backend.file_runner is None) != (backend.module_runner is None)
               for backend in BACKENDS.values())


def test_the_registry_names_the_backends_a_spec_accepts():
    assert tuple(BACKENDS) == spec.BACKENDS
    assert all(backend_for(InferenceSpec(backend=name)) is BACKENDS[name] for name in spec.BACKENDS)
    # the float32-only rule a spec checks is the one for backends that run a shipped file of their own
    assert {name for name, backend in BACKENDS.items()
            if backend.member_file in (MODEL_ONNX, MODEL_GGUF)} == set(spec.FLOAT32_ONLY)


def test_backends_are_named_as_evaluate_accepts_them():
    assert backend_named("onnx") is backend_named("onnxruntime") is BACKENDS["onnxruntime"]
    with pytest.raises(UserError, match="unknown backend 'tensorrt': use torch or onnxruntime or llamacpp"):
        backend_named("tensorrt")


def first_output(output) -> torch.Tensor:
    """A runner's output as a tensor: torch returns it, ONNX Runtime a list of arrays."""
    return torch.from_numpy(np.asarray(output[0])) if isinstance(output, list) else output


@pytest.mark.parametrize("name", TESTED)
def test_a_backend_runs_what_torch_computes(tmp_path, name):
    """A block, the whole model (with the file it times, where it ships one), the shipped member
    folder, and evaluate's forward of that folder all give the eager model's output."""
    loaded = tiny_loaded("bert")
    backend, settings = BACKENDS[name], InferenceSpec(backend=name, batch_size=2, seq_len=8, threads=1)
    work = workload(loaded, settings)
    with torch.no_grad():
        expected = work.call(loaded.model)(*(work.inputs[n] for n in work.names))
    folder = tmp_path / "member"
    save_member(folder, loaded.model, None, PruningPlan.dense(loaded.shape), loaded.kind, {})
    model_run, timed_file = backend.model_runner(loaded.model, work, settings, tmp_path, "model")
    runs = {"block": backend.block_runner(work.call(loaded.model), work.inputs, settings, tmp_path, "block"),
            "model": model_run,
            "member": backend.member_runner(folder, load_pruned(folder), work, settings, tmp_path, "member"),
            "forward": lambda: backend.member_forward(folder, loaded.kind)(work.inputs)}
    for what, run in runs.items():
        torch.testing.assert_close(first_output(run()), expected, atol=1e-4, rtol=1e-4, msg=what)
    assert (timed_file is not None) == (backend.timed == MODEL_ONNX)
    assert (folder / backend.member_file).is_file()
    assert backend.synchronizer(settings) is None  # on the CPU nothing runs asynchronously


@needs_llama_cpp
def test_llamacpp_runs_the_members_gguf_as_torch_computes(tmp_path):
    """llama.cpp times the GGUF file it writes of a model, which ships as the member's model.gguf; the member
    runs from it, and evaluate's forward of it gives torch's logits (f32 weights, right-padded rows)."""
    loaded = tiny_loaded("llama", causal_lm=True)
    backend, settings = BACKENDS["llamacpp"], InferenceSpec(backend="llamacpp", seq_len=8, threads=1, gguf_type="f32")
    work = workload(loaded, settings)
    assert len(work.tokens) == 8 and settings.batch_size == 1
    model_run, timed_file = backend.model_runner(loaded.model, work, settings, tmp_path, "model")
    model_run(), model_run()
    folder = tmp_path / "member"
    save_member(folder, loaded.model, None, PruningPlan.dense(loaded.shape), loaded.kind, {}, timed_file=timed_file)
    assert (folder / MODEL_GGUF).read_bytes() == timed_file.read_bytes()
    backend.member_runner(folder, load_pruned(folder), work, settings, tmp_path, "member")()
    batch = random_batch(loaded.model)
    logits = backend.member_forward(folder, loaded.kind)(batch)
    with torch.no_grad():
        expected = loaded.model(**batch).logits * batch["attention_mask"][..., None]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert backend.synchronizer(settings) is None


def test_torch_waits_for_cuda_and_onnxruntime_for_nothing():
    cuda = InferenceSpec(device="cuda", dtype="float16")
    assert BACKENDS["torch"].synchronizer(cuda) is torch.cuda.synchronize
    assert BACKENDS["onnxruntime"].synchronizer(InferenceSpec(backend="onnxruntime", device="cuda")) is None


def test_onnxruntime_refuses_a_member_shipped_without_its_onnx_file(tmp_path):
    loaded = tiny_loaded("bert")
    settings = InferenceSpec(backend="onnxruntime", batch_size=2, seq_len=8, threads=1)
    folder = tmp_path / "member"
    save_member(folder, loaded.model, None, PruningPlan.dense(loaded.shape), loaded.kind, {},
                onnx=False)
    with pytest.raises(UserError, match="has no model.onnx: the family was made with --no-onnx"):
        BACKENDS["onnxruntime"].member_runner(folder, load_pruned(folder), workload(loaded, settings), settings,
                                              tmp_path, "member")
