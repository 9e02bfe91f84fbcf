"""Recovery training: distil a pruned student from its dense teacher on Hugging Face accelerate.

One code path for one CPU, one GPU, DDP, FSDP and several nodes (`accelerate launch`,
`torchrun`): accelerate prepares the student, optimiser, data and schedule, and reduces what is
logged; nothing here is written for a number of processes. AdamW with linear warm-up then linear
decay; each call starts its schedule from the top, which is the learning-rate rewind oBERT and
GMP* use at every pruning step. A checkpoint (accelerate state plus progress.json) is written
every `checkpoint_every` steps and at the end; a call given the same folder resumes from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .data import TokenBatches
from .distill import RepresentationMemory, contrastive, distillation_terms
from .errors import UserError
from .kinds import ModelKind
from .progress import bar, note
from .settings import ContrastiveSettings, TrainSettings

log = logging.getLogger(__name__)

PROGRESS = "progress.json"


@dataclass
class TrainRecord:
    """What a training run did: the report's recovery columns and the loss curve."""

    steps: int
    tokens: int
    seconds: float
    final: dict[str, float]  # loss terms, mean over the last logged window
    curve: list[dict] = field(default_factory=list)  # {"step", "tokens", <term>: value}

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": round(self.tokens_per_second, 1)}


class Contrast:
    """CAP's contrastive term over a training run: its teachers (the dense model's output, which the KL
    terms computed already, and snapshots: models trained earlier in the run, run here without
    gradients) and a memory of each one's recent representations."""

    def __init__(self, kind: ModelKind, settings: ContrastiveSettings, snapshots: list[nn.Module], device):
        self.kind, self.settings, self.device = kind, settings, device
        self.snapshots = [s.to(device).eval() for s in snapshots] if "snapshots" in settings.teachers else []
        self.memories = [RepresentationMemory(settings.memory) for _ in range(("dense" in settings.teachers)
                                                                               + len(self.snapshots))]

    def term(self, student_out, teacher_out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        student = self.kind.representation(student_out, mask)  # (batch, d)
        with torch.no_grad():
            teachers = [self.kind.representation(teacher_out, mask)] if "dense" in self.settings.teachers else []
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            teachers += [self.kind.representation(s(**inputs, output_hidden_states=True), mask) for s in self.snapshots]
        if not teachers:  # only snapshots asked, and none made yet: the run's first model
            return student.new_zeros(())
        labels = batch.get("labels") if "classes" in self.settings.teachers else None
        keys = [memory.keys(student) for memory in self.memories]
        value = contrastive(student, teachers, [k[0] for k in keys], self.settings.temperature, labels,
                            [k[1] for k in keys])
        for memory, teacher in zip(self.memories, teachers):
            memory.push(teacher, labels)
        return value

    def memory_file(self, checkpoint: Path, process: int) -> Path:
        """Each process remembers the batches it saw: one file each in a checkpoint."""
        return checkpoint / f"contrastive-memory-{process}.pt"

    def save(self, checkpoint: Path, process: int) -> None:
        torch.save([(m.vectors, m.labels) for m in self.memories], self.memory_file(checkpoint, process))

    def load(self, checkpoint: Path, process: int) -> None:
        saved = torch.load(self.memory_file(checkpoint, process), map_location=self.device)
        for memory, (vectors, labels) in zip(self.memories, saved, strict=True):
            memory.vectors, memory.labels = vectors, labels


def autocast_precision(asked: str, gpu: bool) -> str:
    """The accelerate mixed-precision mode for `asked` (TrainSettings.precision) on this machine."""
    if asked == "auto":
        if gpu:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        # measured to pay with AMX tiles (1.36x on a Xeon) and with AVX-512 BF16 alone (1.49x on an EPYC;
        # BENCHMARKS); without either, oneDNN emulates bf16 matmuls, and float32 is the safe choice
        return "bf16" if native_cpu_bf16() else "no"
    if asked == "fp16" and not gpu:
        raise UserError("fp16 training needs a GPU: give --train-precision bf16 or no on a CPU")
    if asked == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16: give --train-precision fp16 or no")
    if asked == "bf16" and not gpu and not native_cpu_bf16():
        # honoured, since it is what was asked: emulated bf16 trained SmolLM2 17x slower than
        # float32 on an AVX2-only EPYC (BENCHMARKS)
        log.warning("this CPU has neither AMX nor AVX-512 BF16, so bf16 is emulated and trains many times "
                    "slower than float32: give --train-precision auto or no to train in float32")
    return asked


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AMX tiles or AVX-512 BF16 dot products."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def make_accelerator(cpu: bool = False, precision: str = "auto"):
    """The accelerator every process of a run builds: seedable shuffling (epoch e shuffles with seed + e,
    so a resumed run sees the same batches), autocast as `precision` (TrainSettings.precision) asks."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs

    asked_for_gpus = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("false", "0", "no")  # `accelerate launch`
    if asked_for_gpus and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        raise UserError("accelerate launch asked for several GPU processes, but this machine has no GPU: add --cpu "
                        "(one process), or run `torchrun --nproc_per_node N -m ziplm_planner ...` for several CPU ones")
    cpu = cpu or not torch.cuda.is_available()  # accelerate runs several CPU processes only when told cpu=True
    precision = autocast_precision(precision, gpu=not cpu)
    if is_initialized() and AcceleratorState().mixed_precision != precision:  # accelerate's state is per process
        raise UserError(f"this Python process already trained in {AcceleratorState().mixed_precision}: "
                        f"train in {precision} in a new one")
    # parts a loss never reaches (BERT's pooler under embedding distillation) get no gradient: DDP must
    # be told, or it waits for them
    return Accelerator(cpu=cpu, mixed_precision=precision,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),
                                        # the other processes wait while the main one prunes and measures
                                        InitProcessGroupKwargs(timeout=timedelta(hours=12))])


def planned_steps(data: TokenBatches, settings: TrainSettings, processes: int) -> int:
    """Steps that show the student about `settings.tokens` real tokens, all processes together."""
    tokens_per_sample = data.num_tokens / len(data.input_ids)
    return max(1, math.ceil(settings.tokens / (tokens_per_sample * settings.batch_size * processes)))


def linear_schedule(steps: int, warmup: float):
    warm = max(1, round(warmup * steps))
    return lambda step: min((step + 1) / warm, max(0.0, (steps - step) / max(1, steps - warm)))


def _dataset(data: TokenBatches) -> TensorDataset:
    tensors = [data.input_ids, data.attention_mask] + ([data.labels] if data.labels is not None else [])
    return TensorDataset(*tensors)


def _batch(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    batch = {"input_ids": tensors[0], "attention_mask": tensors[1]}
    if len(tensors) > 2:
        batch["labels"] = tensors[2]
    length = int(batch["attention_mask"].sum(1).max())  # right padding: drop columns no sample reaches
    return {k: v[:, :length] if v.dim() == 2 else v for k, v in batch.items()}


def _read_progress(folder: Path | None, identity: dict) -> dict | None:
    if folder is None or not (folder / PROGRESS).is_file():
        return None
    progress = json.loads((folder / PROGRESS).read_text())
    if progress.get("identity") != identity:
        raise UserError(f"checkpoint {folder} was made with other training settings or data: rerun with "
                        "those to resume it, or remove the folder to train this member afresh")
    return progress


def distil(student: nn.Module, teacher: nn.Module, kind: ModelKind, data: TokenBatches, settings: TrainSettings,
           accelerator, checkpoint: Path | None = None, label: str = "distil",
           snapshots: list[nn.Module] = ()) -> TrainRecord:
    """Train `student` in place to match `teacher` on `data`; returns the record. `settings` are complete:
    what they leave to the model is filled in by `TrainSettings.for_kind`. `accelerator` is an
    `accelerate.Accelerator`; every process calls this with the same arguments. `snapshots`: models
    trained earlier in the run, teachers of the contrastive term where it is on."""
    from accelerate.utils import set_seed

    if settings.batch_size is None or None in (settings.weights.squarehead, settings.weights.contrastive):
        raise ValueError("distil takes training settings with the model's defaults filled in: TrainSettings.for_kind")
    set_seed(settings.seed)
    steps = planned_steps(data, settings, accelerator.num_processes)
    identity = {"settings": json.loads(json.dumps(asdict(settings))), "samples": len(data.input_ids),
                "tokens": data.num_tokens, "processes": accelerator.num_processes, "steps": steps}
    progress = _read_progress(checkpoint, identity) or {"identity": identity, "step": 0, "tokens": 0, "seconds": 0.0,
                                                         "curve": []}
    loader = DataLoader(_dataset(data), batch_size=settings.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(settings.seed))
    if len(loader) == 0:
        raise UserError(f"training data has {len(data.input_ids)} samples, fewer than one batch of "
                        f"{settings.batch_size}: give more data or a smaller --train-batch-size")
    student.requires_grad_(True)  # every weight of the student trains, whatever it was copied from
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(steps, settings.warmup))
    teacher = teacher.to(accelerator.device).eval()  # run under no_grad; its flags stay the caller's
    contrast = Contrast(kind, settings.contrastive, list(snapshots), accelerator.device) \
        if settings.weights.contrastive > 0 else None
    model, optimizer, prepared, scheduler = accelerator.prepare(student.train(), optimizer, loader, scheduler)
    resume(accelerator, checkpoint, progress, steps, settings.precision, label, contrast)
    per_epoch = len(prepared)
    window: dict[str, list[float]] = {}
    started = time.perf_counter() - progress["seconds"]
    with bar(total=steps, initial=progress["step"], desc=label, leave=False,
             disable=not accelerator.is_main_process) as shown:
        while progress["step"] < steps:
            epoch, done = divmod(progress["step"], per_epoch)
            prepared.set_epoch(epoch)  # the shuffle of each epoch is fixed by seed and epoch: resumable
            for tensors in accelerator.skip_first_batches(prepared, done) if done else prepared:
                batch = _batch(list(tensors))
                terms = train_step(model, teacher, kind, batch, settings, accelerator, optimizer, scheduler, contrast)
                progress["step"] += 1
                progress["tokens"] += int(accelerator.gather(batch["attention_mask"].sum()).sum())
                for name, value in terms.items():
                    window.setdefault(name, []).append(value)
                shown.update(1)
                if progress["step"] % settings.log_every == 0 or progress["step"] == steps:
                    point = {name: sum(values) / len(values) for name, values in window.items()}
                    progress["curve"].append({"step": progress["step"], "tokens": progress["tokens"], **point})
                    shown.set_postfix(loss=f"{point['loss']:.4f}", tok_s=f"{progress['tokens'] / (time.perf_counter() - started):.0f}")
                    window = {}
                if checkpoint is not None and (progress["step"] % settings.checkpoint_every == 0 or progress["step"] == steps):
                    progress["seconds"] = time.perf_counter() - started
                    save_checkpoint(accelerator, checkpoint, progress, contrast)
                    if accelerator.is_main_process:
                        note(f"{label}: {progress_line(progress, steps)}; checkpoint saved")
                if progress["step"] >= steps:
                    break
    hand_back(accelerator, model, student)
    final = progress["curve"][-1] if progress["curve"] else {}
    return TrainRecord(progress["step"], progress["tokens"], time.perf_counter() - started,
                       {k: v for k, v in final.items() if k not in ("step", "tokens")}, progress["curve"])


def resume(accelerator, checkpoint: Path | None, progress: dict, steps: int, precision: str, label: str,
           contrast: Contrast | None = None) -> None:
    """Load the checkpoint's state (and the contrastive memory) where `progress` is past step 0; record
    the precision training runs in."""
    if progress["step"]:
        accelerator.load_state(str(checkpoint))
        if contrast is not None:
            contrast.load(checkpoint, accelerator.process_index)
        log.info("%s: resuming at step %d of %d from %s", label, progress["step"], steps, checkpoint)
        if progress.get("precision", accelerator.mixed_precision) != accelerator.mixed_precision:
            # `auto` resolves per machine (bf16 where the CPU or GPU has it): a run resumed elsewhere may
            # switch; it is the same setting, so it goes on, but the member's training is then mixed
            log.warning("%s: trained in %s up to step %d, goes on in %s on this machine (--train-precision %s); "
                        "resume on a machine like the first to keep one precision", label, progress["precision"],
                        progress["step"], accelerator.mixed_precision, precision)
    progress["precision"] = accelerator.mixed_precision


def hand_back(accelerator, model: nn.Module, student: nn.Module) -> None:
    """Leave the trained weights in the caller's `student`, as a plain module, once every process is done."""
    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(model).eval()
    # prepare() set an autocast-wrapped forward on the student; left on, every later forward (scoring, the
    # ONNX trace) runs in bf16, and ONNX Runtime has no bf16 MatMul on CPU. Dropping it restores the
    # class's forward; unwrap_model's keep_fp32_wrapper=False would also strip transformers' decorators
    # (output_hidden_states stops working)
    for name in ("forward", "_original_forward"):
        trained.__dict__.pop(name, None)
    if trained is not student:  # DDP/FSDP wrap a copy on some setups: hand the caller its own module back
        student.load_state_dict(trained.state_dict())
    accelerator.free_memory()  # the accelerator serves the next member: let go of this one's model and optimiser


def train_step(model, teacher: nn.Module, kind: ModelKind, batch: dict[str, torch.Tensor], settings: TrainSettings,
               accelerator, optimizer, scheduler, contrast: Contrast | None = None) -> dict[str, float]:
    """One optimiser step on one batch; the loss terms, averaged over the processes."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with accelerator.autocast():
        student_out = model(**inputs, output_hidden_states=True)
        with torch.no_grad():
            teacher_out = teacher(**inputs, output_hidden_states=True)
        terms = distillation_terms(kind, student_out, teacher_out, batch, settings.weights, contrast)
    accelerator.backward(terms["loss"])
    accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return {name: float(accelerator.reduce(value.detach(), "mean")) for name, value in terms.items()}


def progress_line(progress: dict, steps: int) -> str:
    """'step 200 of 489, 102,400 tokens, 30 tokens/s, loss 4.2977 (squarehead 1.31, kl 0.88, task 3.42)':
    where the run is, and its loss terms over the last points of the curve."""
    point = progress["curve"][-1] if progress["curve"] else {}
    terms = ", ".join(f"{name} {value:.2f}" for name, value in point.items() if name not in ("step", "tokens", "loss"))
    loss = f", loss {point['loss']:.4f} ({terms})" if "loss" in point else ""
    return (f"step {progress['step']} of {steps}, {progress['tokens']:,} tokens, "
            f"{progress['tokens'] / max(progress['seconds'], 1e-9):.0f} tokens/s{loss}")


def save_checkpoint(accelerator, folder: Path, progress: dict, contrast: Contrast | None = None) -> None:
    """accelerate's state (model, optimiser, schedule, RNGs) and the contrastive memory, then
    progress.json last: a checkpoint without its progress file is incomplete and is not resumed from."""
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PROGRESS).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    with tied_weights_stored_quietly():
        accelerator.save_state(str(folder))
    if contrast is not None:
        contrast.save(folder, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / PROGRESS).write_text(json.dumps(progress))
    accelerator.wait_for_everyone()


@contextmanager
def tied_weights_stored_quietly():
    """accelerate warns at every checkpoint that a tied weight (the output layer of SmolLM2 or GPT-2)
    was stored once, and asks to check the reload. Loading ties it again (tested), so during long runs
    the warning would only alarm."""
    logger = logging.getLogger("accelerate.utils.other")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
