"""Recovery training on accelerate: it distils, it resumes to the same weights, two processes agree."""

import copy
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ziplm_planner.adapters import model_shape
from ziplm_planner.data import TokenBatches
from ziplm_planner.distill import distillation_terms
from ziplm_planner.errors import UserError
from ziplm_planner.kinds import CAUSAL_LM, EMBEDDING
from ziplm_planner.surgery import LayerPlan, PruningPlan, apply_plan
from ziplm_planner.settings import LossWeights, TrainSettings
from ziplm_planner.train import autocast_precision, distil, make_accelerator, planned_steps
from tiny_models import tiny_model

ROOT = Path(__file__).parents[1]


def tiny_pair(seed=0, model_type="bert", causal_lm=False):
    """A dense tiny model and a copy with half its heads and neurons gone from the first layer."""
    teacher = tiny_model(model_type, causal_lm=causal_lm, seed=seed)
    shape = model_shape(teacher.config)
    plan = PruningPlan.dense(shape)
    plan.layers[0] = LayerPlan([0, 1], list(range(0, shape.intermediate_size, 2)))
    return apply_plan(copy.deepcopy(teacher), plan), teacher


def tiny_data(samples=48, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (samples, seq), generator=g)
    mask = torch.ones(samples, seq, dtype=torch.long)
    mask[::3, 8:] = 0  # some right padding
    return TokenBatches(ids, mask, None)


def loss_on(student, teacher, data):
    batch = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
    with torch.no_grad():
        return float(distillation_terms(EMBEDDING, student(**batch, output_hidden_states=True),
                                        teacher(**batch, output_hidden_states=True), batch,
                                        TrainSettings(weights=LossWeights(contrastive=0.0)).for_kind(EMBEDDING).weights)["loss"])


def settings(kind=EMBEDDING, **kw):
    """Quick training settings, with what they leave to a model of `kind` filled in, as distil takes them."""
    return TrainSettings(**{"tokens": 2500, "batch_size": 8, "learning_rate": 3e-3, "log_every": 1, **kw}).for_kind(kind)


def test_distillation_brings_a_pruned_student_closer_to_its_teacher():
    student, teacher = tiny_pair()
    data = tiny_data()
    before = loss_on(student, teacher, data)
    record = distil(student, teacher, EMBEDDING, data, settings(), make_accelerator(cpu=True))
    assert record.steps == planned_steps(data, settings(), 1) and record.tokens > 0
    assert loss_on(student, teacher, data) < 0.7 * before
    assert len(record.curve) == record.steps and set(record.final) >= {"loss", "squarehead", "kl"}
    assert not student.training and all(p.requires_grad for p in student.parameters())


def distil_until_checkpoint(monkeypatch, student, teacher, kind, folder, checkpoints, every, snapshots=(), **kw):
    """Train with a checkpoint every `every` steps and stop, as an interrupt would, once `checkpoints`
    of them are written."""
    import ziplm_planner.train as train_module

    real_save, saved = train_module.save_checkpoint, []

    def save_then_stop(accelerator, folder, progress, *args):
        real_save(accelerator, folder, progress, *args)
        saved.append(progress["step"])
        if len(saved) == checkpoints:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        distil(student, teacher, kind, tiny_data(), settings(kind, checkpoint_every=every, **kw),
               make_accelerator(cpu=True), folder, snapshots=snapshots)
    monkeypatch.undo()


def test_a_run_resumed_in_another_precision_says_so(tmp_path, monkeypatch, caplog):
    """`auto` is bf16 on one machine and float32 on another: a checkpoint made on the first and resumed
    on the second goes on, and says that its training is mixed."""
    import json

    student, teacher = tiny_pair()
    distil_until_checkpoint(monkeypatch, student, teacher, EMBEDDING, tmp_path / "c", checkpoints=1, every=5)
    here = make_accelerator(cpu=True).mixed_precision
    made = json.loads((tmp_path / "c" / "progress.json").read_text())
    assert made["precision"] == here
    elsewhere = "no" if here == "bf16" else "bf16"
    (tmp_path / "c" / "progress.json").write_text(json.dumps({**made, "precision": elsewhere}))
    with caplog.at_level(logging.WARNING):
        distil(student, teacher, EMBEDDING, tiny_data(), settings(checkpoint_every=5), make_accelerator(cpu=True),
               tmp_path / "c")
    assert f"trained in {elsewhere} up to step 5, goes on in {here} on this machine" in caplog.text


def test_a_log_without_bars_says_at_each_checkpoint_how_far_training_has_come(tmp_path, caplog):
    from ziplm_planner.progress import STAGE_LOGGER

    student, teacher = tiny_pair()
    with caplog.at_level(logging.INFO, logger=STAGE_LOGGER):
        record = distil(student, teacher, EMBEDDING, tiny_data(), settings(checkpoint_every=5), make_accelerator(cpu=True),
                        tmp_path / "checkpoint", label="distil x2")
    lines = [r.getMessage() for r in caplog.records if r.name == STAGE_LOGGER]
    assert [line.split(",")[0] for line in lines] == [f"distil x2: step {s} of {record.steps}"
                                                      for s in [*range(5, record.steps, 5), record.steps]]
    assert all("tokens/s, loss " in line and "squarehead" in line and line.endswith("checkpoint saved") for line in lines)
    assert lines[-1].split(", ")[1] == f"{record.tokens:,} tokens"


# GPT-2 ties its output layer to the embeddings, as SmolLM2 does: a checkpoint stores the tied weight once.
# With CAP's term the memory of earlier batches is part of the state: its negatives shape every later step
@pytest.mark.parametrize("model_type,kind,contrastive", [("bert", EMBEDDING, False), ("gpt2", CAUSAL_LM, False),
                                                         ("bert", EMBEDDING, True)])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, caplog, model_type, kind, contrastive):
    from ziplm_planner.settings import LossWeights

    def pair():
        return tiny_pair(model_type=model_type, causal_lm=kind == CAUSAL_LM)

    snapshots = [tiny_pair(seed=1)[0]] if contrastive else []
    cap = dict(weights=LossWeights(contrastive=1.0)) if contrastive else {}
    whole, teacher = pair()
    distil(whole, teacher, kind, tiny_data(), settings(kind, checkpoint_every=2, **cap), make_accelerator(cpu=True),
           tmp_path / "whole", snapshots=snapshots)
    resumed, _ = pair()
    distil_until_checkpoint(monkeypatch, resumed, teacher, kind, tmp_path / "resumed", checkpoints=2, every=2,
                            snapshots=snapshots, **cap)
    if contrastive:
        assert (tmp_path / "resumed" / "contrastive-memory-0.pt").is_file()
    resumed, _ = pair()  # a new process: the weights come from the checkpoint
    record = distil(resumed, teacher, kind, tiny_data(), settings(kind, checkpoint_every=2, **cap),
                    make_accelerator(cpu=True), tmp_path / "resumed", snapshots=snapshots)
    assert record.steps == planned_steps(tiny_data(), settings(), 1)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    if kind == CAUSAL_LM:  # still tied: one tensor, not two that agree by chance
        assert resumed.get_output_embeddings().weight is resumed.get_input_embeddings().weight
    assert "Removed shared tensor" not in caplog.text  # accelerate's alarm at every checkpoint of a tied model


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    student, teacher = tiny_pair()
    distil(student, teacher, EMBEDDING, tiny_data(), settings(), make_accelerator(cpu=True), tmp_path / "c")
    with pytest.raises(UserError, match="other training settings"):
        distil(student, teacher, EMBEDDING, tiny_data(), settings(learning_rate=1e-3), make_accelerator(cpu=True),
               tmp_path / "c")


def test_distil_takes_settings_with_the_model_defaults_filled_in():
    student, teacher = tiny_pair()
    with pytest.raises(ValueError, match="TrainSettings.for_kind"):
        distil(student, teacher, EMBEDDING, tiny_data(), TrainSettings(tokens=100), make_accelerator(cpu=True))


@pytest.mark.parametrize("bad", [dict(tokens=0), dict(batch_size=0), dict(learning_rate=0.0), dict(warmup=1.0),
                                 dict(precision="fp8")])
def test_bad_training_settings_are_refused(bad):
    with pytest.raises(UserError):
        settings(**bad)


@pytest.mark.parametrize("bad", [dict(text="1,1"), dict(text="1,-1,1"), dict(text="1,x,1"), dict(temperature=0.0),
                                 dict(text="1,1,1,1,1"), dict(text="1,1,1,-0.5")])
def test_bad_loss_weights_are_refused(bad):
    from ziplm_planner.settings import LossWeights

    with pytest.raises(UserError):
        LossWeights.parse(**{"text": "1,1,1", **bad})


def test_the_contrastive_weight_is_optional_and_its_settings_checked():
    from ziplm_planner.settings import ContrastiveSettings, LossWeights, cap_teachers

    assert LossWeights.parse("1,1,0").contrastive == 0.0 and LossWeights.parse("1,1,0,0.2").contrastive == 0.2
    assert cap_teachers("dense, snapshots") == ("dense", "snapshots")
    for text in ("", "dense,dense", "fine-tuned"):
        with pytest.raises(UserError, match="contrastive teachers are some of dense, snapshots, classes"):
            cap_teachers(text)
    for bad in (dict(temperature=0.0), dict(memory=-1)):
        with pytest.raises(UserError, match="contrastive temperature must be > 0 and its memory >= 0"):
            ContrastiveSettings(**bad)


def test_too_little_training_data_is_refused():
    student, teacher = tiny_pair()
    with pytest.raises(UserError, match="fewer than one batch"):
        distil(student, teacher, EMBEDDING, tiny_data(samples=4), settings(), make_accelerator(cpu=True))


def test_two_processes_end_with_identical_weights(tmp_path):
    """torchrun gives two CPU ranks over gloo; accelerate's DDP keeps their students identical."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "distributed_distil.py"), str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = sorted(tmp_path.glob("rank*.sha256"))
    assert len(digests) == 2 and digests[0].read_text() == digests[1].read_text()


def test_gpu_processes_asked_for_on_a_machine_without_one_are_refused(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")  # what `accelerate launch --multi_gpu` sets
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="no GPU"):
        make_accelerator()


@pytest.mark.parametrize("amx,avx512_bf16,expected", [(True, True, "bf16"), (False, True, "bf16"),
                                                       (False, False, "no")])
def test_auto_precision_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert autocast_precision("auto", gpu=False) == expected
    assert autocast_precision("no", gpu=False) == "no" and autocast_precision("bf16", gpu=False) == "bf16"
    with pytest.raises(UserError, match="fp16 training needs a GPU"):
        autocast_precision("fp16", gpu=False)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_asked_on_a_cpu_that_emulates_it_is_honoured_with_a_warning(monkeypatch, caplog, native):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    with caplog.at_level(logging.WARNING, logger="ziplm_planner.train"):
        assert autocast_precision("bf16", gpu=False) == "bf16"
    assert ("bf16 is emulated" in caplog.text) == (not native)


def test_a_second_precision_in_one_process_is_refused():
    """accelerate keeps one precision per process: a notebook that asks for another gets told, not a trace."""
    current = make_accelerator(cpu=True).mixed_precision
    with pytest.raises(UserError, match=f"already trained in {current}"):
        make_accelerator(cpu=True, precision="bf16" if current == "no" else "no")


BF16_DISTIL = """
import copy, sys, torch
sys.path.insert(0, "tests")
from test_train import settings, tiny_data, tiny_pair
from ziplm_planner.kinds import EMBEDDING
from ziplm_planner.train import distil, make_accelerator
student, teacher = tiny_pair()
plain = copy.deepcopy(student)  # never prepared: its forward is the model's own
distil(student, teacher, EMBEDDING, tiny_data(), settings(precision="bf16"), make_accelerator(cpu=True, precision="bf16"))
plain.load_state_dict(student.state_dict())
ids = torch.randint(3, 97, (2, 12))
trained, own = student(input_ids=ids, output_hidden_states=True), plain(input_ids=ids, output_hidden_states=True)
print(len(trained.hidden_states) == len(own.hidden_states) and torch.equal(trained.last_hidden_state, own.last_hidden_state))
"""


def test_a_student_trained_in_bf16_runs_in_float32_afterwards():
    """Scoring and the ONNX export of a member trained under autocast see its float32 forward, hidden
    states and all (the next prune step reads them). In its own process: accelerate fixes one precision
    per process."""
    result = subprocess.run([sys.executable, "-c", BF16_DISTIL], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "True"


def test_several_training_files_are_mixed_and_recorded_each_by_its_content(tmp_path):
    from ziplm_planner.familydir import training_identity
    from ziplm_planner.recovery import load_training_data
    from ziplm_planner.settings import RecoverySettings
    from tiny_models import tiny_loaded_with_tokenizer, write_sentences

    loaded = tiny_loaded_with_tokenizer("bert")
    first, second = write_sentences(tmp_path / "a.txt", count=30), write_sentences(tmp_path / "b.txt", count=20, seed=1)
    files = RecoverySettings(train_data=f"{first}, {second}").train_files
    assert files == [str(first), str(second)]
    one = load_training_data(loaded, files[:1], 16, 0, "--train-data file")
    both = load_training_data(loaded, files, 16, 0, "--train-data file")
    assert len(both.input_ids) == len(one.input_ids) + 20 and torch.equal(both.input_ids[:30], one.input_ids)
    labelled = TokenBatches(one.input_ids, one.attention_mask, torch.zeros(30, dtype=torch.long))
    assert TokenBatches.joined([labelled, labelled]).labels.shape == (60,)
    assert TokenBatches.joined([labelled, one]).labels is None  # labels only where every file has them
    identities = training_identity(f"{first},{second}")
    assert [i["size"] for i in identities] == [first.stat().st_size, second.stat().st_size]
    assert training_identity(str(first)) == identities[0]  # one file: recorded as before

