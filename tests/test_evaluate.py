"""evaluate: scores of every family member, torch and ONNX alike, written into the report all at once."""

import copy
import json
import math
import random
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import BertForSequenceClassification

from ziplm_planner import evaluate, export
from ziplm_planner.family import FamilyReport
from ziplm_planner.family import member_name
from ziplm_planner.errors import UserError
from ziplm_planner.evaluate import TASKS, evaluate_family, perplexity, stsb_spearman
from ziplm_planner.export import load_pruned, load_pruned_tokenizer, save_member
from ziplm_planner.kinds import CAUSAL_LM, CLASSIFICATION, EMBEDDING, ModelKind
from ziplm_planner.surgery import LayerPlan, PruningPlan, apply_plan, count_parameters
from tiny_models import minilm_tokenizer, tiny_loaded_with_tokenizer, write_sentences

WORDS = ("the a cat dog runs sleeps over under quickly slowly red blue house river tree man woman child "
         "plays sings reads writes big small old new").split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))


def write_stsb(path: Path, count: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{rng.uniform(0, 5):.3f}\t"
                            f"{sentence(rng)}\t{sentence(rng)}\n" for i in range(count)))
    return path


def write_glue(path: Path, labels: list[int], seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("sentence\tlabel\n" + "".join(f"{sentence(rng)}\t{label}\n" for label in labels))
    return path


def spread(model):
    """Weights far from the small default init, so that pruning changes the outputs measurably."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def build_family(root: Path, model, tokenizer, kind: ModelKind, plans: dict[float, PruningPlan]) -> Path:
    """Member folders by save_member, and a report.json / report.csv as compress writes them."""
    rows = []
    for target, plan in plans.items():
        member = apply_plan(copy.deepcopy(model), plan)
        save_member(root / member_name(target), member, tokenizer, plan, kind, {"target": target})
        counts = plan.kept_counts()
        rows.append({"target": target, "folder": member_name(target), "met_target": True, "predicted_ms": 1.0 / target,
                     "measured_speedup": target, "parameters": count_parameters(member), "replans": 0,
                     "kept_attention": [a.query_heads for a, _ in counts], "kept_ffn": [f for _, f in counts]})
    FamilyReport(rows, {"model": "tiny", "model_kind": kind.name}).save(root)
    return root


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Pristine tiny families (embedding BERT, classifier BERT, causal Llama) and data files; copy before writing."""
    root = tmp_path_factory.mktemp("families")
    data = root / "data"
    data.mkdir()
    bert = tiny_loaded_with_tokenizer("bert")
    spread(bert.model)
    shape = bert.shape  # 2 layers, 4 heads, FFN 48
    build_family(root / "bert", bert.model, bert.tokenizer, EMBEDDING, {
        1.0: PruningPlan.dense(shape),
        1.5: PruningPlan(shape, [LayerPlan([0, 1, 2], list(range(32))), LayerPlan([1, 2, 3], list(range(8, 48)))]),
        2.0: PruningPlan(shape, [LayerPlan([0, 2], list(range(0, 48, 2))), LayerPlan([], list(range(16)))]),
    })

    tokenizer = minilm_tokenizer()
    torch.manual_seed(1)
    config = copy.deepcopy(bert.model.config)
    config.num_labels = 3
    classifier = spread(BertForSequenceClassification(config).eval())
    glue = write_glue(data / "glue.tsv", [random.Random(2).randrange(3) for _ in range(30)])
    texts = [line.split("\t")[0] for line in glue.read_text().splitlines()[1:]]
    with torch.no_grad():  # centre the logits on the data, so that the predictions are not all one class
        classifier.classifier.bias -= classifier(**tokenizer(texts, padding=True, return_tensors="pt")).logits.mean(0)
    build_family(root / "classifier", classifier, tokenizer, CLASSIFICATION, {
        1.0: PruningPlan.dense(shape),
        2.0: PruningPlan(shape, [LayerPlan([1, 3], list(range(24))), LayerPlan([0, 2], list(range(24, 48)))]),
    })

    llama = tiny_loaded_with_tokenizer("llama", causal_lm=True)
    shape = llama.shape  # 2 layers, 2 KV groups, FFN 48
    build_family(root / "llama", llama.model, llama.tokenizer, CAUSAL_LM, {
        1.0: PruningPlan.dense(shape),
        2.0: PruningPlan(shape, [LayerPlan([0], list(range(24))), LayerPlan([1], list(range(24, 48)))]),
    })

    write_stsb(data / "sts.csv")
    write_sentences(data / "text.txt", count=120)
    return root


def family(families: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(families / name, tmp_path / name))


def data(families: Path, name: str) -> str:
    return str(families / "data" / name)


def test_stsb_scores_every_member_into_both_reports(families, tmp_path):
    folder = family(families, "bert", tmp_path)
    scores = evaluate_family(folder, "stsb", data(families, "sts.csv"))
    assert set(scores) == {"dense", "x1.5", "x2"} and all(math.isfinite(v) for v in scores.values())

    dense = folder / "dense"
    direct = stsb_spearman(load_pruned(dense), load_pruned_tokenizer(dense), data(families, "sts.csv"))
    assert scores["dense"] == pytest.approx(direct, abs=1e-9)

    report = json.loads((folder / "report.json").read_text())
    assert {row["folder"]: row["scores"]["stsb"] for row in report["members"]} == scores
    assert report["metadata"]["scores_meta"]["stsb"] == {
        "higher_is_better": True, "label": "STS-B Spearman x100", "task": "stsb",
        "data": data(families, "sts.csv"), "backend": "torch"}
    assert report["metadata"]["model"] == "tiny" and report["members"][2]["kept_attention"] == [2, 0]
    csv = pd.read_csv(folder / "report.csv")
    assert dict(zip(csv["folder"], csv["score_stsb"])) == pytest.approx(scores)
    assert list(csv["kept_ffn"]) == ["48 48", "32 40", "24 16"]  # lists as compress writes them

    # a second task adds its scores next to the first's
    fidelity = evaluate_family(folder, "fidelity", data(families, "sts.csv"))
    assert fidelity["dense"] == pytest.approx(1.0, abs=1e-6)
    assert all(0 < fidelity[name] < 1 - 1e-4 for name in ("x1.5", "x2"))
    report = json.loads((folder / "report.json").read_text())
    assert all(set(row["scores"]) == {"stsb", "fidelity"} for row in report["members"])
    assert report["metadata"]["scores_meta"]["fidelity"]["higher_is_better"] is True
    assert {"score_stsb", "score_fidelity"} <= set(pd.read_csv(folder / "report.csv").columns)


@pytest.mark.parametrize("name, task, file", [
    ("bert", "stsb", "sts.csv"),
    ("bert", "fidelity", "text.txt"),
    ("classifier", "classification", "glue.tsv"),
    ("llama", "perplexity", "text.txt"),
    ("llama", "fidelity", "text.txt"),
])
def test_torch_and_onnx_backends_give_the_same_scores(families, tmp_path, name, task, file):
    folder = family(families, name, tmp_path)
    on_torch = evaluate_family(folder, task, data(families, file), backend="torch", max_tokens=600)
    on_onnx = evaluate_family(folder, task, data(families, file), backend="onnxruntime", max_tokens=600)
    assert set(on_onnx) == set(on_torch)
    for member, value in on_torch.items():
        assert on_onnx[member] == pytest.approx(value, rel=1e-3), member
    meta = json.loads((folder / "report.json").read_text())["metadata"]["scores_meta"][task]
    assert meta["backend"] == "onnxruntime" and meta["higher_is_better"] is TASKS[task].higher_is_better


def test_a_failure_midway_leaves_the_report_as_it_was(families, tmp_path, monkeypatch):
    folder = family(families, "bert", tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    real = export.load_pruned  # the torch backend loads each member with it

    def failing(path):
        if Path(path).name == "x2":  # the last member
            raise RuntimeError("scoring failed")
        return real(path)

    monkeypatch.setattr(export, "load_pruned", failing)
    with pytest.raises(RuntimeError, match="scoring failed"):
        evaluate_family(folder, "stsb", data(families, "sts.csv"))
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_perplexity_of_a_tiny_causal_lm(families, tmp_path):
    folder = family(families, "llama", tmp_path)
    scores = evaluate_family(folder, "perplexity", data(families, "text.txt"))
    assert all(math.isfinite(v) and v > 1 for v in scores.values())
    dense = folder / "dense"  # windows of the tiny model's 80 positions
    direct = perplexity(load_pruned(dense), load_pruned_tokenizer(dense), data(families, "text.txt"), seq_len=80)
    assert scores["dense"] == pytest.approx(direct, rel=1e-6)
    meta = json.loads((folder / "report.json").read_text())["metadata"]["scores_meta"]["perplexity"]
    assert meta["higher_is_better"] is False


def test_classification_accuracy_and_f1_match_a_hand_computation(families, tmp_path):
    folder = family(families, "classifier", tmp_path)
    scores = evaluate_family(folder, "classification", data(families, "glue.tsv"))

    rows = {r["folder"]: r for r in json.loads((folder / "report.json").read_text())["members"]}
    lines = Path(data(families, "glue.tsv")).read_text().splitlines()[1:]
    gold = [int(line.split("\t")[1]) for line in lines]
    for name in ("dense", "x2"):
        model, tokenizer = load_pruned(folder / name), load_pruned_tokenizer(folder / name)
        with torch.no_grad():  # one sentence at a time, no padding
            predicted = [int(model(**tokenizer(line.split("\t")[0], return_tensors="pt")).logits.argmax())
                         for line in lines]
        assert 1 < len(set(predicted)) and 0 < sum(g == p for g, p in zip(gold, predicted)) < len(gold)
        accuracy = 100 * sum(g == p for g, p in zip(gold, predicted)) / len(gold)
        f1 = []
        for c in sorted(set(gold) | set(predicted)):
            tp = sum(g == c and p == c for g, p in zip(gold, predicted))
            precision = tp / max(1, sum(p == c for p in predicted))
            recall = tp / max(1, sum(g == c for g in gold))
            f1.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
        assert scores[name] == pytest.approx(accuracy, abs=1e-9)
        assert rows[name]["scores"] == {"classification": pytest.approx(accuracy),
                                        "f1": pytest.approx(100 * sum(f1) / len(f1))}
    assert "score_f1" in pd.read_csv(folder / "report.csv").columns


def _remove(*parts):
    def edit(folder: Path) -> None:
        folder.joinpath(*parts).unlink()
    return edit


def _bad_stsb(tmp_path: Path) -> str:
    path = write_stsb(tmp_path / "bad.csv", count=5)
    lines = path.read_text().splitlines()
    fields = lines[2].split("\t")
    fields[4] = "high"
    lines[2] = "\t".join(fields)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


BAD_INPUTS = {
    "unknown task": ("bert", "bleu", "sts.csv", {}, None,
                     "unknown task 'bleu': use one of stsb, classification, perplexity, fidelity"),
    "unknown backend": ("bert", "stsb", "sts.csv", {"backend": "tensorrt"}, None, "unknown backend 'tensorrt'"),
    "stsb without pairs": ("bert", "stsb", "glue.tsv", {}, None, "glue.tsv has no scored sentence pairs"),
    "stsb parse error": ("bert", "stsb", _bad_stsb, {}, None, "bad.csv line 3: score 'high'"),
    "classification without labels": ("classifier", "classification", "text.txt", {}, None, "text.txt has no labels"),
    "classification on scores": ("classifier", "classification", "sts.csv", {}, None,
                                 "sts.csv has scores, not class labels"),
    "perplexity on a TSV": ("llama", "perplexity", "sts.csv", {}, None, "perplexity needs running text"),
    "missing data file": ("bert", "stsb", "nope.csv", {}, None, "data file"),
    "no report": ("bert", "stsb", "sts.csv", {}, _remove("report.json"),
                  "has no report.json: run `ziplm-planner compress` first"),
    "incomplete member": ("bert", "stsb", "sts.csv", {}, _remove("x2", "model.safetensors"),
                          "member x2 is incomplete: model.safetensors missing"),
    "no onnx file": ("bert", "stsb", "sts.csv", {"backend": "onnxruntime"}, _remove("x1.5", "model.onnx"),
                     "member x1.5 is incomplete: model.onnx missing"),
    "perplexity on an encoder": ("bert", "perplexity", "text.txt", {}, None,
                                 "task perplexity needs a causal LM (a language-modelling head), and"),
    "classification without a head": ("bert", "classification", "glue.tsv", {}, None,
                                      "task classification needs a sequence-classification model"),
    "stsb on a causal LM": ("llama", "stsb", "sts.csv", {}, None, "holds a causal LM: use perplexity or fidelity"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_leaves_the_report(families, tmp_path, case):
    name, task, file, kwargs, edit, message = BAD_INPUTS[case]
    folder = family(families, name, tmp_path)
    if edit is not None:
        edit(folder)
    path = file(tmp_path) if callable(file) else str(families / "data" / file)
    report = (folder / "report.json").read_bytes() if (folder / "report.json").exists() else None
    with pytest.raises(UserError, match=re.escape(message)) as err:
        evaluate_family(folder, task, path, **kwargs)
    assert "\n" not in str(err.value)
    if report is not None:
        assert (folder / "report.json").read_bytes() == report


def test_label_outside_the_models_classes_is_refused(families, tmp_path):
    folder = family(families, "classifier", tmp_path)
    path = write_glue(tmp_path / "five.tsv", [0, 1, 5])
    with pytest.raises(UserError, match="has label 5, but the model has 3 classes"):
        evaluate_family(folder, "classification", str(path))


def test_macro_f1_on_a_known_case():
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 1, fp 1, fn 1 -> 0.5; class 2: tp 1 -> 1.0
    assert evaluate.macro_f1([0, 0, 1, 1, 2], [0, 1, 1, 0, 2]) == pytest.approx(2 / 3)
