"""Distillation loss terms: closed forms, padding never counts, identical models lose nothing."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ziplm_planner.settings import LossWeights, TrainSettings
from ziplm_planner.distill import RepresentationMemory, contrastive, distillation_terms, info_nce, squarehead
from ziplm_planner.kinds import CAUSAL_LM, EMBEDDING, causal_lm_loss, embedding_distance, kind_named, kl_divergence
from tiny_models import KIND_MODEL_TYPES, random_batch, tiny_model, tiny_of_kind


def padded_pair(seed=0, layers=3):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(2, 5, 4, generator=g) for _ in range(layers)]
    teacher = [torch.randn(2, 5, 4, generator=g) * (i + 1) for i in range(layers)]
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    return student, teacher, mask


def test_squarehead_is_the_sum_of_normalised_layer_errors_over_real_tokens():
    student, teacher, mask = padded_pair()
    expected = 0.0
    for s, t in zip(student, teacher):
        real_s = torch.cat([s[0], s[1, :3]])  # (tokens, hidden) without padding
        real_t = torch.cat([t[0], t[1, :3]])
        expected += float(((real_s - real_t) ** 2).mean() / (real_t ** 2).mean())
    assert float(squarehead(student, teacher, mask)) == pytest.approx(expected, rel=1e-6)


def test_squarehead_ignores_padding_and_the_scale_of_a_layer():
    student, teacher, mask = padded_pair()
    value = squarehead(student, teacher, mask)
    noisy = [s.clone() for s in student]
    for s in noisy:
        s[1, 3:] = 1e6  # padding positions: anything
    torch.testing.assert_close(squarehead(noisy, teacher, mask), value)
    scaled = squarehead([10 * s for s in student], [10 * t for t in teacher], mask)
    torch.testing.assert_close(scaled, value)
    assert float(squarehead(teacher, teacher, mask)) == 0.0


def test_kl_is_zero_for_equal_logits_and_matches_kl_div():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    assert float(kl_divergence(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-7)
    expected = 4.0 * F.kl_div(F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True,
                              reduction="batchmean")
    torch.testing.assert_close(kl_divergence(student, teacher, 2.0), expected)


def test_token_kl_skips_padding():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 2:] = 0
    value = kl_divergence(student, teacher, 1.0, mask)
    student[0, 2:] = 50.0
    torch.testing.assert_close(kl_divergence(student, teacher, 1.0, mask), value)


def test_embedding_distance_is_pooled_cosine_distance():
    student, teacher, mask = padded_pair(layers=1)
    assert float(embedding_distance(teacher[0], teacher[0], mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(embedding_distance(3 * teacher[0], teacher[0], mask)) == pytest.approx(0.0, abs=1e-6)
    assert 0 < float(embedding_distance(student[0], teacher[0], mask)) < 2


def test_causal_lm_loss_is_the_models_own_loss_on_real_tokens():
    model = tiny_model("llama", causal_lm=True)
    batch = random_batch(model, pad_last=0)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(causal_lm_loss(out.logits, batch["input_ids"], batch["attention_mask"]), out.loss)


@pytest.mark.parametrize("kind_name,model_type", KIND_MODEL_TYPES.items())
def test_a_student_equal_to_its_teacher_loses_only_the_task_loss(kind_name, model_type):
    kind = kind_named(kind_name)
    teacher = tiny_of_kind(kind, model_type)
    student = copy.deepcopy(teacher)
    batch = random_batch(teacher)
    with torch.no_grad():
        terms = distillation_terms(kind, student(**batch, output_hidden_states=True),
                                   teacher(**batch, output_hidden_states=True), batch, LossWeights(squarehead=1.0, contrastive=0.0))
    assert float(terms["squarehead"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["kl"]) == pytest.approx(0.0, abs=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(terms.get("task", 0.0)), abs=1e-5)


@pytest.mark.parametrize("model_type,kind,weight", [("llama", CAUSAL_LM, 0.0), ("bert", EMBEDDING, 1.0)])
def test_squarehead_is_logged_for_every_model_and_trained_on_only_with_a_weight(model_type, kind, weight):
    teacher, student = tiny_of_kind(kind, model_type), tiny_of_kind(kind, model_type, seed=1)
    batch = random_batch(teacher)
    with torch.no_grad():
        teacher_out = teacher(**batch, output_hidden_states=True)
    # default weights: SquareHead off for causal LMs, on for the rest (CAP's term, needing its state, off here)
    weights = TrainSettings(weights=LossWeights(contrastive=0.0)).for_kind(kind).weights
    terms = distillation_terms(kind, student(**batch, output_hidden_states=True), teacher_out, batch, weights)
    assert float(terms["squarehead"].detach()) > 0
    assert terms["squarehead"].requires_grad == (weight > 0)
    expected = sum(value for name, value in terms.items() if name != "loss" and (name != "squarehead" or weight))
    torch.testing.assert_close(terms["loss"], expected)


# --- CAP's contrastive term --------------------------------------------------------------------


def brute_force_info_nce(anchors, keys, positive, temperature):
    """The supervised-contrastive loss written out, anchor by anchor and positive by positive."""
    total = 0.0
    for i in range(len(anchors)):
        scores = [float(anchors[i] @ k) / temperature for k in keys]
        log_norm = torch.logsumexp(torch.tensor(scores), 0).item()
        positives = [j for j in range(len(keys)) if positive[i, j]]
        total += sum(log_norm - scores[j] for j in positives) / len(positives)
    return total / len(anchors)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_is_the_mean_over_anchors_and_their_positives():
    anchors, keys = unit(4, 6), unit(7, 6, seed=1)
    positive = torch.rand(4, 7, generator=torch.Generator().manual_seed(2)) < 0.4
    positive[:, 0] = True  # at least one each
    assert float(info_nce(anchors, keys, positive, 0.2)) == pytest.approx(
        brute_force_info_nce(anchors, keys, positive, 0.2), rel=1e-5)


def test_contrastive_takes_the_same_example_as_positive_and_the_rest_and_the_memory_as_negatives():
    student, teacher, memory = unit(3, 8), unit(3, 8, seed=1), unit(5, 8, seed=2)
    keys = torch.cat([teacher, memory])
    positive = torch.cat([torch.eye(3, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    assert float(contrastive(student, [teacher], [memory], 0.1)) == pytest.approx(
        brute_force_info_nce(student, keys, positive, 0.1), rel=1e-5)
    # a student that is its teacher is nearer it than anything else: more memory only adds negatives
    alone = float(contrastive(teacher, [teacher], [memory[:0]], 0.1))
    assert alone < float(contrastive(student, [teacher], [memory[:0]], 0.1))
    assert alone <= float(contrastive(teacher, [teacher], [memory], 0.1))


def test_with_labels_every_key_of_the_same_class_is_a_positive_and_teachers_are_averaged():
    student, first, second, memory = unit(4, 8), unit(4, 8, seed=1), unit(4, 8, seed=2), unit(2, 8, seed=3)
    labels, memory_labels = torch.tensor([0, 1, 0, 2]), torch.tensor([1, -1])
    keys = torch.cat([first, memory])
    positive = (labels[:, None] == torch.cat([labels, memory_labels])[None, :])
    expected = brute_force_info_nce(student, keys, positive, 0.5)
    assert float(contrastive(student, [first], [memory], 0.5, labels, [memory_labels])) == pytest.approx(expected, rel=1e-5)
    both = contrastive(student, [first, second], [memory, memory[:0]], 0.5, labels, [memory_labels, memory_labels[:0]])
    other = contrastive(student, [second], [memory[:0]], 0.5, labels, [memory_labels[:0]])
    assert float(both) == pytest.approx((expected + float(other)) / 2, rel=1e-5)


def test_only_the_student_gets_a_gradient_from_the_contrastive_term():
    student, teacher = unit(3, 8).requires_grad_(True), unit(3, 8, seed=1).requires_grad_(True)
    contrastive(student, [teacher.detach()], [teacher[:0].detach()], 0.1).backward()
    assert student.grad is not None and teacher.grad is None


def test_the_memory_keeps_the_newest_representations_and_their_labels():
    memory = RepresentationMemory(size=5)
    vectors, labels = memory.keys(torch.zeros(2, 3))
    assert vectors.shape == (0, 3) and labels.shape == (0,)
    memory.push(torch.ones(4, 3), torch.tensor([0, 1, 2, 3]))
    memory.push(2 * torch.ones(3, 3), None)
    vectors, labels = memory.keys(torch.zeros(2, 3))
    assert vectors[:, 0].tolist() == [1, 1, 2, 2, 2] and labels.tolist() == [2, 3, -1, -1, -1]
    nothing = RepresentationMemory(size=0)
    nothing.push(torch.ones(4, 3), None)
    assert nothing.keys(torch.zeros(2, 3))[0].shape == (0, 3)


@pytest.mark.parametrize("kind_name", ["embedding", "classification", "causal-lm"])
def test_the_contrastive_term_is_computed_where_its_weight_is_set(kind_name):
    """Off by default; on, it is logged and weighted into the loss, for every kind's representation."""
    from ziplm_planner.settings import ContrastiveSettings
    from ziplm_planner.train import Contrast

    kind = kind_named(kind_name)
    student, teacher = tiny_of_kind(kind, KIND_MODEL_TYPES[kind_name]), tiny_of_kind(kind, KIND_MODEL_TYPES[kind_name], 1)
    batch = random_batch(teacher)
    if kind_name == "classification":
        batch["labels"] = torch.tensor([0, 1, 0])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        student_out, teacher_out = student(**inputs, output_hidden_states=True), teacher(**inputs, output_hidden_states=True)
    weights = TrainSettings(weights=LossWeights(contrastive=0.0)).for_kind(kind).weights
    assert "contrastive" not in distillation_terms(kind, student_out, teacher_out, batch, weights)
    contrast = Contrast(kind, ContrastiveSettings(teachers=("dense", "snapshots"), memory=4), [copy.deepcopy(student)], "cpu")
    on = dataclasses.replace(weights, contrastive=0.5)
    terms = distillation_terms(kind, student_out, teacher_out, batch, on, contrast)
    assert float(terms["contrastive"]) > 0
    without = sum(getattr(weights, name) * value for name, value in terms.items() if name not in ("loss", "contrastive"))
    assert float(terms["loss"]) == pytest.approx(float(without + 0.5 * terms["contrastive"]), rel=1e-5)
    assert [len(memory.keys(torch.zeros(1, 1))[0]) for memory in contrast.memories] == [3, 3]  # dense, snapshot
