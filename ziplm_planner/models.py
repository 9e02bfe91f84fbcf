"""Finding and loading models: Hugging Face folders or ids, GGUF files, and bundled aliases."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import CONFIG_NAME

from .adapters import Architecture, ModelShape, architecture_for, model_shape
from .aliases import ModelSource, resolve_model
from .errors import UserError
from .kinds import ModelKind, kind_of
from .progress import stage, transformers_bars


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: ModelSource
    kind: ModelKind

    # read from the model's config (a pruned model keeps the dense one): right after replace(loaded, model=...)
    @property
    def architecture(self) -> Architecture:
        return architecture_for(self.model.config)

    @property
    def shape(self) -> ModelShape:
        return model_shape(self.model.config)


def check_hub_model(repo_id: str) -> None:
    """A hub id must be in the local Hugging Face cache or fetchable now. Asked once, without retries:
    given an unreachable hub, huggingface_hub retries for half a minute and logs every try."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, CONFIG_NAME), str):
            return
        get_hf_file_metadata(hf_hub_url(repo_id, CONFIG_NAME))  # one HEAD request, no retry
    except Exception as err:  # offline, DNS, proxy, an invalid, unknown or gated id: it cannot be fetched
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"model {repo_id} is not in the local Hugging Face cache and cannot be fetched ({reason}): "
                        f"download it first (`hf download {repo_id}`) or give a local folder") from None


def load_config(source: ModelSource):
    if source.on_hub:
        check_hub_model(source.location)
    try:
        config = AutoConfig.from_pretrained(source.location, **source.kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the config of model {source.reference}: {str(err).splitlines()[0]}") from None
    architecture_for(config)  # unsupported families fail here, before any weights load
    return config


def load_model(reference: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a supported model and its tokenizer for pruning: float weights, SDPA attention, eval mode."""
    source = resolve_model(reference)
    config = load_config(source)
    kind = kind_of(config)
    try:
        with stage("load model", f"{source.reference} ({config.model_type}, {kind.name})"), transformers_bars():
            model = kind.auto_class.from_pretrained(
                source.location, dtype=dtype, attn_implementation="sdpa", **source.kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source.location, **source.kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model {source.reference}: {str(err).splitlines()[0]}") from None
    return LoadedModel(model.eval(), tokenizer, source, kind)
