"""The inference specification: everything that changes runtime, stored with every table."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UserError

BACKENDS = ("torch", "onnxruntime")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
MODES = ("prefill", "decode")


@dataclass(frozen=True)
class InferenceSpec:
    """How the deployed model runs. A latency table is valid for its spec only.

    prefill: one forward over `seq_len` tokens. decode: one new token per sequence with a
    KV cache of `context` tokens (decoders only; seq_len is then 1 by definition).
    """

    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    batch_size: int = 8
    seq_len: int = 128
    mode: str = "prefill"
    context: int = 0

    def __post_init__(self):
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
        if self.backend == "onnxruntime" and self.dtype != "float32":
            raise UserError("onnxruntime times the float32 model.onnx that members ship with: use --dtype float32")
        if self.device == "cpu" and self.dtype == "float16":
            raise UserError("float16 on cpu is not a deployment target: use float32 or bfloat16 on cpu")

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
