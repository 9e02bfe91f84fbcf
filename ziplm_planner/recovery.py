"""Recovering accuracy after pruning: distil each member from the dense model (ZipLM's gradual mode).

Modes: `none` (one-shot, as pruned), `oneshot` (each member pruned from the dense model, then
distilled: the cheap mode, and the control for gradual pruning) and `gradual` (each member pruned
from the last one distilled, re-planned on it, then distilled here). Distillation changes weights,
never shapes, so a member keeps the speed it was verified at; it is measured once more all the same,
because the file that ships is the trained model's export.

Recovery is one step of a member's road (member.py); `NoRecovery` is the step when there is none.
With several processes only the main one prunes, measures and writes; `follow` is the others' part.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

from .calibrate import CalibrationLoss
from .data import TokenBatches, read_dataset
from .errors import UserError
from .models import LoadedModel
from .progress import stage
from .settings import RecoverySettings, TrainSettings
from .surgery import PruningPlan, build_pruned
from .train import TrainRecord, distil, make_accelerator
from .familydir import FamilyDir, Member, held_folder
from .verify import Unverified, Verifier, discard_export

log = logging.getLogger(__name__)

DONE = "done"  # what the main process shares when nothing more is to be trained
FAILED = "failed"  # ... and when it stopped on an error
TRAIN = "train"  # ... with a model to train together
SNAPSHOT = "snapshot"  # ... with a member an earlier run trained: every process keeps it as a CAP teacher


def joined(parts: list[dict]) -> dict:
    """The training of a member reached in steps: totals, one loss curve with steps and tokens counted
    from the first step on (each point names its `prune_step`), and each step without its curve."""
    totals, curve = {"steps": 0, "tokens": 0, "seconds": 0.0}, []
    for number, part in enumerate(parts, 1):
        curve += [{**point, "step": point["step"] + totals["steps"], "tokens": point["tokens"] + totals["tokens"],
                   "prune_step": number} for point in part["curve"]]
        totals = {name: total + part[name] for name, total in totals.items()}
    return {**totals, "tokens_per_second": round(totals["tokens"] / max(totals["seconds"], 1e-9), 1), "curve": curve,
            "prune_steps": [{k: v for k, v in part.items() if k != "curve"} for part in parts]}


def summary(record: TrainRecord) -> dict:
    """One prune step's training, as `joined` takes it: its size, where its loss ended, its curve."""
    return {"steps": record.steps, "tokens": record.tokens, "seconds": round(record.seconds, 1),
            "final": record.final, "curve": record.curve}


def training_length(loaded: LoadedModel, requested: int | None, calibration_length: int) -> int:
    """Tokens per training sample: `requested`, else what the model's kind trains on (a causal LM the
    windows its perplexity is scored on, other models the calibration length)."""
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if requested is not None:
        if positions and requested > positions:
            raise UserError(f"training samples of {requested} tokens are longer than the model's {positions} "
                            "positions: give a smaller --train-seq-len")
        return requested
    return loaded.kind.training_length(loaded.model.config, calibration_length)


def for_model(loaded: LoadedModel, train: TrainSettings, calibration_length: int) -> TrainSettings:
    """`train` with the batch size, sample length and loss weights it leaves to the model filled in."""
    return dataclasses.replace(train.for_kind(loaded.kind),
                               seq_len=training_length(loaded, train.seq_len, calibration_length))


def load_training_data(loaded: LoadedModel, paths: list[str], seq_len: int, seed: int, what: str) -> TokenBatches:
    """Every sample of the training files (`what` names them in errors), tokenised as calibration data is
    (windows of running text for causal LMs, one sentence per sample otherwise; both sentences of a pair),
    one file's after another's: training shuffles them together. An embedding teacher can be distilled on
    any sentences, so text beside the task's (SST-2, WikiText) means fewer passes over the task's."""
    tokenize = loaded.kind.tokenize
    return TokenBatches.joined([tokenize(loaded.tokenizer, read_dataset(path, what=what), seq_len, None, seed)
                                for path in paths])


class NoRecovery:
    """The recovery step of a one-shot family: members ship as pruned."""

    is_main_process = True
    data_path = None

    def leading(self):
        return nullcontext()

    def metadata(self) -> dict:
        return {}

    def hold(self, family: FamilyDir, member: Member) -> None:
        pass

    def held(self, family: FamilyDir, target: float, cut_from) -> None:
        return None

    def recover(self, member: Member, verifier: Verifier | Unverified, score_loss: CalibrationLoss) -> Member:
        return member

    def reused(self, member: Member) -> None:
        pass

    def finished(self, member: Member) -> None:
        pass


class Recovery:
    """Distils members from the dense model; one accelerator for the whole run."""

    def __init__(self, loaded: LoadedModel, settings: RecoverySettings, calibration_path: str,
                 calibration_length: int, workdir: Path, seed: int):
        settings = dataclasses.replace(settings, train=for_model(loaded, settings.train, calibration_length))
        self.loaded, self.settings, self.workdir = loaded, settings, workdir
        self.data_path = path = settings.train_data or calibration_path
        with stage("training data", f"samples of {settings.train.seq_len} tokens from {path}") as step:
            self.data = load_training_data(loaded, settings.train_files or [calibration_path], settings.train.seq_len,
                                           seed, "--train-data file" if settings.train_data else "--calib file")
            # past about one pass a member learns small data by heart (SmolLM2, BENCHMARKS): say how many
            step.outcome = (f"{len(self.data.input_ids):,} samples, {self.data.num_tokens:,} tokens; "
                            f"{settings.train.tokens / self.data.num_tokens:.1f} passes per member")
        if len(self.data.input_ids) < settings.train.batch_size:  # now, not after the first member is pruned
            raise UserError(f"training data {path} has {len(self.data.input_ids)} samples, fewer than one batch of "
                            f"{settings.train.batch_size}: give more data or a smaller --train-batch-size")
        self.accelerator = make_accelerator(precision=settings.train.precision)
        self._training = False  # the main process is training with the others: they are in the same collectives
        # CAP's snapshots: every model trained so far in this run (members and intermediate steps), frozen
        self.snapshots: list = []
        train = settings.train
        self._keeps_snapshots = train.weights.contrastive > 0 and "snapshots" in train.contrastive.teachers

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def metadata(self) -> dict:
        """For the family report: how training ran, where the settings left it to the model and machine."""
        train = self.settings.train
        return {"train_precision": self.accelerator.mixed_precision, "train_batch_size": train.batch_size,
                "train_seq_len": train.seq_len, "train_loss_weights": dataclasses.asdict(train.weights)}

    def hold(self, family: FamilyDir, member: Member) -> None:
        """Keep the verified member, as pruned, until its training is done: a rerun trains this very one."""
        family.hold(member)

    def held(self, family: FamilyDir, target: float, cut_from) -> Member | None:
        return family.held(target, cut_from)

    def recover(self, member: Member, verifier: Verifier | Unverified, score_loss: CalibrationLoss) -> Member:
        """Distil the member's model (in place) with every process, then time its export again; its
        training is summed with that of the intermediate steps it was reached through. The main process
        calls this; the others are in `follow`."""
        result, model = member.result, member.model
        record = self._distil(model, result.plan, result.folder)
        measurement = verifier.measure(model, result.target)
        discard_export(result)  # the untrained export ships no more
        recovery = {"mode": self.settings.mode, **record.to_dict(), "calibration_loss_before": result.calibration_loss,
                    "speedup_before_training": None if result.speedup is None else round(result.speedup, 4)}
        if member.steps:  # the member's budget went into every step: report it whole, and each step's share
            recovery.update(joined([*member.steps, {"speedup": result.target, **summary(record)}]))
        trained = dataclasses.replace(result, measurement=measurement, calibration_loss=score_loss(model),
                                      recovery=recovery)
        return dataclasses.replace(member, result=trained)

    def intermediate(self, model, plan: PruningPlan, name: str, speedup: float, predicted_speedup: float) -> dict:
        """Distil a model pruned to an intermediate speedup on the way to a member (gradual, --prune-steps);
        returns the step's summary for the member's report."""
        record = self._distil(model, plan, name)
        return {"speedup": round(speedup, 4), "predicted_speedup": round(predicted_speedup, 4), **summary(record)}

    def follow(self):
        """The other processes' part of a run: take each model the main process pruned (a member or an
        intermediate step) and distil it together with the main process, until it says the run is done;
        write nothing. Returns the last model trained."""
        trained = None
        while (shared := self._share(None)) != DONE:  # pickled across processes: equal, not the same object
            if shared == FAILED:
                raise UserError("the main process stopped on an error (its output says which): this one stops too")
            what, plan, state, name = shared
            model = build_pruned(type(self.loaded.model), self.loaded.model.config, PruningPlan.from_dict(plan), state)
            if what == SNAPSHOT:
                self._snapshot(model)
            else:
                self._train(model, plan, name)
                trained = model
        return trained

    @contextmanager
    def leading(self):
        """The main process's run. At its end the other processes' `follow` returns; if it fails while
        they wait for the next model, they are told and stop with it, rather than wait until the
        process group times out (hours). A failure during training leaves them to the collective's own
        timeout: they are inside the same calls, not waiting on a message."""
        try:
            yield
        except Exception:  # not an interrupt: that reaches every process, and they are gone
            if not self._training:
                with suppress(Exception):  # the error to show is the first one, not a broken group's
                    self._share(FAILED)
            raise
        self._share(DONE)

    def _share(self, payload):
        """The main process's payload for every process: only it prunes and measures."""
        if self.accelerator.num_processes == 1:
            return payload
        from accelerate.utils import broadcast_object_list

        box = [payload]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _distil(self, model, plan: PruningPlan, name: str):
        """The main process's part: hand the model to the other processes, then train it with them."""
        self._share((TRAIN, plan.to_dict(), model.state_dict(), name))
        self._training = True
        record = self._train(model, plan.to_dict(), name)
        self._training = False
        return record

    def _train(self, model, plan: dict, name: str):
        # a rerun resumes from the checkpoint of the same model; one re-planned otherwise starts afresh
        digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]
        checkpoint = self.workdir / f".train-{name}-{digest}"
        train = self.settings.step_train
        with stage(f"distil {name}", f"{train.tokens:,} tokens"):
            record = distil(model, self.loaded.model, self.loaded.kind, self.data, train, self.accelerator, checkpoint,
                            label=f"distil {name}", snapshots=self.snapshots)
        self._snapshot(model)
        return record

    def reused(self, member: Member) -> None:
        """A member an earlier run of this family trained and saved: a snapshot too (gradual runs load it),
        in every process."""
        if member.model is not None and self._keeps_snapshots:
            self._share((SNAPSHOT, member.result.plan.to_dict(), member.model.state_dict(), member.result.folder))
            self._snapshot(member.model)

    def _snapshot(self, model) -> None:
        if self._keeps_snapshots:
            self.snapshots.append(copy.deepcopy(model).eval().requires_grad_(False))

    def finished(self, member: Member) -> None:
        """The member is saved: its checkpoints and its verified model are no longer needed."""
        name = member.result.folder
        for checkpoint in [*self.workdir.glob(f".train-{name}-*"), held_folder(self.workdir, name)]:
            shutil.rmtree(checkpoint, ignore_errors=True)


def recovery_step(loaded: LoadedModel, settings: RecoverySettings, calibration_path: str, calibration_length: int,
                  output: Path, seed: int) -> Recovery | NoRecovery:
    """The recovery step of every member of a run; its training data is read now: a bad file fails
    before any pruning."""
    if not settings.trains:
        return NoRecovery()
    return Recovery(loaded, settings, calibration_path, calibration_length, output, seed)
