"""Kinds of model: each registered kind's pieces on a tiny random model of that kind."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ziplm_planner.backends import model_graph
from ziplm_planner.calibrate import CalibrationLoss
from ziplm_planner.data import read_dataset, sentences
from ziplm_planner.distill import distillation_terms
from ziplm_planner.errors import UserError
from ziplm_planner.fisher import fisher_targets
from ziplm_planner.kinds import (CAUSAL_LM, CLASSIFICATION, EMBEDDING, KINDS, causal_lm_loss, kind_named, kind_of,
                                 perplexity_window)
from ziplm_planner.settings import LossWeights, TrainSettings
from tiny_models import KIND_MODEL_TYPES, TINY_CONFIGS, minilm_tokenizer, random_batch, tiny_of_kind, write_sentences

EVERY_KIND = pytest.mark.parametrize("kind_name,model_type", KIND_MODEL_TYPES.items())


def test_every_registered_kind_has_a_tiny_model():
    assert {kind.name for kind in KINDS} == set(KIND_MODEL_TYPES)


def models(kind_name, model_type):
    """The kind, a tiny dense model of it, and another one (a student) of other weights."""
    kind = kind_named(kind_name)
    return kind, tiny_of_kind(kind, model_type), tiny_of_kind(kind, model_type, seed=1)


def labelled(model, batch):
    return {**batch, "labels": torch.arange(len(batch["input_ids"])) % model.config.num_labels}


@EVERY_KIND
def test_a_kind_is_told_by_its_head_and_found_by_its_name(kind_name, model_type):
    kind, model, _ = models(kind_name, model_type)
    assert kind_named(kind.name) is kind and kind.name == kind_name
    assert kind_of(type(model).__name__) is kind
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    assert kind_of(config) is kind


def test_a_config_of_several_heads_is_of_the_first_kind_and_gguf_configs_are_causal():
    bert, llama = TINY_CONFIGS["bert"](), TINY_CONFIGS["llama"]()
    bert.architectures = ["BertModel", "BertForSequenceClassification"]
    llama.architectures = ["LlamaForSequenceClassification", "LlamaForCausalLM"]
    assert kind_of(bert) is CLASSIFICATION and kind_of(llama) is CAUSAL_LM
    bert.architectures = llama.architectures = None  # as a GGUF file's config
    assert kind_of(bert) is EMBEDDING and kind_of(llama) is CAUSAL_LM
    assert kind_of("GPT2LMHeadModel") is CAUSAL_LM and kind_of("BertForMaskedLM") is EMBEDDING
    for name in ("translation", None, ["embedding"]):
        with pytest.raises(UserError, match="unknown model kind"):
            kind_named(name)


@EVERY_KIND
def test_the_deployed_output_is_what_the_graph_names(kind_name, model_type):
    kind, model, _ = models(kind_name, model_type)
    batch = random_batch(model)
    with torch.no_grad():
        output = kind.output(model, batch)
    assert output.dim() == len(kind.output_axes) + 1  # the dynamic axes, then labels, vocabulary or width
    graph = model_graph(model, kind, list(batch))
    assert graph.outputs[0] == kind.output_name
    assert graph.dynamic_axes[kind.output_name] == dict(enumerate(kind.output_axes))
    assert any(name.startswith("present.") for name in graph.outputs) == kind.generates


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    text = write_sentences(folder / "text.txt", count=60)
    glue = folder / "glue.tsv"
    lines = text.read_text().splitlines()[:20]
    glue.write_text("sentence\tlabel\n" + "".join(f"{line}\t{n % 3}\n" for n, line in enumerate(lines)))
    return {"text": read_dataset(text), "glue": read_dataset(glue)}


@EVERY_KIND
@pytest.mark.parametrize("data", ["text", "glue"])
def test_data_is_windows_of_running_text_or_one_sentence_a_sample(kind_name, model_type, data, data_files):
    kind, dataset, tokenizer = kind_named(kind_name), data_files[data], minilm_tokenizer()
    every = kind.tokenize(tokenizer, dataset, 16, None, 0)
    drawn = kind.tokenize(tokenizer, dataset, 16, 5, 0, held_out=3)
    assert drawn.input_ids.shape == (8, 16)
    assert torch.equal(drawn.input_ids[:5], kind.tokenize(tokenizer, dataset, 16, 5, 0).input_ids)
    if kind.generates:  # full windows of the joined text, no labels
        assert bool(every.attention_mask.all()) and every.labels is None
        return
    assert len(every.input_ids) == len(sentences(dataset))
    has_labels = kind is CLASSIFICATION and data == "glue"
    assert (every.labels is not None) == has_labels == (drawn.labels is not None)
    if has_labels:
        assert every.labels.tolist() == dataset.labels


@EVERY_KIND
def test_the_calibration_loss_is_the_models_own(kind_name, model_type):
    kind, dense, student = models(kind_name, model_type)
    batches = [random_batch(dense, seed=s) for s in (1, 2)]
    loss = CalibrationLoss(dense, kind, batches)
    if kind.generates:  # the LM loss over every real token of the batches
        with torch.no_grad():
            nll = [causal_lm_loss(dense(**b).logits, b["input_ids"], b["attention_mask"]) for b in batches]
        tokens = [int(b["attention_mask"][:, 1:].sum()) for b in batches]
        assert loss(dense) == pytest.approx(sum(float(n) * t for n, t in zip(nll, tokens)) / sum(tokens), rel=1e-5)
        return
    assert loss(dense) == pytest.approx(0.0, abs=1e-6) and loss(student) > 1e-3  # a distance to the dense model
    if kind is CLASSIFICATION:  # with labels, the task loss
        with_labels = [labelled(dense, b) for b in batches]
        with torch.no_grad():
            expected = torch.cat([F.cross_entropy(student(**b).logits, l["labels"], reduction="none")
                                  for b, l in zip(batches, with_labels)]).mean()
        assert CalibrationLoss(dense, kind, with_labels)(student) == pytest.approx(float(expected), rel=1e-5)


@EVERY_KIND
def test_fisher_losses_are_per_sample_and_targets_are_seeded(kind_name, model_type):
    kind, dense, student = models(kind_name, model_type)
    batch = random_batch(dense)
    targets = fisher_targets(dense, kind, [batch], seed=3)
    assert len(targets) == 1
    if kind.generates:  # the text's own next tokens
        assert targets == [None]
    else:
        assert torch.equal(targets[0], fisher_targets(dense, kind, [batch], seed=3)[0])
        assert len(targets[0]) == len(batch["input_ids"])
    target = targets[0]
    with torch.no_grad():
        losses = kind.fisher_losses(student, batch, target)
        alone = [kind.fisher_losses(student, {k: v[s:s + 1] for k, v in batch.items()},
                                    None if target is None else target[s:s + 1])[0] for s in range(len(losses))]
    assert losses.shape == (len(batch["input_ids"]),) and bool((losses >= 0).all())
    torch.testing.assert_close(losses, torch.stack(alone), rtol=1e-4, atol=1e-5)
    if kind is CLASSIFICATION:  # data with labels: the labels
        with_labels = labelled(dense, batch)
        assert torch.equal(fisher_targets(dense, kind, [with_labels], seed=3)[0], with_labels["labels"])


@EVERY_KIND
def test_distillation_has_an_output_term_and_a_task_term_where_there_is_a_task(kind_name, model_type):
    kind, teacher, student = models(kind_name, model_type)
    batch = random_batch(teacher)
    if kind is CLASSIFICATION:
        batch = labelled(teacher, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        same = kind.distillation(teacher(**inputs, output_hidden_states=True),
                                 copy.deepcopy(teacher)(**inputs, output_hidden_states=True), batch, 2.0)
        other = distillation_terms(kind, student(**inputs, output_hidden_states=True),
                                   teacher(**inputs, output_hidden_states=True), batch, LossWeights(squarehead=1.0, contrastive=0.0))
    assert set(same) == ({"kl"} if kind is EMBEDDING else {"kl", "task"})
    assert float(same["kl"]) == pytest.approx(0.0, abs=1e-5) and float(other["kl"]) > 1e-4
    assert list(other) == ["squarehead", *same, "loss"]


@EVERY_KIND
def test_fidelity_pools_one_vector_a_text_or_a_token(kind_name, model_type):
    kind, model, _ = models(kind_name, model_type)
    batch = random_batch(model)
    with torch.no_grad():
        pooled = kind.fidelity_pool(kind.output(model, batch), batch["attention_mask"])
    rows = int(batch["attention_mask"].sum()) if kind.fidelity_per_token else len(batch["input_ids"])
    assert pooled.dim() == 2 and len(pooled) == rows


@EVERY_KIND
def test_training_defaults_are_the_kinds(kind_name, model_type):
    kind, model, _ = models(kind_name, model_type)
    train = TrainSettings().for_kind(kind)
    assert (train.batch_size, train.weights.squarehead, train.weights.contrastive) == \
        (kind.defaults.batch_size, kind.defaults.squarehead, kind.defaults.contrastive)
    window = perplexity_window(model.config)  # 80: the tiny model's positions
    assert kind.training_length(model.config, 16) == (window if kind.generates else 16)
