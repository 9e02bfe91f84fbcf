"""What a measurement was taken on: machine and library versions, stored with tables and reports."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
            "hostname": platform.node()}


def library_versions() -> dict:
    names = ("ziplm-planner", "torch", "transformers", "onnxruntime", "onnx")
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
