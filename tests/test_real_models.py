"""Real models from PyPI packages (MiniLM, SmolLM2-135M): surgery is exact on them too."""

import copy
import random

import pytest
import torch

from ziplm_planner.adapters import model_shape
from ziplm_planner.kinds import CAUSAL_LM, EMBEDDING
from ziplm_planner.models import load_model
from ziplm_planner.surgery import LayerPlan, PruningPlan, apply_plan, count_parameters
from test_surgery import outputs, random_plan, zero_removed

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def sentences(loaded, texts=("A man is playing a guitar.", "The quick brown fox jumps over the lazy dog again.")):
    return dict(loaded.tokenizer(list(texts), padding=True, return_tensors="pt"))


def test_minilm_loads_as_an_embedding_model(minilm):
    shape = model_shape(minilm.model.config)
    assert minilm.kind == EMBEDDING
    assert (shape.num_layers, shape.attention_units, shape.q_per_unit, shape.intermediate_size) == (6, 12, 1, 1536)


def test_smollm2_loads_as_a_gqa_causal_lm(smollm2):
    shape = model_shape(smollm2.model.config)
    assert smollm2.kind == CAUSAL_LM
    assert (shape.num_layers, shape.attention_units, shape.q_per_unit, shape.intermediate_size) == (30, 3, 3, 1536)


@pytest.mark.parametrize("fixture", ["minilm", "smollm2"])
def test_surgery_on_real_model_equals_masked_dense(fixture, request):
    loaded = request.getfixturevalue(fixture)
    shape = loaded.shape
    plan = random_plan(shape, random.Random(0), allow_empty=loaded.kind == CAUSAL_LM)  # SmolLM2: query heads too
    # float64: in float32, 30 layers of different reduction orders leave ~1e-3 of round-off in the logits
    pruned = apply_plan(copy.deepcopy(loaded.model).double(), plan)
    masked = zero_removed(copy.deepcopy(loaded.model).double(), plan)
    batch = sentences(loaded)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs(pruned, batch)[keep], outputs(masked, batch)[keep], rtol=1e-5, atol=1e-5)
    assert count_parameters(pruned) < count_parameters(loaded.model)


def test_compress_the_real_minilm_with_the_shipped_table(minilm, tmp_path):
    """Independent of this machine's load: no re-plan, so the member is the plan the shipped table gives;
    its measurement is checked for being made and judged, never for the speedup it found."""
    import json
    from pathlib import Path

    from ziplm_planner.api import compress
    from ziplm_planner.calibrate import CalibrationLoss, load_calibration
    from ziplm_planner.evaluate import evaluate_family
    from ziplm_planner.export import load_pruned
    from ziplm_planner.demo import write_demo_texts
    from ziplm_planner.settings import CompressSettings
    from ziplm_planner.table import LatencyTable
    from ziplm_planner.verify import Measurement, verdict

    calibration, heldout = write_demo_texts(tmp_path)
    table = LatencyTable.load(Path(__file__).parents[1] / "profiles" / "minilm-cpu2-onnxruntime-b8s128.json")
    settings = CompressSettings(num_samples=64, search_evaluations=4, score_samples=32, max_replans=0, onnx=False,
                                cache_dir=tmp_path / "cache")
    report = compress(minilm, table, [2.0], calibration, tmp_path / "family", settings=settings)
    dense, row = report.rows
    assert row["replans"] == 0 and row["predicted_speedup"] >= 2.0 * 0.999 and row["parameters"] < dense["parameters"]
    record = json.loads((tmp_path / "family" / "x2" / "measurement.json").read_text())
    timing = Measurement.from_dict(record["timing"], row["timed_file"])
    assert timing.member.median_ms > 0 and timing.dense.median_ms > 0 and 0 < timing.interval[0] <= timing.interval[1]
    assert row["measured_speedup"] == round(timing.speedup, 4) and row["status"] == verdict(timing.speedup, 2.0)
    assert row["met_target"] == (row["status"] == "met") and (row["met_target"] or timing.remeasured)  # misses confirmed
    scores = evaluate_family(tmp_path / "family", "fidelity", str(heldout))
    assert scores["dense"] > 0.999 and 0.5 < scores["x2"] < scores["dense"]
    batches = load_calibration(minilm, str(calibration), table.spec.calibration_length, 64).batches(32)
    reloaded = CalibrationLoss(minilm.model, minilm.kind, batches)(load_pruned(tmp_path / "family" / "x2"))
    assert reloaded == pytest.approx(row["calibration_loss"], rel=1e-5)  # the saved member is the one scored


def test_a_pruned_smollm2_generates_the_same_tokens_in_onnx_runtime_as_in_torch(smollm2, tmp_path):
    """The member's model.onnx with its KV cache: greedy, 32 tokens, a left-padded batch; KV groups, query
    heads inside them and neurons removed at random."""
    from ziplm_planner.export import ort_generate, save_member

    shape = model_shape(smollm2.model.config)
    rng = random.Random(1)

    def layer():
        per_group = rng.randint(1, shape.q_per_unit)
        heads = [g * shape.q_per_unit + i for g in rng.sample(range(shape.attention_units), rng.randint(0, 3))
                 for i in rng.sample(range(shape.q_per_unit), per_group)]
        return LayerPlan.of_heads(shape, heads, rng.sample(range(shape.intermediate_size), 1024))
    plan = PruningPlan(shape, [layer() for _ in range(shape.num_layers)])
    pruned = apply_plan(copy.deepcopy(smollm2.model), plan)
    save_member(tmp_path / "member", pruned, smollm2.tokenizer, plan, CAUSAL_LM, {})
    tokenizer = copy.deepcopy(smollm2.tokenizer)
    tokenizer.padding_side = "left"
    batch = tokenizer(["The history of the city begins", "Rain"], padding=True, return_tensors="pt")
    eos = pruned.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        expected = pruned.generate(**batch, do_sample=False, max_new_tokens=32, eos_token_id=eos, pad_token_id=pad)
    found = ort_generate(tmp_path / "member", batch["input_ids"], batch["attention_mask"], max_new_tokens=32,
                         eos_token_id=eos, pad_token_id=pad)
    assert found.tolist() == expected.tolist()


STS_DEV = "../shared/data/stsb/sts-dev.csv"


def test_a_pruned_minilm_member_is_a_sentence_transformers_model(minilm, tmp_path):
    """Its modules (pooling, Normalize) kept, loaded by sentence-transformers alone: its own STS-B
    evaluator gives the project's figure."""
    import sys
    from pathlib import Path

    from ziplm_planner.evaluate import stsb_spearman
    from ziplm_planner.export import load_pruned, save_member
    from test_portable import heterogeneous_plan

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from bench_portable import sentence_transformers_score  # the benchmark's own run, in a process of its own

    data = str(Path(__file__).parents[1] / STS_DEV)
    plan = heterogeneous_plan(minilm.shape)
    pruned = apply_plan(copy.deepcopy(minilm.model), plan)
    save_member(tmp_path / "member", pruned, minilm.tokenizer, plan, EMBEDDING, {}, onnx=False, source=minilm.source.folder)
    theirs = sentence_transformers_score(tmp_path / "member", data)
    ours = stsb_spearman(load_pruned(tmp_path / "member"), minilm.tokenizer, data) / 100
    assert abs(theirs["spearman"] - ours) <= 0.01 and theirs["norm"] == pytest.approx(1.0, abs=1e-4)
    assert theirs["class"] == "PrunedBertModel"


def test_a_pruned_smollm2_member_generates_with_transformers_alone(smollm2, tmp_path):
    """AutoModelForCausalLM(trust_remote_code=True) in a process without ziplm_planner: greedy tokens
    through the KV cache equal load_pruned's; layers keep different heads, some none."""
    import subprocess
    import sys

    from ziplm_planner.export import load_pruned, save_member
    from test_portable import heterogeneous_plan

    plan = heterogeneous_plan(smollm2.shape, query_heads=True)
    pruned = apply_plan(copy.deepcopy(smollm2.model), plan)
    save_member(tmp_path / "member", pruned, smollm2.tokenizer, plan, CAUSAL_LM, {}, onnx=False)
    script = ("import sys, torch, transformers\n"
              "folder = sys.argv[1]\n"
              "tok = transformers.AutoTokenizer.from_pretrained(folder)\n"
              "model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()\n"
              "assert 'ziplm_planner' not in sys.modules\n"
              "ids = tok(['The history of the city begins'], return_tensors='pt')\n"
              "print(model.generate(**ids, do_sample=False, max_new_tokens=24)[0].tolist())\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "member")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    batch = smollm2.tokenizer(["The history of the city begins"], return_tensors="pt")
    with torch.no_grad():
        expected = load_pruned(tmp_path / "member").generate(**batch, do_sample=False, max_new_tokens=24)
    assert done.stdout.strip().splitlines()[-1] == str(expected[0].tolist())


def test_a_pruned_smollm2_in_llama_cpp_tokenizes_scores_and_generates_as_in_torch(smollm2, tmp_path):
    """Written as `deci` with the source GGUF's tokenizer and run by llama.cpp: the same token ids as the
    Hugging Face tokenizer, logits as torch's, the same 24 greedy tokens."""
    from pathlib import Path

    llama_cpp = pytest.importorskip("llama_cpp")
    from ziplm_planner.gguf_export import vocabulary_for, write_gguf
    from test_gguf import greedy_llama_cpp, llama_cpp_logits
    from test_portable import heterogeneous_plan

    plan = heterogeneous_plan(smollm2.shape, query_heads=True)
    pruned = apply_plan(copy.deepcopy(smollm2.model), plan)
    path = write_gguf(pruned, tmp_path / "model.gguf", vocabulary_for(smollm2.source, tmp_path), "f32")
    text = "The history of the city begins in the year"
    ids = smollm2.tokenizer(text)["input_ids"]
    vocab_only = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert vocab_only.tokenize(text.encode(), add_bos=False) == ids
    with torch.no_grad():
        expected = pruned(torch.tensor([ids])).logits[0]
    found = llama_cpp_logits(path, ids)
    assert (found - expected).abs().max() <= 1e-3 * expected.abs().max()
    with torch.no_grad():
        ours = pruned.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
    assert greedy_llama_cpp(path, ids, 24) == ours[0].tolist()
