"""The commands' shared options: reusable ``Annotated`` option types, and the options of `cwkd train` and
`cwkd distill` turned into one :class:`~cwkd.training.config.TrainConfig`.

Like :mod:`cwkd.cli.app`, this module imports nothing that loads torch or timm.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cwkd.choices import Method, Optimizer, Precision, Task, Tracker
from cwkd.errors import ConfigError
from cwkd.training.config import TrainConfig

# Reusable option types -------------------------------------------------------------------------
Data = Annotated[str, typer.Option("--data", help="ImageFolder dir (train/ + val/), fashion-mnist, "
                                   "fashion-mnist-mini (bundled), cifar10 or cifar100; for segmentation a "
                                   "VOC-style dir or one with train/images + train/masks; for detection/instance a "
                                   "COCO dir (annotations/instances_train2017.json + train2017/, or "
                                   "annotations/instances_train.json + train/).")]
TaskOpt = Annotated[Task | None, typer.Option("--task", help="classification, segmentation, detection or instance "
                                              "(default: inferred from the model name, e.g. pspnet_* is "
                                              "segmentation, fasterrcnn_* detection, maskrcnn_* instance).")]
DataRoot = Annotated[str | None, typer.Option(help="Where to look for fashion-mnist/cifar files "
                                                 "(else $CWKD_DATA, then system paths).")]
Download = Annotated[bool, typer.Option(help="Let torchvision download cifar/fashion-mnist (needs internet).")]
SkipCorrupt = Annotated[bool, typer.Option(help="Skip unreadable images with a warning instead of failing.")]
Epochs = Annotated[int | None, typer.Option(help="Training epochs. (default: 10)")]
BatchSize = Annotated[int, typer.Option(help="Images per step (per process under torchrun).")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate. (default: 0.05 sgd, 1e-3 adamw; "
                                               "detection and instance: 0.005 sgd, 1e-4 adamw)")]
WeightDecay = Annotated[float | None, typer.Option(help="Weight decay. (default: 5e-4 sgd, 0.05 adamw)")]
Opt = Annotated[Optimizer, typer.Option("--optimizer", help="SGD with Nesterov momentum, or AdamW.")]
Warmup = Annotated[float, typer.Option(help="Linear warmup epochs before the cosine decay.")]
Smoothing = Annotated[float, typer.Option(help="Label smoothing for the task loss.")]
ClipGrad = Annotated[float | None, typer.Option(help="Clip the gradient norm to this value.")]
Prec = Annotated[Precision, typer.Option("--precision", help="fp32, autocast bf16/fp16 (fp16 needs CUDA), "
                                         "or auto: the fastest here (bf16 only where native).")]
Compile = Annotated[bool, typer.Option(help="torch.compile the student and teacher.")]
InputSize = Annotated[int | None, typer.Option(help="Input height=width in pixels (default: the model's, "
                                                  "or 32 for 28-32 px data sets; a detector's resize "
                                                  "`min_size`, default the data's image size).")]
InChans = Annotated[int | None, typer.Option(help="Input channels (default: the data's, 1 for gray).")]
Mean = Annotated[str | None, typer.Option(help="Input mean per channel, comma-separated (default: the "
                                         "model's timm config).")]
Std = Annotated[str | None, typer.Option(help="Input std per channel, comma-separated (default: the "
                                        "model's timm config).")]
Workers = Annotated[str, typer.Option(help="Data loader worker processes, or auto: this process's share of the "
                                            "usable cores (divided by the processes under torchrun), at most 16; "
                                            "0 on a single core.")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Out = Annotated[str | None, typer.Option(help="Run directory. (default: runs/<time>-<student>-<pid>)")]
Overwrite = Annotated[bool, typer.Option(help="Replace the run already in --out.")]
Resume = Annotated[str | None, typer.Option(help="Continue the run in this directory with its saved config "
                                             "(--epochs, --workers, --device, --quiet, --skip-corrupt, "
                                             "--skip-nonfinite, --data-root, --download, --[no-]teacher-check, "
                                             "--log may change; --data, --teacher and weights may name a moved "
                                             "copy).")]
SkipNonfinite = Annotated[int, typer.Option(help="Skip up to N steps whose loss is NaN/inf before stopping.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Log = Annotated[list[Tracker] | None, typer.Option("--log", help="Also write each epoch's metrics and the "
                                                   "running losses to tensorboard (RUN/tensorboard/), wandb or "
                                                   "trackio; repeat for several. Off by default; each is an "
                                                   "extra: pip install 'cwkd[tensorboard]'.")]
StudentPretrained = Annotated[bool, typer.Option(help="Start the student from timm's pretrained weights "
                                                 "(needs the Hugging Face hub); a segmenter or detector: its "
                                                 "backbone's ImageNet weights (timm's, or torchvision's "
                                                 "weights_backbone), heads fresh.")]
BackboneWeights = "Start a segmenter's or detector's backbone from a classifier's weights file: a cwkd " \
    "checkpoint, a `cwkd export` student or a timm state dict (.safetensors, .pth); heads fresh, at least 90% of " \
    "the backbone's tensors must match."


def train_config(options: dict, *, student: str | None, method: Method, flag: str) -> tuple[TrainConfig, dict | None]:
    """One TrainConfig from a command's options; for --resume, the options given (checked against the saved config)."""
    resume = options.pop("resume", None)
    if options.pop("config", None) and resume:
        raise ConfigError("--config sets a new run's options, and a resumed run keeps its own; drop --config")
    given = _given(options, options.pop("ctx"))
    options["workers"] = TrainConfig.parse_workers(options["workers"])  # `--workers 4` or `--workers auto`
    if "alpha" in options:  # `--alpha 7` or `--alpha auto`
        options["alpha"] = TrainConfig.parse_alpha(options["alpha"])
    options = {k: v for k, v in options.items() if k != "model"}
    if "pretrained" in options:  # `cwkd train` names them --pretrained / --weights
        options["student_pretrained"] = options.pop("pretrained")
        options["student_weights"] = options.pop("weights")
        options["student_backbone_weights"] = options.pop("backbone_weights")
        given = {{"pretrained": "student_pretrained", "weights": "student_weights",
                  "backbone_weights": "student_backbone_weights"}.get(k, k) for k in given}
    options["student"] = student
    options["log"] = tuple(Tracker(t).value for t in options["log"] or ())
    if resume:  # the options given are checked against the saved config (cwkd.training.resume.load_config)
        return (TrainConfig(data="-", student="-", method=Method.none),
                {k: v for k, v in options.items() if k in given or k == "student" and student})
    if options["epochs"] is None:  # not `or 10`: --epochs 0 must reach the check and fail
        options["epochs"] = 10
    if not student:
        raise typer.BadParameter(f"{flag} is required (or --resume RUN_DIR)", param_hint=flag)
    if not options["data"]:
        raise typer.BadParameter("--data is required", param_hint="--data")
    options.update(method=method)
    return TrainConfig(**options), None


def _given(options: dict, ctx: typer.Context) -> set[str]:
    """The options typed on the command line (or set by the environment), not left at their defaults.

    Asked of click, not found by comparing with the default: `--alpha 1.0` on a run made with 2 is given.
    """
    return {k for k in options if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") not in
            ("DEFAULT", "DEFAULT_MAP")}
