"""What makes a member load in the user's own stack, without ziplm-planner: its config.json, and for a
sentence-transformers source, its modules.

config.json is a plain config of the member's architecture where one describes it (every layer keeps
as many heads and neurons, and the architecture's config can say so: the dense model, FFN-only
uniform pruning, uniform Llama-style pruning with its explicit head_dim). Otherwise it is the dense
config plus per-layer sizes and the layout of the layers' projections, with `modeling_ziplm.py` (the
package's own surgery, copied as it is) named in `auto_map`: then the Auto class of the member's kind
loads it with `trust_remote_code=True`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from . import modeling_ziplm
from .adapters import Architecture, ModelShape, architecture_for
from .kinds import ModelKind
from .surgery import PruningPlan

MODELING_FILE = Path(modeling_ziplm.__file__).name
# a sentence-transformers model's own files besides the transformer's (its modules' folders are named in modules.json)
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# the source's licence and attribution travel with every member
ATTRIBUTION_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.txt", "USE_POLICY.md")


def sized_config(config, arch: Architecture, heads: int, kv_heads: int, intermediate: int, head_dim: int):
    """A copy of `config` describing layers of these sizes, in the architecture's own config fields."""
    sized = config.__class__.from_dict(config.to_dict())
    setattr(sized, arch.config_heads, heads)
    if arch.config_kv_heads:
        setattr(sized, arch.config_kv_heads, kv_heads)
    setattr(sized, arch.config_intermediate, intermediate)
    if hasattr(sized, "head_dim"):
        sized.head_dim = head_dim
    for name in (*modeling_ziplm.PER_LAYER, modeling_ziplm.LAYOUT, "auto_map"):
        if hasattr(sized, name):
            delattr(sized, name)
    return sized


def dense_config(config, shape: ModelShape):
    """The dense model's config, from a member's config.json (plain, or dense with per-layer sizes)."""
    return sized_config(config, architecture_for(config), shape.num_heads, shape.attention_units,
                        shape.intermediate_size, shape.head_dim)


def plain_config(model: nn.Module, plan: PruningPlan):
    """The architecture's own config for the pruned `model`, if one describes it: every layer alike,
    and a model built from it has exactly the member's weight shapes. Else None."""
    sizes = set(plan.kept_counts())
    if len(sizes) != 1:
        return None
    (level, neurons), shape = sizes.pop(), plan.shape
    if not level.groups or not neurons:  # a removed block is no config field
        return None
    config = sized_config(model.config, architecture_for(model.config), level.query_heads, level.groups, neurons,
                          shape.head_dim)
    with torch.device("meta"):
        candidate = type(model)._from_config(config)
    shapes = {name: tensor.shape for name, tensor in candidate.state_dict().items()}
    return config if shapes == {name: tensor.shape for name, tensor in model.state_dict().items()} else None


def remote_config(model: nn.Module, plan: PruningPlan, kind: ModelKind):
    """The dense config, the sizes each layer keeps and where their projections are, loaded by
    modeling_ziplm.Pruned<Class> through the Auto class of the member's kind."""
    shape, arch = plan.shape, architecture_for(model.config)
    config = dense_config(model.config, shape)
    counts = plan.kept_counts()
    sizes = ([level.query_heads for level, _ in counts], [level.groups for level, _ in counts],  # KV heads: groups
             [neurons for _, neurons in counts])
    for name, values in zip(modeling_ziplm.PER_LAYER, sizes):
        setattr(config, name, values)
    setattr(config, modeling_ziplm.LAYOUT, layout(arch, shape))
    config.auto_map = {kind.auto_class.__name__: f"{Path(MODELING_FILE).stem}.Pruned{type(model).__name__}"}
    return config


def layout(arch: Architecture, shape: ModelShape) -> dict:
    """What modeling_ziplm needs of the architecture and the dense shape, as JSON."""
    fields = {f.name: getattr(arch, f.name) for f in dataclasses.fields(arch)
              if not f.name.startswith("config_") and f.name not in ("name", "model_types", "pre_norm")}
    fields["attention_bypass"] = [[path, kind.value] for path, kind in arch.attention_bypass]
    fields["ffn_bypass"] = [[path, kind.value] for path, kind in arch.ffn_bypass]
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
            "head_dim": shape.head_dim, "q_per_unit": shape.q_per_unit, "num_heads": shape.num_heads,
            "intermediate_size": shape.intermediate_size}


def write_config(folder: Path, model: nn.Module, plan: PruningPlan, kind: ModelKind) -> bool:
    """config.json for `model`, plain where one describes it, else with modeling_ziplm.py beside it.
    Returns whether loading needs remote code."""
    config = plain_config(model, plan)
    if config is None:
        remote_config(model, plan, kind).save_pretrained(folder)
        shutil.copyfile(modeling_ziplm.__file__, folder / MODELING_FILE)
        return True
    config.save_pretrained(folder)
    return False


def copy_source_files(source: Path, folder: Path) -> list[str]:
    """The source model's sentence-transformers modules (modules.json, pooling, normalisation; its
    transformer module is the member itself) and licence files, copied into `folder`; their names."""
    copied = [name for name in (*SENTENCE_TRANSFORMERS_FILES, *ATTRIBUTION_FILES) if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, folder / name)
    for module_path in sentence_transformers_modules(source):
        shutil.copytree(source / module_path, folder / module_path, dirs_exist_ok=True)
        copied.append(module_path)
    return copied


def sentence_transformers_modules(source: Path) -> list[str]:
    """The folders of a sentence-transformers model's modules after the transformer (those present)."""
    try:
        modules = json.loads((source / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    paths = [m.get("path") for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    return [p for p in paths if isinstance(p, str) and p and (source / p).is_dir() and Path(p).name == p]
