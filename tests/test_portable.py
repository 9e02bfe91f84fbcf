"""Members load in the user's own stack: the Auto class of their kind, with only torch and transformers
imported (a subprocess that never imports ziplm_planner), gives what `load_pruned` gives."""

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from ziplm_planner.adapters import model_shape
from ziplm_planner.export import load_pruned, save_member
from ziplm_planner.kinds import CAUSAL_LM, CLASSIFICATION, EMBEDDING
from ziplm_planner.portable import MODELING_FILE
from ziplm_planner.surgery import LayerPlan, PruningPlan, apply_plan
from tiny_models import gqa_model, random_batch, tiny_of_kind

pytestmark = pytest.mark.remote_code

AUTO_LOAD = textwrap.dedent("""
    import sys, json, torch, transformers
    folder, auto, batch_file, out_file = sys.argv[1:5]
    model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
    assert "ziplm_planner" not in sys.modules
    batch = torch.load(batch_file)
    with torch.no_grad():
        out = model(**batch)
    result = {"output": getattr(out, "logits", None) if hasattr(out, "logits") else out.last_hidden_state,
              "class": type(model).__name__}
    if auto == "AutoModelForCausalLM":
        result["generated"] = model.generate(batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                                             max_new_tokens=12, do_sample=False)
    torch.save(result, out_file)
""")


def auto_load(folder, kind, batch, tmp_path) -> dict:
    """Load `folder` with the kind's Auto class in a fresh interpreter and run `batch` through it."""
    torch.save(batch, tmp_path / "batch.pt")
    env_free = subprocess.run([sys.executable, "-c", AUTO_LOAD, str(folder), kind.auto_class.__name__,
                               str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
                              capture_output=True, text=True, cwd=tmp_path)
    assert env_free.returncode == 0, env_free.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def heterogeneous_plan(shape, seed=0, query_heads=False) -> PruningPlan:
    """Every layer a different size; layer 0 keeps no attention, the last no FFN."""
    rng = random.Random(seed)
    layers = []
    for index in range(shape.num_layers):
        groups = sorted(rng.sample(range(shape.attention_units), rng.randint(1, shape.attention_units)))
        ffn = sorted(rng.sample(range(shape.intermediate_size), rng.randint(1, shape.intermediate_size - 1)))
        heads = [g * shape.q_per_unit + i for g in groups for i in range(shape.q_per_unit)]
        if query_heads and shape.q_per_unit > 1:  # one query head fewer in every kept group
            heads = [h for h in heads if h % shape.q_per_unit]
        layers.append(LayerPlan.of_heads(shape, heads, ffn))
    layers[0] = LayerPlan([], layers[0].ffn)
    layers[-1] = LayerPlan(layers[-1].attention, [], layers[-1].query_heads)
    return PruningPlan(shape, layers)


def saved(tmp_path, model, plan, kind):
    apply_plan(model, plan)
    folder = tmp_path / "member"
    save_member(folder, model, None, plan, kind, {}, onnx=False)
    return folder


CASES = [("bert", EMBEDDING), ("bert", CLASSIFICATION), ("llama", CAUSAL_LM), ("gpt2", CAUSAL_LM)]


def model_of(model_type, kind):
    if model_type == "llama":  # query heads inside KV groups
        return gqa_model("llama", kv_groups=2, heads_per_group=2)
    return tiny_of_kind(kind, model_type)


@pytest.mark.parametrize("model_type,kind", CASES)
def test_a_heterogeneous_member_loads_with_its_auto_class_and_remote_code(tmp_path, model_type, kind):
    model = model_of(model_type, kind)
    plan = heterogeneous_plan(model_shape(model.config), query_heads=model_type == "llama")
    folder = saved(tmp_path, model, plan, kind)
    config = json.loads((folder / "config.json").read_text())
    assert (folder / MODELING_FILE).is_file() and kind.auto_class.__name__ in config["auto_map"]
    assert config["num_attention_heads_per_layer"][0] == 0 and config["intermediate_size_per_layer"][-1] == 0
    batch = random_batch(model, batch=2, seq=9)
    result = auto_load(folder, kind, batch, tmp_path)
    reference = load_pruned(folder)
    with torch.no_grad():
        out = reference(**batch)
    expected = out.logits if hasattr(out, "logits") else out.last_hidden_state
    keep = batch["attention_mask"].bool() if expected.dim() == 3 else slice(None)
    assert result["class"] == f"Pruned{type(model).__name__}"
    torch.testing.assert_close(result["output"][keep], expected[keep], atol=1e-5, rtol=0)
    if kind is CAUSAL_LM:  # greedy generation through the KV cache, removed attention included
        ours = reference.generate(batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                                  max_new_tokens=12, do_sample=False)
        assert torch.equal(result["generated"], ours)


@pytest.mark.parametrize("model_type,kind", [("llama", CAUSAL_LM), ("bert", EMBEDDING), ("gpt2", CAUSAL_LM)])
def test_a_uniform_member_is_a_plain_config_of_its_architecture(tmp_path, model_type, kind):
    """Every layer alike: no remote code where the architecture's own config says it (Llama's head_dim
    keeps heads apart from the hidden size; BERT and GPT-2 derive it, so only their FFN may shrink)."""
    model = model_of(model_type, kind)
    shape = model_shape(model.config)
    groups = list(range(shape.attention_units // 2)) if model_type == "llama" else list(range(shape.attention_units))
    plan = PruningPlan(shape, [LayerPlan(groups, list(range(0, shape.intermediate_size, 2)))] * shape.num_layers)
    folder = saved(tmp_path, model, plan, kind)
    config = json.loads((folder / "config.json").read_text())
    assert not (folder / MODELING_FILE).exists() and "auto_map" not in config
    batch = random_batch(model, batch=2, seq=9)
    result = auto_load(folder, kind, batch, tmp_path)
    assert result["class"] == type(model).__name__
    with torch.no_grad():
        out = load_pruned(folder)(**batch)
    expected = out.logits if hasattr(out, "logits") else out.last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(result["output"][keep], expected[keep], atol=1e-5, rtol=0)


def test_the_modeling_file_imports_only_torch_and_transformers():
    import ast

    from ziplm_planner import modeling_ziplm

    tree = ast.parse(open(modeling_ziplm.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert imported <= {"torch", "transformers", "__future__", "collections", "functools", "types"}
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))


@pytest.mark.parametrize("umask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_member_files_get_the_users_umask(tmp_path, umask, folder_mode, file_mode):
    import os
    import stat

    model = tiny_of_kind(EMBEDDING, "bert")
    previous = os.umask(umask)
    try:
        folder = saved(tmp_path, model, heterogeneous_plan(model_shape(model.config)), EMBEDDING)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == folder_mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {file_mode}


def test_bad_member_folders_are_refused_in_one_line(tmp_path):
    from ziplm_planner.errors import UserError

    model = tiny_of_kind(EMBEDDING, "bert")
    folder = saved(tmp_path, model, heterogeneous_plan(model_shape(model.config)), EMBEDDING)
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(UserError, match=r"is a family folder: give one of its members \(member\)"):
        load_pruned(tmp_path)
    from ziplm_planner.aliases import resolve_model

    with pytest.raises(UserError, match="is a pruned member: profile and compress its source model"):
        resolve_model(str(folder))  # where a model is expected: profile, compress, generate-text
    with pytest.raises(UserError, match="is a family folder: give a model"):
        resolve_model(str(tmp_path))
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 48  # edited by hand: the weights no longer fit
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="weights do not match|another model shape"):
        load_pruned(folder)
    config["model_type"] = "t5"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="t5"):
        load_pruned(folder)
