"""Command line: a thin click layer over the Python API. Each command parses, calls one
library function and prints a result; bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from .aliases import ALIASES, DEFAULT_MODEL
from .errors import UserError
from .progress import show_stages
from .settings import (BLOCK_ERRORS, CALIBRATION_INPUTS, CAUSAL_LM_DEFAULTS, LOSS_TERMS, METHODS, OTHER_KIND_DEFAULTS,
                       PERPLEXITY_SEQ_LEN, PRECISIONS, RECOVERY_MODES, SCORE_ON, CompressSettings, GenerationSettings,
                       KindDefaults, LossWeights, ProfileSettings, RecoverySettings, TrainSettings, default)
from .timing import ESTIMATORS

MODEL_FORMS = (f"MODEL is a Hugging Face model folder or hub id, a .gguf file, or the alias of a bundled model: "
               f"{', '.join(ALIASES)}.")
MODEL_HELP = f"{MODEL_FORMS} Default: {DEFAULT_MODEL}."
TARGETS_HELP = "Speedup targets over the dense model, e.g. 1.5,2,3: one family member each."
BACKEND_HELP = "Runtime the model is deployed on: PyTorch or ONNX Runtime."


def default_weights(kind: KindDefaults) -> str:
    """--loss-weights as a model of this kind gets them when the flag is left out."""
    weights = LossWeights()
    return f"{weights.task:g},{weights.kl:g},{kind.squarehead:g}"


class DefaultCommandGroup(click.Group):
    """A group that runs `default` when the first argument is not one of its commands, so that
    `profile MODEL ...` and `profile show FILE` both read naturally."""

    default = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Latency-aware structured compression of transformer language models (after ZipLM)."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.call_on_close(show_stages())  # stage lines at every verbosity, other INFO logs behind -v
    if verbose == 0:
        quiet_transformers()


def quiet_transformers() -> None:
    """transformers' warnings only at -v. Set through the variable transformers reads when it is imported,
    so that commands which never need it (--help) do not spend seconds importing it."""
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@cli.group(cls=DefaultCommandGroup, epilog=MODEL_HELP)
def profile() -> None:
    """Profile this machine: `profile MODEL -o TABLE.json`, or `profile show TABLE.json`."""


@profile.command("run", epilog=MODEL_HELP)
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help=BACKEND_HELP)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per call, as deployed.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per sequence (prefill).")
@click.option("--mode", type=click.Choice(["prefill", "decode"]), default="prefill", show_default=True,
              help="prefill: one forward over --seq-len tokens; decode: one new token after --context cached ones.")
@click.option("--context", type=int, default=0, help="KV-cache length for --mode decode.")
@click.option("--threads", type=int, default=None, help="Intra-op threads [default: all cores].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Device to time on.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Weight and activation type (float16 on cuda only).")
@click.option("--ffn-step", type=int, default=default(ProfileSettings, "ffn_step"), show_default=True, help="FFN sizes timed: multiples of this.")
@click.option("--rounds", type=int, default=default(ProfileSettings, "rounds"), show_default=True,
              help="Interleaved repetitions per block.")
@click.option("--estimator", type=click.Choice(ESTIMATORS), default=default(ProfileSettings, "estimator"),
              show_default=True,
              help="Statistic of each block's timings taken as its cost (p10 stays stable on a busy machine).")
@click.option("--retries", type=int, default=default(ProfileSettings, "retries"), show_default=True,
              help="Profile again, up to this many times, while the table fails its trust checks (a noisy machine); "
                   "the soundest is kept.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Latency table to write (JSON).")
def profile_run(model, backend, batch_size, seq_len, mode, context, threads, device, dtype, ffn_step, rounds,
                estimator, retries, output) -> None:
    """Time MODEL's attention, FFN and fixed parts at every pruned size; write a latency table."""
    from . import api

    table = api.profile(model, output=output, backend=backend, batch_size=batch_size, seq_len=seq_len, mode=mode,
                        context=context, threads=threads, device=device, dtype=dtype,
                        ffn_step=ffn_step, rounds=rounds, estimator=estimator, retries=retries)
    median, worst = table.additivity_errors()
    click.echo(f"wrote {output}: dense {table.dense_ms:.2f} ms predicted, fixed part {table.fixed_share:.1%} of it, "
               f"max speedup {table.max_speedup:.2f}x, additivity error median {median:.1%} max {worst:.1%}, "
               f"{table.metadata['profile_seconds']:.0f} s")


@profile.command("show")
@click.argument("table_path", type=click.Path(path_type=Path))
def profile_show(table_path) -> None:
    """Print the latency table TABLE_PATH (written by `profile MODEL -o`)."""
    from .table import LatencyTable

    click.echo(LatencyTable.load(table_path).describe())


@cli.command(epilog=MODEL_HELP)
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--profile", "table", type=click.Path(path_type=Path), required=True, help="Latency table (profile -o).")
@click.option("--targets", required=True, help=TARGETS_HELP)
@click.option("--calib", "calibration", required=True, help="Calibration data: text, STS-B or GLUE TSV file.")
@click.option("--method", type=click.Choice(METHODS), default=default(CompressSettings, "method"),
              show_default=True, help="ziplm, or a baseline planned on the same table and budgets.")
@click.option("--num-samples", type=int, default=default(CompressSettings, "num_samples"), show_default=True, help="Calibration samples for the Hessians.")
@click.option("--seed", type=int, default=default(CompressSettings, "seed"), show_default=True,
              help="Seed of the calibration sample and the search.")
@click.option("--calibration-inputs", type=click.Choice(CALIBRATION_INPUTS),
              default=default(CompressSettings, "calibration_inputs"), show_default=True,
              help="dense: members' OBS weights from the dense model's inputs; sequential: members re-pruned on "
                   "inputs of the model compressed so far; corrected: the same structures as dense, weights fit "
                   "layer by layer on the compressed model's inputs to the dense model's output.")
@click.option("--block-errors", type=click.Choice(BLOCK_ERRORS), default=default(CompressSettings, "block_errors"),
              show_default=True,
              help="What the search weighs a block's OBS error by: fisher: its Fisher on the calibration loss, so blocks "
                   "compare in loss units; relative: nothing (each block's error relative to its own output).")
@click.option("--search-evaluations", type=int, default=default(CompressSettings, "search_evaluations"),
              show_default=True, help="SPDY: models scored per target.")
@click.option("--score-samples", type=int, default=default(CompressSettings, "score_samples"), show_default=True,
              help="Calibration samples each SPDY candidate is scored on.")
@click.option("--score-on", type=click.Choice(SCORE_ON), default=default(CompressSettings, "score_on"), show_default=True,
              help="held-out: score candidates on calibration samples the Hessians did not see (drawn from the rest of "
                   "--calib); calibration: on the Hessians' own samples.")
@click.option("--verify-rounds", type=int, default=default(CompressSettings, "verify_rounds"), show_default=True,
              help="Interleaved rounds each member is timed in against the dense model (a miss is confirmed with "
                   "twice as many more); raise it on a noisy machine.")
@click.option("--max-replans", type=int, default=default(CompressSettings, "max_replans"), show_default=True,
              help="Re-plans, at a tighter or looser budget, of a member measured outside [0.97, 1.10] x its target.")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX export of each member.")
@click.option("--overwrite", is_flag=True, help="Replace an output directory that holds another family.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Level-database cache [default: $XDG_CACHE_HOME/ziplm-planner, else ~/.cache/ziplm-planner].")
@click.option("--recovery", type=click.Choice(RECOVERY_MODES), default=default(RecoverySettings, "mode"),
              show_default=True, help="none: members as pruned; oneshot: each member pruned from the dense model, then distilled; "
                   "gradual: each member pruned from the last one (re-planned on it), then distilled.")
@click.option("--prune-steps", type=int, default=default(RecoverySettings, "prune_steps"), show_default=True,
              help="Gradual: prune-and-distil steps per member, through intermediate speedups spaced evenly in log "
                   "speedup from the last member's; --train-tokens is split over them.")
@click.option("--train-data", default=None, help="Recovery training text, STS-B or GLUE file [default: --calib].")
@click.option("--train-tokens", type=int, default=default(TrainSettings, "tokens"), show_default=True,
              help="Recovery: real tokens each member is trained on.")
@click.option("--train-batch-size", type=int, default=default(TrainSettings, "batch_size"),
              help=f"Recovery: samples per step on each process [default: {CAUSAL_LM_DEFAULTS.batch_size} for causal "
                   f"LMs, {OTHER_KIND_DEFAULTS.batch_size} for others: about 512 tokens either way].")
@click.option("--train-seq-len", type=int, default=default(TrainSettings, "seq_len"),
              help=f"Recovery: tokens per training sample [default: {PERPLEXITY_SEQ_LEN} for causal LMs (capped at "
                   "the model's positions), the calibration length for others].")
@click.option("--learning-rate", type=float, default=default(TrainSettings, "learning_rate"), show_default=True,
              help="Recovery: AdamW peak learning rate (linear warm-up, then linear decay).")
@click.option("--warmup", type=float, default=default(TrainSettings, "warmup"), show_default=True,
              help="Recovery: share of the steps spent warming up.")
@click.option("--loss-weights", default=None,
              help=f"Recovery: weights of the {', '.join(LOSS_TERMS)} loss terms [default: "
                   f"{default_weights(CAUSAL_LM_DEFAULTS)} for causal LMs, {default_weights(OTHER_KIND_DEFAULTS)} "
                   "for others].")
@click.option("--temperature", type=float, default=default(LossWeights, "temperature"), show_default=True,
              help="Recovery: distillation temperature of the KL term.")
@click.option("--train-precision", type=click.Choice(PRECISIONS), default=default(TrainSettings, "precision"),
              show_default=True, help="Recovery: autocast dtype. auto: bf16 on GPUs that have it and on CPUs with "
                                      "AMX or AVX-512 BF16, fp16 on other GPUs, float32 (no) on other CPUs.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Family directory.")
def compress(model, table, targets, calibration, method, num_samples, seed, calibration_inputs, block_errors,
             search_evaluations, score_samples, score_on, verify_rounds, max_replans, no_onnx, overwrite, cache_dir,
             recovery, prune_steps, train_data, train_tokens, train_batch_size, train_seq_len, learning_rate, warmup,
             loss_weights, temperature, train_precision, output) -> None:
    """Compress MODEL to every speedup target: one pruned model per target, measured to meet it."""
    from . import api

    train = TrainSettings(tokens=train_tokens, batch_size=train_batch_size, seq_len=train_seq_len,
                          learning_rate=learning_rate, warmup=warmup,
                          weights=LossWeights.parse(loss_weights, temperature), precision=train_precision, seed=seed)
    report = api.compress(model, table, targets, calibration, output, method=method, num_samples=num_samples, seed=seed,
                          calibration_inputs=calibration_inputs, block_errors=block_errors,
                          search_evaluations=search_evaluations,
                          score_samples=score_samples, score_on=score_on, verify_rounds=verify_rounds,
                          max_replans=max_replans, onnx=not no_onnx, overwrite=overwrite, cache_dir=cache_dir,
                          recovery=recovery, train_data=train_data, train=train, prune_steps=prune_steps)
    if report is None:  # another process of a distributed run: the main process reports
        return
    click.echo(format_report(report.rows))
    click.echo(f"wrote {output}/ (report.csv, report.json, one folder per member)")


@cli.command("generate-text", epilog=MODEL_FORMS)
@click.argument("model")
@click.option("--prompts", default=None, help="Text file whose windows' first tokens start the samples [default: BOS].")
@click.option("--tokens", type=int, default=default(GenerationSettings, "tokens"), show_default=True,
              help="New tokens to write, prompts not counted.")
@click.option("--seq-len", type=int, default=default(GenerationSettings, "seq_len"), show_default=True,
              help="Tokens per sample, prompt included: the profile's sequence length, as recovery trains on.")
@click.option("--prompt-tokens", type=int, default=default(GenerationSettings, "prompt_tokens"), show_default=True,
              help="Tokens of --prompts text each sample continues.")
@click.option("--batch-size", type=int, default=default(GenerationSettings, "batch_size"), show_default=True,
              help="Samples generated together.")
@click.option("--temperature", type=float, default=default(GenerationSettings, "temperature"), show_default=True,
              help="Sampling temperature; 1 samples the model's own distribution.")
@click.option("--top-p", type=float, default=default(GenerationSettings, "top_p"), show_default=True,
              help="Nucleus sampling; 1 keeps every token.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=default(GenerationSettings, "precision"),
              show_default=True, help="Autocast while sampling, as --train-precision.")
@click.option("--seed", type=int, default=default(GenerationSettings, "seed"), show_default=True, help="Sampling seed.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Text file to write (.txt), for compress --train-data.")
def generate_text(model, prompts, tokens, seq_len, prompt_tokens, batch_size, temperature, top_p, precision, seed,
                  output) -> None:
    """Write recovery training text sampled from MODEL (a causal LM), continuing windows of --prompts, for
    compress --train-data where there is no text to train on. Real in-domain text recovers far more where there
    is some (docs/BENCHMARKS.md)."""
    from .api import generate_text as run

    settings = GenerationSettings(tokens=tokens, seq_len=seq_len, prompt_tokens=prompt_tokens, batch_size=batch_size,
                                  temperature=temperature, top_p=top_p, precision=precision, seed=seed)
    generated = run(model, output, prompts, settings=settings)
    click.echo(f"wrote {len(generated.samples):,} samples, {generated.new_tokens:,} new tokens "
               f"({generated.tokens_per_second:.0f} tokens/s) to {output}")


@cli.command()
@click.argument("family", type=click.Path(path_type=Path))
@click.option("--task", type=click.Choice(["stsb", "classification", "perplexity", "fidelity"]), required=True,
              help="stsb (embedding models), classification (classifiers), perplexity (causal LMs), "
                   "or fidelity to the dense member (any model).")
@click.option("--data", required=True, help="STS-B file, GLUE TSV with labels, or raw text (perplexity, fidelity).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="Score each member's torch model or its model.onnx.")
@click.option("--max-tokens", type=int, default=None, help="Perplexity and fidelity: score at most N tokens of the data.")
def evaluate(family, task, data, backend, max_tokens) -> None:
    """Score the dense reference and every member of FAMILY (a folder written by compress); write the scores
    into its report."""
    from .evaluate import evaluate_family

    scores = evaluate_family(family, task, data, backend=backend, max_tokens=max_tokens)
    for member, value in scores.items():
        click.echo(f"{member:>8} {task} {value:.4f}")
    click.echo(f"scores written to {family}/report.json and report.csv")


@cli.command()
@click.argument("family", type=click.Path(path_type=Path))
@click.option("--rounds", type=int, default=40, show_default=True, help="Interleaved repetitions of every member.")
def verify(family, rounds) -> None:
    """Re-time every member of FAMILY as it ships (its model.onnx on ONNX Runtime, else its torch model)
    against the dense one, on this machine with the family's spec."""
    from .retime import verify_family

    rows = verify_family(family, rounds=rounds)
    click.echo(f"{'member':>8} {'target':>7} {'speedup':>8} {'90% interval':>15} {'median':>7} {'reported':>9}  status")
    for r in rows:
        click.echo(f"{r['folder']:>8} {r['target']:>6.2f}x {r['speedup']:>7.3f}x {r['interval'][0]:>7.3f}-{r['interval'][1]:<7.3f}"
                   f" {r['speedup_median']:>6.3f}x {r['reported_speedup'] or float('nan'):>8.3f}x  {r['status']}")


@cli.command()
@click.argument("families", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="frontier.png (an .svg is written beside it).")
@click.option("--task", default=None, help="Which score to plot when a report has several.")
def plot(families, output, task) -> None:
    """Plot score against measured speedup and latency for every family in FAMILIES (folders written by compress),
    what each member kept, and for recovered families the distillation loss curves."""
    from .plot import plot_frontier, plot_layers, plot_training, read_families, slug

    data = read_families(families)
    written = plot_frontier(data, output, task=task)
    for family in data:
        for kind, draw in (("layers", plot_layers), ("training", plot_training)):
            written += draw(family, output.with_name(f"{output.stem}-{kind}-{slug(family.name)}{output.suffix or '.png'}"))
    click.echo("wrote " + ", ".join(map(str, written)))


@cli.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("ziplm-demo"), show_default=True,
              help="Folder for the table, the family, the texts and the plots.")
@click.option("--targets", default="1.5,2,3", show_default=True, help=TARGETS_HELP)
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="onnxruntime", show_default=True,
              help=BACKEND_HELP)
@click.option("--stsb", default=None, help="An STS-B file (e.g. sts-dev.csv) to score the family on as well.")
def demo(output, targets, backend, stsb) -> None:
    """The whole pipeline on the bundled model with Python's own text: profile, compress, evaluate, plot."""
    import json

    from .pipeline import parse_targets
    from .demo import run_demo

    written = run_demo(output, parse_targets(targets), backend=backend, stsb=stsb)
    click.echo(format_report(json.loads((written["family"] / "report.json").read_text())["members"]))
    click.echo(f"wrote {written['table']}, {written['family']}/ and " + ", ".join(str(p) for p in written["plots"]))


def format_report(rows: list[dict]) -> str:
    tasks = sorted({task for r in rows for task in r.get("scores", {})})
    lines = [f"{'member':>8} {'target':>7} {'predicted':>10} {'measured':>9} {'met':>4} {'params':>11} {'calib loss':>11}"
             + "".join(f" {task:>12}" for task in tasks)]
    for r in rows:
        lines.append(f"{r['folder']:>8} {r['target']:>6.2f}x {r['predicted_speedup']:>9.2f}x {r['measured_speedup']:>8.2f}x "
                     f"{'yes' if r['met_target'] else 'NO':>4} {r['parameters']:>11,} {r['calibration_loss']:>11.5f}"
                     + "".join(f" {r.get('scores', {}).get(task, float('nan')):>12.4f}" for task in tasks))
    return "\n".join(lines)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C inside a command into Abort
        click.echo("interrupted: nothing incomplete was left behind as complete", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
