"""scripts/install.sh takes torch from PyTorch's CPU index on a machine with no NVIDIA GPU, unless the
user told pip where packages come from: then from there, as pip would (a folder of wheels, a mirror)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def torch_source(tmp_path: Path, gpu: bool = False, config: str | None = None, **pip_env: str) -> str:
    """What install.sh's torch_source prints, in an environment of only what the case names: a PATH
    holding grep (and nvidia-smi where `gpu`), the PIP_* variables given, and a pip config file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grep").symlink_to(shutil.which("grep"))
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    config_file = tmp_path / "pip.conf"
    config_file.write_text(config or "")
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PIP_CONFIG_FILE": str(config_file), **pip_env}
    script = f'source {ROOT / "scripts" / "install.sh"}; torch_source {sys.executable}'
    result = subprocess.run([shutil.which("bash"), "-c", script], env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_a_machine_with_no_gpu_and_no_configured_source_takes_the_cpu_index(tmp_path):
    assert torch_source(tmp_path) == CPU_INDEX


@pytest.mark.parametrize("pip_env,config", [
    ({"PIP_FIND_LINKS": "/opt/wheels"}, None),  # a folder of wheels holding the CPU build, as on the dev VM
    ({"PIP_INDEX_URL": "https://mirror.example/simple"}, None),
    ({"PIP_EXTRA_INDEX_URL": "file:///opt/pypi/simple"}, None),
    ({}, "[global]\nfind-links = /opt/wheels\n"),
    ({}, "[install]\nindex-url = https://mirror.example/simple\n"),
], ids=["PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "config find-links", "config index-url"])
def test_a_source_the_user_configured_is_kept(tmp_path, pip_env, config):
    assert torch_source(tmp_path, config=config, **pip_env) == ""


def test_a_machine_with_an_nvidia_gpu_takes_torch_as_pip_would(tmp_path):
    assert torch_source(tmp_path, gpu=True) == ""


def test_other_pip_settings_are_no_source(tmp_path):
    assert torch_source(tmp_path, config="[global]\ntimeout = 60\ncert = /etc/ssl/certs/ca.crt\n") == CPU_INDEX


def test_the_script_parses():
    subprocess.run([shutil.which("bash"), "-n", str(ROOT / "scripts" / "install.sh")], check=True, env=os.environ)
