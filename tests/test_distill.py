"""Distillation loss terms: closed forms, padding never counts, identical models lose nothing."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ziplm_planner.settings import LossWeights, TrainSettings
from ziplm_planner.distill import distillation_terms, squarehead
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
                                   teacher(**batch, output_hidden_states=True), batch, LossWeights(squarehead=1.0))
    assert float(terms["squarehead"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["kl"]) == pytest.approx(0.0, abs=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(terms.get("task", 0.0)), abs=1e-5)


@pytest.mark.parametrize("model_type,kind,weight", [("llama", CAUSAL_LM, 0.0), ("bert", EMBEDDING, 1.0)])
def test_squarehead_is_logged_for_every_model_and_trained_on_only_with_a_weight(model_type, kind, weight):
    teacher, student = tiny_of_kind(kind, model_type), tiny_of_kind(kind, model_type, seed=1)
    batch = random_batch(teacher)
    with torch.no_grad():
        teacher_out = teacher(**batch, output_hidden_states=True)
    # default weights: SquareHead off for causal LMs, on for the rest
    weights = TrainSettings().for_kind(kind).weights
    terms = distillation_terms(kind, student(**batch, output_hidden_states=True), teacher_out, batch, weights)
    assert float(terms["squarehead"].detach()) > 0
    assert terms["squarehead"].requires_grad == (weight > 0)
    expected = sum(value for name, value in terms.items() if name != "loss" and (name != "squarehead" or weight))
    torch.testing.assert_close(terms["loss"], expected)
