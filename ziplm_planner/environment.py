"""What a measurement was taken on: machine and library versions, stored with tables and reports."""

from __future__ import annotations

import datetime
import os
import platform
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class CpuSnapshot:
    """Busy CPU time of the whole machine (steal included: a VM's host taking its cores) and of this
    process, at one moment; None fields where /proc/stat is not available."""

    machine_busy: float | None  # seconds, all cores
    own: float  # seconds of this process (all threads), and of its waited-for children where asked
    wall: float

    @classmethod
    def now(cls, with_children: bool = False) -> CpuSnapshot:
        """`with_children`: the children this process waited for count as its own (the verifier's timing
        processes are its work, not another's)."""
        busy = None
        try:
            with open("/proc/stat") as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
            user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
            busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            pass
        times = os.times()
        children = times.children_user + times.children_system if with_children else 0.0
        return cls(busy, times.user + times.system + children, time.perf_counter())


def others_share(before: CpuSnapshot, after: CpuSnapshot) -> float | None:
    """Share of the machine's cores that other processes (or the VM host) used between two snapshots:
    0 on a quiet machine, 1 when everything else kept every core busy."""
    if before.machine_busy is None or after.machine_busy is None or after.wall <= before.wall:
        return None
    others = (after.machine_busy - before.machine_busy) - (after.own - before.own)
    return max(0.0, others / ((after.wall - before.wall) * (os.cpu_count() or 1)))
