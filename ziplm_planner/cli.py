"""Command line: a thin click layer over the Python API. Each command parses, calls one
library function and prints a result; bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, fields, is_dataclass
from pathlib import Path
from typing import get_args, get_type_hints

import click

from . import __version__, api
from .aliases import ALIASES, DEFAULT_MODEL
from .data import check_exists
from .errors import UserError
from .progress import show_stages
from .settings import CLI, CompressSettings, GenerationSettings, Option, ProfileSettings, option_flag
from .spec import BACKENDS, ENCODER_BACKENDS, GGUF_TYPES, InferenceSpec

MODEL_FORMS = (f"MODEL is a Hugging Face model folder or hub id, a .gguf file, or the alias of a bundled model: "
               f"{', '.join(ALIASES)}.")
MODEL_HELP = f"{MODEL_FORMS} Default: {DEFAULT_MODEL}."
TARGETS_HELP = "Speedup targets over the dense model, e.g. 1.5,2,3: one family member each."


# --- settings on the command line: each option is declared once, in its field's metadata (settings.Option) --


def cli_fields(cls) -> Iterator[tuple[type, Field, Option]]:
    """(class, field, option) for every field of `cls` and of its nested settings that has an option, in order."""
    for f in fields(cls):
        if f.metadata.get(CLI):
            yield cls, f, f.metadata[CLI]
        if is_dataclass(f.default_factory):
            yield from cli_fields(f.default_factory)
        elif CLI not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} says neither its option nor PYTHON_ONLY")


def flag(f: Field, option: Option) -> str:
    return option_flag(f.name, option)


def param_name(f: Field, option: Option) -> str:
    """The keyword click passes the flag's value as."""
    return flag(f, option).lstrip("-").replace("-", "_")


def reads_text(f: Field) -> bool:
    """Whether the flag is text its fields parse: --loss-weights, declared by the nested weights."""
    return bool(f.metadata[CLI].parse) or is_dataclass(f.default_factory)


def field_type(cls, f: Field) -> type:
    """The type a flag's value has: text where it is parsed, else the field's (None taken out of an optional one)."""
    if reads_text(f):
        return str
    hint = get_type_hints(cls)[f.name]
    return next((t for t in get_args(hint) if t is not type(None)), hint)


CLICK_TYPES = {int: int, float: float, str: str, Path: click.Path(path_type=Path)}


def click_option(cls, f: Field, option: Option) -> tuple[list[str], dict]:
    """click.option's arguments for the flag `option` declares."""
    kind = field_type(cls, f)
    if kind is bool:  # a flag: it flips the field's default
        return [flag(f, option), param_name(f, option)], dict(is_flag=True, help=option.help)
    if option.default:
        default = option.default
    elif reads_text(f):
        default = None  # left out: the fields keep their defaults
    else:
        default = f.default_factory if f.default is MISSING else f.default  # click calls a factory when needed
    return [flag(f, option), param_name(f, option)], dict(
        type=click.Choice(option.choices) if option.choices else CLICK_TYPES[kind], default=default,
        show_default=option.show_default, help=option.help)


def settings_options(*classes) -> Callable:
    """Decorator: a click option for every flag the fields of `classes` declare, in field order."""
    declared = [click_option(owner, f, option)
                for cls in classes for owner, f, option in cli_fields(cls) if option.help]

    def decorate(command):
        for decls, attrs in reversed(declared):  # click lists options in the reverse order of decoration
            command = click.option(*decls, **attrs)(command)
        return command

    return decorate


def settings_from(cls, flags: dict):
    """`cls` made from click's keyword arguments: a flag left out (None) leaves its fields at their defaults."""
    values = {}
    for f in fields(cls):
        option = f.metadata.get(CLI)
        if is_dataclass(f.default_factory):
            values[f.name] = settings_from(f.default_factory, flags)
        elif option and (value := flags[param_name(f, option)]) is not None:
            values[f.name] = option.parse(value) if option.parse else (
                value != f.default if field_type(cls, f) is bool else value)
    return cls(**values)


# --- commands ------------------------------------------------------------------------------------------


class DefaultCommandGroup(click.Group):
    """A group that runs `default` when the first argument is not one of its commands, so that
    `profile MODEL ...` and `profile show FILE` both read naturally."""

    default = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default, *args]
        return super().parse_args(ctx, args)


VERBOSE = re.compile(r"-v+|--verbose")


class VerboseAnywhereGroup(click.Group):
    """The root group: `-v`, `-vv` and `--verbose` are read wherever they stand before a `--`, so that
    `ziplm-planner compress ... -vv` works as `ziplm-planner -vv compress ...` does. No command has an
    option of its own that these could be."""

    def parse_args(self, ctx, args):
        end = args.index("--") if "--" in args else len(args)
        verbose = [a for a in args[:end] if VERBOSE.fullmatch(a)]
        return super().parse_args(ctx, [*verbose, *(a for a in args[:end] if not VERBOSE.fullmatch(a)), *args[end:]])


@click.group(cls=VerboseAnywhereGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ziplm-planner")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug), before or after the command.")
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


@cli.group(cls=DefaultCommandGroup, epilog=MODEL_HELP, short_help="Time a model on this machine: write or show a table.")
def profile() -> None:
    """Profile this machine: `profile MODEL -o TABLE.json`, or `profile show TABLE.json`."""


@profile.command("run", epilog=MODEL_HELP, short_help="Time MODEL's blocks at every pruned size; write a table.")
@click.argument("model", default=DEFAULT_MODEL)
@settings_options(InferenceSpec, ProfileSettings)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Latency table to write (JSON).")
def profile_run(model, output, **flags) -> None:
    """Time MODEL's attention, FFN and fixed parts at every pruned size; write a latency table."""
    table = api.profile(model, output, spec=settings_from(InferenceSpec, flags),
                        settings=settings_from(ProfileSettings, flags))
    median, worst = table.additivity_errors()
    click.echo(f"wrote {output}: dense {table.dense_ms:.2f} ms predicted, fixed part {table.fixed_share:.1%} of it, "
               f"max speedup {table.max_speedup:.2f}x, additivity error median {median:.1%} max {worst:.1%}, "
               f"{table.metadata['profile_seconds']:.0f} s")


@profile.command("show", short_help="Print a latency table.")
@click.argument("table_path", type=click.Path(path_type=Path))
def profile_show(table_path) -> None:
    """Print the latency table TABLE_PATH (written by `profile MODEL -o`)."""
    from .table import LatencyTable

    click.echo(LatencyTable.load(table_path).describe())


@cli.command(epilog=MODEL_HELP, short_help="Compress MODEL to each speedup target: one member each.")
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--profile", "table", type=click.Path(path_type=Path), required=True, help="Latency table (profile -o).")
@click.option("--targets", required=True, help=TARGETS_HELP)
@click.option("--calib", "calibration", required=True, help="Calibration data: text, STS-B or GLUE TSV file.")
@settings_options(CompressSettings)
@click.option("--overwrite", is_flag=True, help="Replace an output directory that holds another family.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Family directory.")
def compress(model, table, targets, calibration, overwrite, output, **flags) -> None:
    """Compress MODEL to every speedup target: one pruned model per target, measured to meet it."""
    settings = settings_from(CompressSettings, flags)
    check_exists(calibration, "--calib file")  # both before the model loads; their contents are read after
    for path in settings.recovery.train_files:
        check_exists(path, "--train-data file")
    report = api.compress(model, table, targets, calibration, output, settings=settings, overwrite=overwrite)
    if report is None:  # another process of a distributed run: the main process reports
        return
    click.echo(format_report(report.rows))
    click.echo(f"wrote {output}/ (report.csv, report.json, one folder per member)")


@cli.command("generate-text", epilog=MODEL_FORMS, short_help="Sample recovery training text from a causal LM.")
@click.argument("model")
@click.option("--prompts", default=None, help="Text file whose windows' first tokens start the samples [default: BOS].")
@settings_options(GenerationSettings)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Text file to write (.txt), for compress --train-data.")
def generate_text(model, prompts, output, **flags) -> None:
    """Write recovery training text sampled from MODEL (a causal LM), continuing windows of --prompts, for
    compress --train-data where there is no text to train on. Real in-domain text recovers far more where there
    is some (docs/BENCHMARKS.md)."""
    generated = api.generate_text(model, output, prompts, settings=settings_from(GenerationSettings, flags))
    click.echo(f"wrote {len(generated.samples):,} samples, {generated.new_tokens:,} new tokens "
               f"({generated.tokens_per_second:.0f} tokens/s) to {output}")


@cli.command(short_help="Score every member of a family; write it into the report.")
@click.argument("family", type=click.Path(path_type=Path))
@click.option("--task", type=click.Choice(["stsb", "classification", "perplexity", "fidelity"]), required=True,
              help="stsb (embedding models), classification (classifiers), perplexity (causal LMs), "
                   "or fidelity to the dense member (any model).")
@click.option("--data", required=True, help="STS-B file, GLUE TSV with labels, or raw text (perplexity, fidelity).")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True,
              help="Score each member's torch model, its model.onnx, or its model.gguf (llama.cpp).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Perplexity and fidelity: score at most N tokens of the data.")
def evaluate(family, task, data, backend, max_tokens) -> None:
    """Score the dense reference and every member of FAMILY (a folder written by compress); write the scores
    into its report."""
    scores = api.evaluate_family(family, task, data, backend=backend, max_tokens=max_tokens)
    for member, value in scores.items():
        click.echo(f"{member:>8} {task} {value:.4f}")
    click.echo(f"scores written to {family}/report.json and report.csv")


@cli.command(short_help="Re-time a family's members here against the dense one.")
@click.argument("family", type=click.Path(path_type=Path))
@click.option("--rounds", type=click.IntRange(min=2), default=40, show_default=True, help="Interleaved repetitions of every member.")
def verify(family, rounds) -> None:
    """Re-time every member of FAMILY as it ships (its model.onnx on ONNX Runtime, model.gguf on llama.cpp,
    else its torch model) against the dense one, on this machine with the family's spec."""
    rows = api.verify_family(family, rounds=rounds)
    click.echo(f"{'member':>8} {'target':>7} {'speedup':>8} {'90% interval':>15} {'median':>7} {'reported':>9}  status")
    for r in rows:
        click.echo(f"{r['folder']:>8} {r['target']:>6.2f}x {r['speedup']:>7.3f}x {r['interval'][0]:>7.3f}-{r['interval'][1]:<7.3f}"
                   f" {r['speedup_median']:>6.3f}x {r['reported_speedup'] or float('nan'):>8.3f}x  {r['status']}")


@cli.command("export-gguf", short_help="Write model.gguf (llama.cpp) into a decoder family's members.")
@click.argument("family", type=click.Path(path_type=Path))
@click.option("--type", "file_type", type=click.Choice(GGUF_TYPES), default="f16", show_default=True,
              help="Weight type of the 2-D tensors (norms stay float32).")
def export_gguf(family, file_type) -> None:
    """Write each member of FAMILY (a Llama-style decoder family) as model.gguf for llama.cpp: `deci` where
    its layers differ, `llama` where they are alike, with the source GGUF's tokenizer."""
    for path in api.export_gguf(family, file_type):
        click.echo(f"wrote {path}")


@cli.command(short_help="Plot families' scores against measured speedup.")
@click.argument("families", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="frontier.png (an .svg is written beside it).")
@click.option("--task", default=None, help="Which score to plot when a report has several.")
def plot(families, output, task) -> None:
    """Plot score against measured speedup and latency for every family in FAMILIES (folders written by compress),
    what each member kept, and for recovered families the distillation loss curves."""
    written = api.plot_families(families, output, task=task)
    click.echo("wrote " + ", ".join(map(str, written)))


@cli.command(short_help="The whole pipeline on the bundled model, in one folder.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("ziplm-demo"), show_default=True,
              help="Folder for the table, the family, the texts and the plots.")
@click.option("--targets", default="1.5,2,3", show_default=True, help=TARGETS_HELP)
@click.option("--backend", type=click.Choice(ENCODER_BACKENDS), default="onnxruntime", show_default=True,
              help="Runtime the bundled embedding model is deployed on: PyTorch or ONNX Runtime.")
@click.option("--stsb", default=None, help="An STS-B file (e.g. sts-dev.csv) to score the family on as well.")
def demo(output, targets, backend, stsb) -> None:
    """The whole pipeline on the bundled model with Python's own text: profile, compress, evaluate, plot."""
    import json

    from .family import parse_targets
    from .demo import run_demo

    written = run_demo(output, parse_targets(targets), backend=backend, stsb=stsb)
    click.echo(format_report(json.loads((written["family"] / "report.json").read_text())["members"]))
    click.echo(f"wrote {written['table']}, {written['family']}/ and " + ", ".join(str(p) for p in written["plots"]))


def format_report(rows: list[dict]) -> str:
    tasks = sorted({task for r in rows for task in r.get("scores", {})})
    lines = [f"{'member':>8} {'target':>7} {'predicted':>10} {'measured':>10} {'met':>4} {'params':>11} {'calib loss':>11}"
             + "".join(f" {task:>12}" for task in tasks)]
    for r in rows:
        measured = "unverified" if r["measured_speedup"] is None else f"{r['measured_speedup']:.2f}x"
        met = "-" if r["measured_speedup"] is None else "yes" if r["met_target"] else "NO"
        lines.append(f"{r['folder']:>8} {r['target']:>6.2f}x {r['predicted_speedup']:>9.2f}x {measured:>10} "
                     f"{met:>4} {r['parameters']:>11,} {r['calibration_loss']:>11.5f}"
                     + "".join(f" {r.get('scores', {}).get(task, float('nan')):>12.4f}" for task in tasks))
    return "\n".join(lines)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except UserError as err:
        refuse(lambda: click.echo(f"error: {err}", err=True), 2)
    except click.BadParameter as err:  # out of an option's declared range or choices: one line, as the library's
        refuse(lambda: click.echo(f"error: {err.format_message()}", err=True), 2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C inside a command into Abort
        click.echo("interrupted: nothing incomplete was left behind as complete", err=True)
        sys.exit(130)
    except click.ClickException as err:
        refuse(err.show, err.exit_code)


def refuse(show: Callable[[], None], status: int) -> None:
    """Say why this process refuses (`show`) and exit with `status`. Under a launcher of several
    processes (torchrun, accelerate launch) every one refuses alike: the main one's refusals reach the
    others (recovery.py), the argument checks are the same everywhere. The launcher stops the others
    (SIGTERM) as soon as one exits, and would report one exiting with its own refusal as killed: it
    ignores that. Nor does it tear the process group down in the interpreter's exit: with a peer already
    gone, gloo's threads abort there now and then (SIGABRT, seen in CI), so it exits at once."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        show()
        sys.exit(status)
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    show()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
