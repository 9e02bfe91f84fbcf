"""GGUF members for llama.cpp: a Llama-style decoder member written as llama.cpp reads it.

A member whose layers are alike is the `llama` architecture. One whose layers differ is `deci`
(NVIDIA's Nemotron-NAS layout, which llama.cpp runs), with each layer's query heads, KV heads and
FFN width in per-layer arrays; head size and rope width are written always, since llama.cpp would
otherwise take them from layer 0. Three patterns llama.cpp does not run as the member does are
written as exact equivalents, which add zero to the residual stream:
- layer 0 without attention (llama.cpp takes sizes from it and refuses it): one KV head and one query
  head with zero weights;
- a layer that keeps attention but not its FFN (llama.cpp drops that layer's attention output), and a
  last layer without FFN (prompt logits would come from the first token): an FFN of MIN_FFN neurons with
  zero weights.
Q and K rows are permuted from the Hugging Face rotary layout to llama.cpp's, per layer at its own head
counts. The tokenizer is copied from the source GGUF, or built from a Hugging Face BPE tokenizer.json.
This module is the Llama layout's mapping to GGUF names, as llama.cpp's own converter maps them: the
module names it reads are the Llama family's (the only family llama.cpp runs as `deci`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import model_layers
from .errors import UserError
from .family import MEMBER_GGUF
from .modeling_ziplm import ZeroAttention, ZeroMLP
from .spec import check_exportable

Q8_0_BLOCK = 32  # values per q8_0 block (gguf.GGML_QUANT_SIZES[Q8_0][0]; test_gguf checks)
MIN_FFN = Q8_0_BLOCK  # neurons of a zero FFN written for llama.cpp: one q8_0 block


@dataclass(frozen=True)
class LayerSizes:
    """What one layer keeps, as llama.cpp counts it (0: removed)."""

    heads: int
    kv_heads: int
    ffn: int


def layer_sizes(model: nn.Module) -> list[LayerSizes]:
    """Each layer's query heads, KV heads and FFN neurons, read from its modules."""
    head_dim = gguf_head_dim(model.config)
    sizes = []
    for layer in model_layers(model):
        attention, mlp = layer.self_attn, layer.mlp
        heads, kv_heads = ((0, 0) if isinstance(attention, ZeroAttention) else
                           (attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim))
        sizes.append(LayerSizes(heads, kv_heads, 0 if isinstance(mlp, ZeroMLP) else mlp.gate_proj.out_features))
    return sizes


def gguf_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def written_sizes(sizes: list[LayerSizes]) -> list[LayerSizes]:
    """The sizes the file carries: the member's, with the zero blocks llama.cpp needs (module docstring)."""
    written = []
    for index, size in enumerate(sizes):
        heads, kv_heads = (1, 1) if index == 0 and size.heads == 0 else (size.heads, size.kv_heads)
        needs_ffn = size.ffn == 0 and (heads > 0 or index == len(sizes) - 1)
        written.append(LayerSizes(heads, kv_heads, MIN_FFN if needs_ffn else size.ffn))
    return written


def rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K rows from Hugging Face's rotary layout (two halves per head) to llama.cpp's (interleaved
    pairs), as llama.cpp's own converter permutes them."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def layer_tensors(layer: nn.Module, size: LayerSizes, written: LayerSizes, hidden: int, head_dim: int
                  ) -> dict[str, torch.Tensor]:
    """A layer's tensors under llama.cpp's names (without the blk.N. prefix), zero blocks included."""
    tensors = {}
    if size.heads:
        attention = layer.self_attn
        tensors.update({"attn_norm.weight": layer.input_layernorm.weight,
                        "attn_q.weight": rotary_rows(attention.q_proj.weight, size.heads),
                        "attn_k.weight": rotary_rows(attention.k_proj.weight, size.kv_heads),
                        "attn_v.weight": attention.v_proj.weight, "attn_output.weight": attention.o_proj.weight})
    elif written.heads:
        tensors.update({"attn_norm.weight": torch.ones(hidden), "attn_q.weight": torch.zeros(head_dim, hidden),
                        "attn_k.weight": torch.zeros(head_dim, hidden), "attn_v.weight": torch.zeros(head_dim, hidden),
                        "attn_output.weight": torch.zeros(hidden, head_dim)})
    if size.ffn:
        mlp = layer.mlp
        tensors.update({"ffn_norm.weight": layer.post_attention_layernorm.weight, "ffn_gate.weight": mlp.gate_proj.weight,
                        "ffn_up.weight": mlp.up_proj.weight, "ffn_down.weight": mlp.down_proj.weight})
    elif written.ffn:
        tensors.update({"ffn_norm.weight": torch.ones(hidden), "ffn_gate.weight": torch.zeros(written.ffn, hidden),
                        "ffn_up.weight": torch.zeros(written.ffn, hidden),
                        "ffn_down.weight": torch.zeros(hidden, written.ffn)})
    return tensors


def model_tensors(model: nn.Module, sizes: list[LayerSizes], written: list[LayerSizes]) -> dict[str, torch.Tensor]:
    config, base = model.config, model.base_model
    hidden, head_dim = config.hidden_size, gguf_head_dim(config)
    tensors = {"token_embd.weight": base.embed_tokens.weight, "output_norm.weight": base.norm.weight}
    if not config.tie_word_embeddings:  # tied: llama.cpp reads the embeddings again
        tensors["output.weight"] = model.lm_head.weight
    for index, (layer, size, layer_written) in enumerate(zip(model_layers(model), sizes, written)):
        tensors.update({f"blk.{index}.{name}": tensor
                        for name, tensor in layer_tensors(layer, size, layer_written, hidden, head_dim).items()})
    return tensors


def stored(name: str, tensor: torch.Tensor, file_type: str):
    """(data, raw type or None) of one tensor as the file type stores it; norms stay float32."""
    import gguf

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or file_type == "f32":
        return data, None
    if file_type == "f16":
        return data.astype(np.float16), None
    if file_type == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if data.shape[-1] % Q8_0_BLOCK:
        raise UserError(f"{name} has rows of {data.shape[-1]} values: q8_0 needs a multiple of 32; use f16 or f32")
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def write_header(writer, config, written: list[LayerSizes], file_type: str) -> None:
    """The architecture's metadata: `llama` with one size for all, or `deci` with one per layer."""
    import gguf

    head_dim = gguf_head_dim(config)
    writer.add_name(str(getattr(config, "_name_or_path", "") or "ziplm-planner member"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(written))
    same = len(set(written)) == 1
    for add, values in ((writer.add_feed_forward_length, [s.ffn for s in written]),
                        (writer.add_head_count, [s.heads for s in written]),
                        (writer.add_head_count_kv, [s.kv_heads for s in written])):
        add(values[0] if same else [int(v) for v in values])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                    (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type])


def check_gguf_widths(shape, file_type: str, ffn_step: int) -> None:
    """Refuse, before any file is written, a block type that cannot store the widths a plan may give
    (q8_0 stores rows in blocks of 32 values: the hidden size, a head's width, every FFN size timed)."""
    if file_type != "q8_0":
        return
    for what, width in (("hidden size", shape.hidden_size), ("head size", shape.head_dim),
                        ("FFN size", shape.intermediate_size), ("--ffn-step", ffn_step)):
        if width % Q8_0_BLOCK:
            remedy = f" or a multiple of {Q8_0_BLOCK}" if what == "--ffn-step" else ""
            raise UserError(f"q8_0 stores rows in blocks of {Q8_0_BLOCK} values, and the {what} is {width}: "
                            f"use --gguf-type f16 or f32{remedy}")


def write_gguf(model: nn.Module, path: Path, vocabulary, file_type: str = "f32") -> Path:
    """Write `model` (a pruned or dense Llama-style decoder) to `path` for llama.cpp, with `vocabulary`
    (SourceVocabulary, HuggingFaceVocabulary or NO_VOCABULARY) as its tokenizer. Written under a
    temporary name, renamed when complete."""
    import gguf

    check_exportable(model.config.model_type, file_type)
    sizes = layer_sizes(model)
    written = written_sizes(sizes)
    architecture = "llama" if len(set(written)) == 1 else "deci"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), architecture)
        write_header(writer, model.config, written, file_type)
        vocabulary.write(writer)
        for name, tensor in model_tensors(model, sizes, written).items():
            data, raw_type = stored(name, tensor, file_type)
            writer.add_tensor(name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class SourceVocabulary:
    """The tokenizer of the GGUF file the model was read from, copied field by field."""

    path: Path

    def write(self, writer) -> None:
        import gguf

        reader = gguf.GGUFReader(str(self.path))
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, field.contents(), field.types[0], sub_type)


@dataclass(frozen=True)
class HuggingFaceVocabulary:
    """A Hugging Face BPE tokenizer (tokenizer.json), as llama.cpp's `gpt2` tokenizer model."""

    folder: Path

    def write(self, writer) -> None:
        import gguf

        try:
            vocab = gguf.vocab.BpeVocab(self.folder)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise UserError(f"{self.folder}: only a BPE tokenizer (tokenizer.json) is written to GGUF here ({err}); "
                            "give the model as its .gguf file to keep its own tokenizer") from None
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        gguf.SpecialVocab(self.folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


@dataclass(frozen=True)
class TokenizerVocabulary:
    """A loaded Hugging Face tokenizer whose files are not in a folder here (a hub model), saved to be read."""

    tokenizer: object

    def write(self, writer) -> None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ziplm-tokenizer-") as folder:
            self.tokenizer.save_pretrained(folder)
            HuggingFaceVocabulary(Path(folder)).write(writer)


class NoVocabulary:
    """No tokenizer: the file is run on token ids (llama.cpp's `none` tokenizer model)."""

    def write(self, writer) -> None:
        writer.add_tokenizer_model("none")


NO_VOCABULARY = NoVocabulary()


def vocabulary_for(source, folder: Path):
    """The tokenizer a GGUF of this model carries: its source GGUF's where the model was read from one (the
    tokenizer llama.cpp was given for it), else the tokenizer.json in `folder` (a member's, or the source's)."""
    if source.gguf_file:
        return SourceVocabulary(Path(source.location) / source.gguf_file)
    return HuggingFaceVocabulary(folder)


def model_vocabulary(loaded):
    """The tokenizer a loaded model's GGUF files carry: its source GGUF's, else its own."""
    source = loaded.source
    if source.gguf_file or (source.folder is not None and (source.folder / "tokenizer.json").is_file()):
        return vocabulary_for(source, source.folder)
    from transformers import PreTrainedTokenizerBase

    if isinstance(loaded.tokenizer, PreTrainedTokenizerBase):
        return TokenizerVocabulary(loaded.tokenizer)
    return NO_VOCABULARY  # a model without a tokenizer is run on token ids


def model_type_of(member: Path) -> str | None:
    """The architecture a member's config.json names, read without loading the member."""
    try:
        return json.loads((member / "config.json").read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"member {member} has no readable config.json ({err}): run `ziplm-planner compress` again") from None


def export_family_gguf(family: Path, file_type: str = "f16", vocabulary=None) -> list[Path]:
    """model.gguf in every member of a decoder family (the dense one included), with the tokenizer of
    `vocabulary_for` unless `vocabulary` is given; the cards are written again to say so."""
    from .aliases import resolve_model
    from .cards import write_cards
    from .export import load_pruned
    from .family import read_report

    report = read_report(family)
    if (timed := (report["metadata"].get("spec") or {}).get("gguf_type")) is not None:
        raise UserError(f"{family}'s members ship the {timed} model.gguf that llama.cpp timed: for {file_type} members "
                        f"profile with --backend llamacpp --gguf-type {file_type} and compress again")
    folders = [Path(family) / row["folder"] for row in report["members"]]
    check_exportable(model_type_of(folders[0]), file_type)  # an encoder family: before any file is written
    source = None if vocabulary is not None else resolve_model(str(report["metadata"].get("model")))
    written = []
    for folder in folders:
        model = load_pruned(folder)
        written.append(write_gguf(model, folder / MEMBER_GGUF, vocabulary or vocabulary_for(source, folder), file_type))
    write_cards(family)
    return written
