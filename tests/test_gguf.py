"""GGUF members run by llama.cpp itself (llama-cpp-python, a real build): logits and greedy tokens equal
torch's for pruned Llama models, removed blocks included."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from ziplm_planner.adapters import model_shape
from ziplm_planner.errors import UserError
from ziplm_planner.gguf_export import NO_VOCABULARY, layer_sizes, write_gguf, written_sizes
from ziplm_planner.llamacpp import load, perplexity, timed_call
from ziplm_planner.surgery import LayerPlan, PruningPlan, apply_plan
from tiny_models import TINY_CONFIGS, spread_weights, tiny_loaded, tiny_model

pytest.importorskip("llama_cpp")


def tiny_llama(layers=4, seed=0):
    """A tiny GQA Llama: 2 KV groups of 2 query heads, head size 16, 64 FFN neurons, `layers` layers."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers, config.hidden_size, config.num_attention_heads = layers, 64, 4
    config.num_key_value_heads, config.head_dim, config.intermediate_size = 2, 16, 64
    return spread_weights(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval())


def pruned_llama(seed=0):
    """Different sizes per layer: layer 0 without attention, the last without FFN, one layer with a query
    head fewer in each KV group, and a layer with neither block."""
    model = tiny_llama(layers=5, seed=seed)
    shape, rng = model_shape(model.config), random.Random(seed)
    layers = [LayerPlan([], sorted(rng.sample(range(64), 32))),
              LayerPlan.of_heads(shape, [0, 2], sorted(rng.sample(range(64), 64))),  # one head of each group
              LayerPlan([1], sorted(rng.sample(range(64), 32))),
              LayerPlan([], []),
              LayerPlan([0, 1], [])]
    return apply_plan(model, PruningPlan(shape, layers))


def llama(path, **kwargs):
    """The file in llama.cpp, one thread, an f32 KV cache (ggml type 0: the default f16 one rounds keys and
    values to about 1e-3), without the repacked weight buffers that crash on q8_0 here (llamacpp.py)."""
    return load(path, threads=1, context=64, repacked=False, logits_all=True, type_k=0, type_v=0, **kwargs)


def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    llm = llama(path)
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)])


def torch_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def greedy_llama_cpp(path, ids: list[int], tokens: int) -> list[int]:
    llm = llama(path)
    out = list(ids)
    llm.eval(out)
    for _ in range(tokens):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval(out[-1:])
    return out


@pytest.mark.parametrize("file_type,tolerance", [("f32", 1e-5), ("f16", 2e-2), ("bf16", 5e-2)])
def test_a_pruned_llama_runs_in_llama_cpp_as_in_torch(tmp_path, file_type, tolerance):
    model = pruned_llama()
    sizes = layer_sizes(model)
    assert [(s.heads, s.kv_heads, s.ffn) for s in sizes] == [(0, 0, 32), (2, 2, 64), (2, 1, 32), (0, 0, 0), (4, 2, 0)]
    assert [(s.heads, s.ffn) for s in written_sizes(sizes)] == [(1, 32), (2, 64), (2, 32), (0, 0), (4, 32)]
    path = write_gguf(model, tmp_path / "model.gguf", NO_VOCABULARY, file_type)
    ids = [5, 17, 3, 60, 42, 8, 91, 11, 29]
    expected = torch_logits(model, ids)
    torch.testing.assert_close(llama_cpp_logits(path, ids), expected, atol=tolerance * expected.abs().max(), rtol=0)
    if file_type == "f32":  # greedy generation through llama.cpp's KV cache
        with torch.no_grad():
            ours = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert greedy_llama_cpp(path, ids, 32) == ours[0].tolist()


def test_a_member_with_layers_alike_is_plain_llama(tmp_path):
    import gguf

    model = tiny_llama()
    shape = model_shape(model.config)
    apply_plan(model, PruningPlan(shape, [LayerPlan([0], list(range(32)))] * shape.num_layers))
    path = write_gguf(model, tmp_path / "model.gguf", NO_VOCABULARY, "q8_0")
    assert gguf.GGUFReader(str(path)).fields["general.architecture"].contents() == "llama"
    ids = [5, 17, 3, 60, 42]
    # q8_0 rounds weights, and llama.cpp activations too, to 8 bits: close in direction, not to the digit
    similarity = torch.nn.functional.cosine_similarity(llama_cpp_logits(path, ids), torch_logits(model, ids), dim=-1)
    assert similarity.min() > 0.99, similarity


def test_what_gguf_cannot_hold_is_refused(tmp_path):
    with pytest.raises(UserError, match="Llama-style decoders"):
        write_gguf(tiny_model("gpt2", causal_lm=True), tmp_path / "m.gguf", NO_VOCABULARY)
    with pytest.raises(UserError, match="q8_0 needs a multiple of 32"):
        model = tiny_llama()
        apply_plan(model, PruningPlan(model_shape(model.config), [LayerPlan([0, 1], list(range(20)))] * 4))
        write_gguf(model, tmp_path / "m.gguf", NO_VOCABULARY, "q8_0")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_q8_0_profile_refuses_widths_q8_0_cannot_store_before_timing():
    import gguf

    from ziplm_planner.gguf_export import Q8_0_BLOCK
    from ziplm_planner.profiler import ProfileSettings, profile_model
    from ziplm_planner.spec import InferenceSpec

    assert Q8_0_BLOCK == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    loaded = tiny_loaded("llama", causal_lm=True)  # head size 8, hidden size 32
    with pytest.raises(UserError, match="q8_0 stores rows in blocks of 32 values, and the head size is 8"):
        profile_model(loaded, InferenceSpec(backend="llamacpp", gguf_type="q8_0", threads=1), ProfileSettings())


def test_export_gguf_writes_every_member_of_a_decoder_family(tmp_path):
    """A family compressed from a tiny Llama (on a table of made-up times, unverified: nothing here
    depends on this machine's speed): each member's model.gguf runs in llama.cpp as the member does in
    torch, and its card says how to load it."""
    from ziplm_planner.export import load_pruned
    from ziplm_planner.gguf_export import export_family_gguf
    from ziplm_planner.pipeline import compress_model
    from ziplm_planner.settings import CompressSettings
    from tiny_models import linear_table, tiny_loaded_with_tokenizer, write_sentences

    loaded = tiny_loaded_with_tokenizer("llama", causal_lm=True)
    settings = CompressSettings(num_samples=48, search_evaluations=4, score_samples=16, verify=False, onnx=False,
                                cache_dir=tmp_path / "cache")
    family = tmp_path / "family"
    compress_model(loaded, linear_table(loaded), [1.3], str(write_sentences(tmp_path / "c.txt", count=300)),
                   family, settings)
    written = export_family_gguf(family, "f32", vocabulary=NO_VOCABULARY)  # the stand-in tokenizer is WordPiece
    assert [p.relative_to(family).as_posix() for p in written] == ["dense/model.gguf", "x1.3/model.gguf"]
    ids = [101, 2023, 2003, 1037, 3231, 102]
    for path in written:
        member = load_pruned(path.parent)
        expected = torch_logits(member, ids)
        torch.testing.assert_close(llama_cpp_logits(path, ids), expected, atol=1e-5 * expected.abs().max(), rtol=0)
        assert "model.gguf" in (path.parent / "README.md").read_text()


def test_an_encoder_family_is_refused_before_any_file_is_written(tmp_path):
    from ziplm_planner.export import save_member
    from ziplm_planner.family import FamilyReport
    from ziplm_planner.gguf_export import export_family_gguf
    from ziplm_planner.kinds import EMBEDDING

    model = tiny_model("bert")
    save_member(tmp_path / "dense", model, None, PruningPlan.dense(model_shape(model.config)), EMBEDDING, {}, onnx=False)
    FamilyReport([{"target": 1.0, "folder": "dense"}], {"model": "tiny-bert"}).save(tmp_path)
    with pytest.raises(UserError, match="Llama-style decoders"):
        export_family_gguf(tmp_path, "f16")
    assert not (tmp_path / "dense" / "model.gguf").exists()


def test_a_family_timed_in_llama_cpp_keeps_the_files_it_timed(tmp_path):
    """Its members' model.gguf are the files timed, at the table's type: another type is refused, not
    written over them."""
    from ziplm_planner.family import FamilyReport
    from ziplm_planner.gguf_export import export_family_gguf

    FamilyReport([{"target": 1.0, "folder": "dense"}], {"model": "tiny", "spec": {"gguf_type": "f16"}}).save(tmp_path)
    with pytest.raises(UserError, match="ship the f16 model.gguf that llama.cpp timed: for q8_0 members profile with "
                                        "--backend llamacpp --gguf-type q8_0"):
        export_family_gguf(tmp_path, "q8_0")


def test_perplexity_in_llama_cpp_is_torchs_and_both_timings_run(tmp_path):
    model = pruned_llama()
    path = write_gguf(model, tmp_path / "model.gguf", NO_VOCABULARY, "f32")
    windows = [[5, 17, 3, 60, 42, 8, 91, 11, 29], [7, 7, 50, 2, 81, 33, 14, 64, 90]]
    with torch.no_grad():
        losses = [model(torch.tensor([w]), labels=torch.tensor([w])).loss for w in windows]
    expected = float(torch.exp(torch.stack(losses).mean()))
    assert perplexity(path, windows, threads=1, repacked=False) == pytest.approx(expected, rel=1e-4)
    for mode in ("prefill", "decode"):
        run = timed_call(path, mode, windows[0], threads=1)
        run(), run()  # repeatable: the cache is cut back before each call
    with pytest.raises(UserError, match="mode must be one of prefill, decode"):
        timed_call(path, "train", windows[0], threads=1)
    with pytest.raises(UserError, match="does not exist: write it with `ziplm-planner export-gguf`"):
        load(tmp_path / "none.gguf", threads=1, context=8)
