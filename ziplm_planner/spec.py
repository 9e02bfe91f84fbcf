"""The inference specification: everything that changes runtime, stored with every table."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field

from .errors import UserError
from .settings import option

# The backends of backends.py's registry by name, and what each allows: here, so that the CLI and a
# spec's checks read them without importing torch.
BACKENDS = ("torch", "onnxruntime", "llamacpp")
FLOAT32_ONLY = ("onnxruntime", "llamacpp")  # llama.cpp computes in float32; its weight type is gguf_type
DECODERS_ONLY = ("llamacpp",)  # backends that run Llama-style decoders only (GGUF)
ENCODER_BACKENDS = tuple(b for b in BACKENDS if b not in DECODERS_ONLY)
ONE_SEQUENCE = ("llamacpp",)  # backends that serve one sequence per call
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # weight types of a member's model.gguf (norms stay float32)
GGUF_ARCHITECTURES = ("llama", "mistral")  # Llama-style decoders llama.cpp runs as `llama`/`deci` (gguf_export)
DEFAULT_GGUF_TYPE = "f16"
DEFAULT_BATCH_SIZE = 8
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
MODES = ("prefill", "decode")


@dataclass(frozen=True)
class InferenceSpec:
    """How the deployed model runs. A latency table is valid for its spec only.

    prefill: one forward over `seq_len` tokens. decode: one new token per sequence with a
    KV cache of `context` tokens (decoders only; seq_len is then 1 by definition).
    """

    backend: str = field(default="torch", metadata=option(
        "Runtime the model is deployed on: PyTorch, ONNX Runtime, or llama.cpp (Llama-style decoders, GGUF).",
        choices=BACKENDS))
    device: str = field(default="cpu", metadata=option("Device to time on.", choices=DEVICES))
    dtype: str = field(default="float32", metadata=option("Weight and activation type (float16 on cuda only).",
                                                          choices=DTYPES))
    threads: int = field(default_factory=os.cpu_count, metadata=option("Intra-op threads [default: all cores].",
                                                                       show_default=False))
    batch_size: int | None = field(default=None, metadata=option(
        f"Sequences per call, as deployed [default: {DEFAULT_BATCH_SIZE}; 1 on llamacpp].", show_default=False))
    seq_len: int = field(default=128, metadata=option("Tokens per sequence (prefill)."))
    mode: str = field(default="prefill", metadata=option(
        "prefill: one forward over --seq-len tokens; decode: one new token after --context cached ones.",
        choices=MODES))
    context: int = field(default=0, metadata=option("KV-cache length for --mode decode.", show_default=False))
    gguf_type: str | None = field(default=None, metadata=option(
        f"llamacpp: weight type of the GGUF files timed and shipped [default: {DEFAULT_GGUF_TYPE}].",
        choices=GGUF_TYPES, show_default=False))

    def __post_init__(self):
        self._resolve_backend_defaults()
        for name, value, allowed in (("backend", self.backend, BACKENDS), ("device", self.device, DEVICES),
                                     ("dtype", self.dtype, DTYPES), ("mode", self.mode, MODES)):
            if value not in allowed:
                raise UserError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        for name in ("threads", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.mode == "decode":
            if self.context < 1:
                raise UserError("decode mode needs --context N (the KV-cache length), N >= 1")
        elif self.context:
            raise UserError("--context applies to decode mode only: add --mode decode or drop --context")
        if self.backend in FLOAT32_ONLY and self.dtype != "float32":
            weights = "; its weight type is --gguf-type" if self.backend == "llamacpp" else ""
            raise UserError(f"{self.backend} times the float32 file members ship with{weights}: use --dtype float32")
        if self.device == "cpu" and self.dtype == "float16":
            raise UserError("float16 on cpu is not a deployment target: use float32 or bfloat16 on cpu")
        if self.backend in ONE_SEQUENCE and self.batch_size != 1:
            raise UserError(f"{self.backend} serves one sequence per call: use --batch-size 1 (its default)")
        if self.backend != "llamacpp" and self.gguf_type is not None:
            raise UserError(f"--gguf-type is the llamacpp backend's weight type, not {self.backend}'s: drop it")
        if self.gguf_type is not None and self.gguf_type not in GGUF_TYPES:
            raise UserError(f"gguf_type {self.gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")

    def _resolve_backend_defaults(self) -> None:
        """Fields whose default depends on the backend; set once, so a stored spec holds what was timed."""
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", 1 if self.backend in ONE_SEQUENCE else DEFAULT_BATCH_SIZE)
        if self.backend == "llamacpp" and self.gguf_type is None:
            object.__setattr__(self, "gguf_type", DEFAULT_GGUF_TYPE)

    @property
    def tokens(self) -> int:
        """Tokens the model processes per call (per sequence)."""
        return 1 if self.mode == "decode" else self.seq_len

    @property
    def calibration_length(self) -> int:
        """Tokens per calibration sample: the sequence length, or for decode the context (capped, since
        the Hessians need many samples more than long ones)."""
        return self.seq_len if self.mode == "prefill" else min(self.context, 512)

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, other: InferenceSpec) -> list[str]:
        return [f"{k}: {v} != {getattr(other, k)}" for k, v in asdict(self).items() if v != getattr(other, k)]


def torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def onnxruntime_sees_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def llamacpp_sees_cuda() -> bool:
    from .llamacpp import llama_cpp_module

    return bool(llama_cpp_module().llama_supports_gpu_offload())


# Whether each backend can time on cuda here: ONNX Runtime without its CUDA provider falls back to the cpu unasked.
SEES_CUDA = {"torch": torch_sees_cuda, "onnxruntime": onnxruntime_sees_cuda, "llamacpp": llamacpp_sees_cuda}


LLAMA_CPP_MISSING = ("llama.cpp needs llama-cpp-python: pip install 'ziplm-planner[llamacpp]' (it builds llama.cpp "
                     "from source: cmake and a C++ compiler)")


def check_runs_here(spec: InferenceSpec) -> None:
    """Refuse a spec this machine cannot time, before a model loads. Not a check of the spec itself:
    a cuda table is read, shown and compared on any machine."""
    if spec.backend == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
        raise UserError(LLAMA_CPP_MISSING)
    if spec.device == "cuda" and not SEES_CUDA[spec.backend]():
        raise UserError(f"--device cuda: {spec.backend} here sees no CUDA GPU: profile on a machine with one "
                        "(and a CUDA build of torch or onnxruntime-gpu), or use --device cpu")


def check_gguf_type(file_type: str) -> None:
    if file_type not in GGUF_TYPES:
        raise UserError(f"GGUF type {file_type!r} is not one this package writes: choose {', '.join(GGUF_TYPES)}")


def check_exportable(model_type: str, file_type: str) -> None:
    """Refuse a model llama.cpp cannot run as gguf_export writes it, or a type it does not write."""
    if model_type not in GGUF_ARCHITECTURES:
        raise UserError(f"llama.cpp runs the Llama-style decoders written here ({', '.join(GGUF_ARCHITECTURES)}), "
                        f"not {model_type}: deploy it with ONNX Runtime (model.onnx) or torch instead")
    check_gguf_type(file_type)
