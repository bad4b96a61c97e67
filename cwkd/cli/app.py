"""The ``cwkd`` command line. Each command parses options, builds one typed config and calls one
library function; errors from the library become one clean line and exit code 1.

This module imports nothing that loads torch or timm: commands import the library inside their
bodies, so ``cwkd --help`` and ``cwkd --version`` start in a fraction of a second.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from cwkd import __version__
from cwkd.choices import ExportFormat, Method, MgdMask, Optimizer, Precision, Reduction, Split
from cwkd.cli.faults import ignore_sigint, one_line_errors, set_debug
from cwkd.cli.options import (
    BackboneWeights,
    BatchSize,
    ClipGrad,
    Compile,
    Data,
    DataRoot,
    Device,
    Download,
    Epochs,
    InChans,
    InputSize,
    Log,
    Lr,
    Mean,
    Opt,
    Out,
    Overwrite,
    Prec,
    Quiet,
    Resume,
    Seed,
    SkipCorrupt,
    SkipNonfinite,
    Smoothing,
    Std,
    StudentPretrained,
    TaskOpt,
    Warmup,
    WeightDecay,
    Workers,
    train_config,
)
from cwkd.training.config import TrainConfig

app = typer.Typer(
    name="cwkd", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Channel-wise feature knowledge distillation: train a small student to mimic a big teacher.",
)


def _apply_config(ctx: typer.Context, value: str | None) -> str | None:
    """``--config``: eager, so the file's values become the defaults before click reads the other options."""
    if value:
        with one_line_errors():
            from cwkd.training.configfile import command_defaults

            command = {"train": train, "distill": distill}[ctx.info_name]
            ctx.default_map, notes = command_defaults(ctx.info_name, command, value)
        for note in notes:
            typer.echo(f"note: {note}", err=True)
    return value


ConfigOpt = Annotated[str | None, typer.Option(
    "--config", is_eager=True, callback=_apply_config,
    help="Take the options' defaults from a YAML file, a run's config.json, or recipe:NAME (cwkd recipes); "
         "options on the command line win.")]


def _print_version(value: bool) -> None:
    """``--version``: eager, so it runs before click asks for a command."""
    if value:
        typer.echo(f"cwkd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option(help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    set_debug(debug)


@app.command()
def inspect(
    model: Annotated[str | None, typer.Argument(help="A timm model name (aliases such as mobilenetv1 work).")]
    = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher model: show the proposed pairs.")] = None,
    student: Annotated[str | None, typer.Option(help="Student model: show the proposed pairs.")] = None,
    pairs: Annotated[str, typer.Option(help="last, all, or STUDENT_LAYER:TEACHER_LAYER,...")] = "last",
    method: Annotated[Method, typer.Option(help="Aligner whose cost is reported.")] = Method.cwt,
    hidden: Annotated[int | None, typer.Option(help="Aligner hidden width. (default: teacher channels)")]
    = None,
    input_size: InputSize = None,
    in_chans: Annotated[int | None, typer.Option(help="Input channels. (default: 3)")] = None,
    all_layers: Annotated[bool, typer.Option("--all", help="List every layer, not just the top two levels.")]
    = False,
    task: TaskOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List a model's hookable layers, or the layer pairs for a teacher and a student."""
    from cwkd.cli import report
    from cwkd.files.strict_json import json_text
    from cwkd.inspection import inspect_model, propose_pairs

    with one_line_errors():
        if teacher or student:
            if not (teacher and student) or model:
                raise typer.BadParameter("give MODEL alone, or both --teacher and --student")
            result = propose_pairs(teacher, student, pairs=pairs, method=method, hidden=hidden,
                                   input_size=input_size, in_chans=in_chans, task=task)
            typer.echo(json_text(result, indent=2)) if as_json else report.print_pairs(result)
            return
        if not model:
            raise typer.BadParameter("give a MODEL name, or --teacher and --student")
        layers, size = inspect_model(model, input_size=input_size, in_chans=in_chans, task=task)
        if as_json:
            typer.echo(json_text({"model": model, "input_size": list(size),
                                   "layers": [layer.to_dict() for layer in layers]}, indent=2))
        else:
            report.print_layers(model, layers, size, all_layers=all_layers)


def _run(cfg: TrainConfig, resume: str | None, options: dict | None) -> None:
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    if main_thread:  # the first Ctrl-C of start-up stops it; one more while it unwinds is ignored
        signal.signal(signal.SIGINT, _interrupt_once)
    try:
        with one_line_errors(resume or cfg.out, training=True):
            from cwkd.training.engine import run

            run(cfg, resume=resume, resume_options=options)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)  # CliRunner and library callers get their handler back


def _interrupt_once(_signum, _frame) -> None:
    ignore_sigint()
    raise KeyboardInterrupt


@app.command()
def train(
    ctx: typer.Context,
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option("--model", help="The model to train: a timm name, or a "
                                              "segmentation model such as pspnet_resnet18.")] = None,
    task: TaskOpt = None,
    data: Data = "", data_root: DataRoot = None, download: Download = False, skip_corrupt: SkipCorrupt = False,
    pretrained: StudentPretrained = False,
    weights: Annotated[str | None, typer.Option(help="Start from a local weights file (.safetensors or .pth, "
                                                "loaded safely); a classifier for other classes is replaced.")]
    = None,
    backbone_weights: Annotated[str | None, typer.Option(help=BackboneWeights)] = None,
    epochs: Epochs = None, batch_size: BatchSize = 64, lr: Lr = None, weight_decay: WeightDecay = None,
    optimizer: Opt = Optimizer.sgd, warmup_epochs: Warmup = 1.0, label_smoothing: Smoothing = 0.0,
    clip_grad: ClipGrad = None, precision: Prec = Precision.fp32, compile: Compile = False,
    input_size: InputSize = None, in_chans: InChans = None, mean: Mean = None, std: Std = None,
    workers: Workers = "auto", seed: Seed = 0,
    device: Device = "auto", out: Out = None, overwrite: Overwrite = False, resume: Resume = None,
    skip_nonfinite: SkipNonfinite = 0, quiet: Quiet = False, log: Log = None,
) -> None:
    """Train one model without a teacher: a teacher to distil from, or the baseline student."""
    with one_line_errors(resume or out, training=True):  # torch may load here: a Ctrl-C gets the run's line
        cfg, options = train_config(dict(locals()), student=model, method=Method.none, flag="--model")
    _run(cfg, resume, options)


@app.command()
def distill(
    ctx: typer.Context,
    config: ConfigOpt = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher: a timm name, or a checkpoint from "
                                                   "`cwkd train` (.safetensors).")] = None,
    student: Annotated[str | None, typer.Option(help="Student: a timm name (or a segmentation model "
                                                   "such as pspnet_resnet18).")] = None,
    task: TaskOpt = None,
    data: Data = "", data_root: DataRoot = None, download: Download = False, skip_corrupt: SkipCorrupt = False,
    teacher_weights: Annotated[str | None, typer.Option(help="Teacher weights file (.safetensors or "
                                                           ".pth, loaded safely).")] = None,
    teacher_pretrained: Annotated[bool, typer.Option(help="Teacher from timm's pretrained weights "
                                                     "(needs the hub); a segmenter or detector: its "
                                                     "backbone's ImageNet weights, heads fresh.")] = False,
    allow_random_teacher: Annotated[bool, typer.Option(help="Allow an untrained teacher (testing only).")]
    = False,
    teacher_check: Annotated[bool, typer.Option(help="Score the teacher on val as distillation feeds it before "
                                                "training; refuse one near chance or 10+ points below its "
                                                "checkpoint's record.")] = True,
    student_pretrained: StudentPretrained = False,
    student_weights: Annotated[str | None, typer.Option(help="Start the student from a local weights file "
                                                        "(classifier replaced if its size differs).")] = None,
    student_backbone_weights: Annotated[str | None, typer.Option(help=BackboneWeights)] = None,
    method: Annotated[Method, typer.Option(help="cwt (ours), linear (FitNets 1x1), mgd, cwd (channel-wise "
                                           "distillation, Shu et al.), or none (KD only).")] = Method.cwt,
    alpha: Annotated[str, typer.Option(help="Feature-loss weight (mean-MSE form; see docs/method.md), or "
                                            "auto: picked from the first 5 batches' gradients, a quarter of it "
                                            "again if the first epoch diverges (docs/method.md).")]
    = "1.0",
    pairs: Annotated[str, typer.Option(help="last, all, or STUDENT_LAYER:TEACHER_LAYER,...")] = "last",
    hidden: Annotated[int | None, typer.Option(help="Aligner hidden width. (default: teacher channels)")]
    = None,
    reduction: Annotated[Reduction, typer.Option(help="Feature L2: mean over elements, or sum/batch "
                                                 "(the paper's alpha).")] = Reduction.mean,
    kd_weight: Annotated[float, typer.Option(help="Weight of Hinton logit KD added to the loss, per image or "
                                             "per labelled pixel (0: off).")]
    = 0.0,
    kd_temperature: Annotated[float, typer.Option(help="Temperature of the logit KD.")] = 4.0,
    mgd_mask: Annotated[MgdMask | None, typer.Option(help="mgd: mask whole channels or positions. (default: as "
                                                     "MGD's configs: channel for classification, else pixel)")] = None,
    mgd_ratio: Annotated[float | None, typer.Option(help="mgd: share masked. (default: MGD's per task: 0.15 "
                                                    "classification, 0.75 segmentation, 0.45 R-CNNs, 0.65 RetinaNet)")]
    = None,
    cwd_tau: Annotated[float | None, typer.Option(help="cwd: softmax temperature. (default: 1)")] = None,
    epochs: Epochs = None, batch_size: BatchSize = 64, lr: Lr = None, weight_decay: WeightDecay = None,
    optimizer: Opt = Optimizer.sgd, warmup_epochs: Warmup = 1.0, label_smoothing: Smoothing = 0.0,
    clip_grad: ClipGrad = None, precision: Prec = Precision.fp32, compile: Compile = False,
    input_size: InputSize = None, in_chans: InChans = None, mean: Mean = None, std: Std = None,
    workers: Workers = "auto", seed: Seed = 0,
    device: Device = "auto", out: Out = None, overwrite: Overwrite = False, resume: Resume = None,
    skip_nonfinite: SkipNonfinite = 0, quiet: Quiet = False, log: Log = None,
) -> None:
    """Distil a teacher into a student through channel-wise aligned features."""
    with one_line_errors(resume or out, training=True):  # torch may load here: a Ctrl-C gets the run's line
        cfg, options = train_config(dict(locals()), student=student, method=method, flag="--student")
    _run(cfg, resume, options)


@app.command()
def demo(
    fast: Annotated[bool, typer.Option(help="A one-minute smoke run instead of the ~5 minute demo.")] = False,
    out: Annotated[Path, typer.Option(help="Where the three runs are written.")] = Path("runs/demo"),
    seed: Seed = 0,
    workers: Workers = "auto",
) -> None:
    """Offline demo on the bundled data: teacher, baseline student and CWT student, compared."""
    from cwkd.cli.demo import run_demo

    with one_line_errors():
        run_demo(out=out, fast=fast, seed=seed, workers=TrainConfig.parse_workers(workers))


@app.command()
def recipes(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the shipped recipes: `cwkd distill --config recipe:NAME --data DIR` runs one."""
    from rich.console import Console

    from cwkd.files.strict_json import json_text
    from cwkd.training.configfile import list_recipes

    found = list_recipes()
    if as_json:
        typer.echo(json_text([{k: str(v) for k, v in vars(r).items()} for r in found], indent=2))
        return
    # A block per recipe, not a table: four columns of long names folded every cell at 80 columns.
    console = Console(highlight=False)
    console.print("cwkd recipes: use one with --config recipe:NAME (options you type win)")
    for r in found:
        console.print(f"\n[bold]{r.name}[/] ({r.task})\n  {r.teacher} -> {r.student}\n  [dim]from {r.source}[/]")


@app.command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="Run folders (or globs, or a folder of runs such as runs/demo).")],
    baseline: Annotated[list[str] | None, typer.Option(help="Baseline run folders or a glob: adds each setting's "
                                                            "paired difference to the baseline run of the same "
                                                            "seed, with a 95 % t-interval.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Draw the runs' validation curves into this PNG (needs "
                                                   "matplotlib: pip install 'cwkd[plot]').")] = None,
) -> None:
    """One table across runs: model, teacher, method, alpha, pairs, seed, best and final metric, epochs, images/s."""
    from cwkd.cli.report import print_comparison
    from cwkd.compare import compare_runs, plot_curves
    from cwkd.files.strict_json import json_text

    with one_line_errors():
        result = compare_runs(runs, baseline=baseline)
        if plot is not None:
            plot_curves(result, plot)
        typer.echo(json_text(result.to_dict(), indent=2)) if as_json else print_comparison(result)
        for warning in [] if as_json else result.warnings:
            typer.echo(f"warning: {warning}", err=True)
        if plot is not None and not as_json:
            typer.echo(f"curves: {plot}")


@app.command("eval")
def eval_(
    checkpoint: Annotated[str, typer.Argument(help="A cwkd checkpoint (.safetensors), or a timm model name "
                                                   "with --weights.")],
    data: Annotated[str | None, typer.Option(help="Data set or ImageFolder dir (default: the one the "
                                                  "checkpoint was trained on).")] = None,
    weights: Annotated[str | None, typer.Option(help="Weights file for a timm model name (.safetensors "
                                                     "or .pth, loaded safely).")] = None,
    split: Annotated[Split, typer.Option(help="val or train (train images get the val transform).")] = Split.val,
    per_class: Annotated[bool, typer.Option(help="Also show per-class accuracy and the confusion matrix "
                                                 "(segmentation: per-class IoU; detection: per-class box AP, "
                                                 "instance: also mask AP).")] = False,
    task: TaskOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")] = False,
    batch_size: BatchSize = 64, precision: Prec = Precision.fp32, input_size: Annotated[
        int | None, typer.Option(help="Input size for a timm name (default: as `cwkd train` picks).")] = None,
    data_root: DataRoot = None, workers: Workers = "auto", device: Device = "auto",
) -> None:
    """Measure a checkpoint: top-1, top-5, mean loss and images/s on a data set split."""
    from cwkd.cli.report import print_eval
    from cwkd.evaluation import evaluate_checkpoint
    from cwkd.files.strict_json import json_text

    with one_line_errors():
        result = evaluate_checkpoint(checkpoint, weights=weights, data=data, data_root=data_root, split=split,
                                     batch_size=batch_size, workers=TrainConfig.parse_workers(workers), device=device,
                                     precision=precision,
                                     per_class=per_class, input_size=input_size, task=task)
        typer.echo(json_text(result.to_dict())) if as_json else print_eval(result)


@app.command("export")
def export_(
    checkpoint: Annotated[str, typer.Argument(help="A cwkd checkpoint (.safetensors).")],
    format: Annotated[ExportFormat, typer.Option("--format", help="safetensors (plain timm or "
                                                 "torchvision), onnx (a detector's: one image in, its detections out), "
                                                 "torchscript (not for detectors) or hf (a Hugging Face folder "
                                                 "timm.create_model loads; classifiers).")] = ExportFormat.safetensors,
    out: Annotated[str | None, typer.Option(help="File to write (default: next to the checkpoint, "
                                                 "e.g. best.onnx).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    verify: Annotated[bool, typer.Option(help="Fail unless the export matches PyTorch to --atol on random "
                                              "and real images (a detector's: the same detections).")] = False,
    atol: Annotated[float, typer.Option(help="Largest max-abs output difference --verify accepts, "
                                                        "times max(1, largest |output|).")] = 1e-4,
    benchmark: Annotated[bool, typer.Option(help="Time the export against PyTorch eager (batch 1 and "
                                                 "8; a detector: 1), on real images with --verify.")] = True,
    data: Annotated[str | None, typer.Option(help="Real images for --verify (default: the checkpoint's "
                                                  "data set).")] = None,
    data_root: DataRoot = None,
    task: TaskOpt = None,
    push_to_hub: Annotated[str | None, typer.Option(help="With --format hf: upload the folder to this Hub model "
                                                         "repo (USER/REPO) once written.")] = None,
) -> None:
    """Write the student alone (no aligners, no teacher) as safetensors, ONNX, TorchScript or a Hugging Face folder."""
    from cwkd.export import export_student, print_export

    with one_line_errors():
        result = export_student(checkpoint, format=format, out=out, overwrite=overwrite, verify=verify,
                                benchmark=benchmark, data=data, data_root=data_root, atol=atol, task=task,
                                push_to_hub=push_to_hub)
        print_export(result)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as exc:
        if exc.code == 130:  # interrupted: the interpreter's shutdown must not be interrupted again
            ignore_sigint()
        raise


if __name__ == "__main__":
    main()
