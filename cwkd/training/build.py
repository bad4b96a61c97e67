"""Building a run's pieces from its config, once (:func:`build_pieces`): data, student, teacher, aligners,
loaders, optimizer and checkpoint metadata."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cwkd.choices import Task
from cwkd.core.distiller import FeatureDistiller, Renormalize
from cwkd.data.loading import build_loaders, check_split_sizes, set_epoch
from cwkd.data.transforms import DataConfig, data_config
from cwkd.errors import CheckpointError, ConfigError
from cwkd.files.checkpoint import load_checkpoint, read_metadata, read_state_dict, student_state
from cwkd.files.metadata import CheckpointMeta
from cwkd.files.weights import load_state_checked, looks_like_path
from cwkd.runtime import Dist, autocast
from cwkd.tasks import can_teach, get_task, infer_task, is_model_name, shape_of_weights
from cwkd.tasks.base import TaskSpec
from cwkd.training.config import TrainConfig
from cwkd.training.console import RunConsole
from cwkd.training.optim import Stepper
from cwkd.training.rundir import RunDir, run_metadata
from cwkd.training.teachercheck import TeacherSource, check_teacher, recorded_score
from cwkd.training.tracking import Tracking

if TYPE_CHECKING:  # only its type is needed here
    from cwkd.data.spec import DataSpec


def is_checkpoint_path(value: str) -> bool:
    """True when a --teacher value is a path (meant as a cwkd checkpoint) rather than a timm model name.

    Anything path-like counts, existing or not, so a typo or a run directory is reported as such
    instead of as an unknown model; so does a directory whose name is no model's.
    """
    path = Path(value)
    return looks_like_path(value) or path.is_file() or (path.is_dir() and not is_model_name(value))


def check_model_task(name: str, task: Task, *, teacher: bool = False) -> None:
    """Refuse a model name another task owns (``fasterrcnn_*`` under ``--task classification``), naming its task.

    A name no task knows passes: the task's own lookup then says it is unknown (with timm's close names).
    A teacher passes when its task may teach this one (:func:`cwkd.tasks.can_teach`).

    Example:
        >>> check_model_task("pspnet_resnet18", Task.segmentation)
    """
    found = infer_task(name)  # what the name says; classification for any other name
    if found is Task.classification and not is_model_name(name):
        return  # unknown to every task
    if found is task or (teacher and can_teach(found, task)):
        return
    kind = f"{'an' if found.value[0] in 'aeiou' else 'a'} {found.value} model"
    if teacher:
        raise ConfigError(f"the teacher '{name}' is {kind} but this run is {task.value}; pick a {task.value} "
                          f"teacher, or pass --task {found.value} with {kind} as the student")
    raise ConfigError(f"'{name}' is {kind} but this run is {task.value}; pass --task {found.value}, or leave "
                      "--task out (the model name sets it)")


def build_student(cfg: TrainConfig, num_classes: int, in_chans: int, input_size: int | None = None, *,
                  restoring: bool = False) -> nn.Module:
    """The student of the run's task: from scratch, pretrained weights, or a local weights file to fine-tune.

    ``input_size`` reaches models that resize their own input (detectors). ``restoring``: a resumed run's saved
    state is about to replace every weight, so the starting weights are not fetched or read again.
    """
    task = get_task(cfg.task)
    check_model_task(cfg.student, task.name)
    start = not restoring
    return task.build_model(cfg.student, num_classes=num_classes, in_chans=in_chans,
                            pretrained=cfg.student_pretrained and start,
                            weights=cfg.student_weights if start else None, new_head=True,
                            input_size=input_size,
                            backbone_weights=cfg.student_backbone_weights if start else None)


def teacher_in_chans(cfg: TrainConfig) -> int | None:
    """The input channels a teacher checkpoint was trained with, if the teacher is one."""
    if cfg.teacher and is_checkpoint_path(cfg.teacher):
        return _teacher_checkpoint(cfg.teacher, header_only=True)[1].in_chans
    return None


def _teacher_checkpoint(path: str, header_only: bool = False) -> tuple[dict, CheckpointMeta]:
    """A --teacher checkpoint; other weight files get the advice to use --teacher-weights."""
    if Path(path).is_dir():
        found = [p for p in (Path(path) / "best.safetensors", Path(path) / "last.safetensors") if p.is_file()]
        example = found[0] if found else Path(path) / "best.safetensors"
        raise CheckpointError(f"--teacher {path} is a directory; pass its {example.name} (e.g. --teacher {example})"
                              + ("" if found else "; it has no checkpoint yet: train the teacher first"))
    if not Path(path).exists():
        raise CheckpointError(f"teacher checkpoint file {path} does not exist; pass a .safetensors file from "
                              "`cwkd train` or a timm model name")
    hint = f"for other weights pass --teacher MODEL_NAME --teacher-weights {path}"
    if header_only:
        return {}, read_metadata(path, plain_hint=hint)
    return load_checkpoint(path, plain_hint=hint)


def build_teacher(cfg: TrainConfig, num_classes: int, in_chans: int) -> tuple[nn.Module, TeacherSource]:
    """The frozen teacher and a short description of where its weights came from.

    Accepts a cwkd checkpoint, a timm name with ``--teacher-weights FILE``, or a timm name with
    pretrained weights. A randomly initialised teacher is refused unless explicitly allowed.
    The description's ``mean`` and ``std`` are the input statistics the teacher expects: the
    checkpoint's own, or timm's config for the model otherwise.
    """
    assert cfg.teacher is not None
    task = get_task(cfg.task)
    if is_checkpoint_path(cfg.teacher):
        model, source, teacher_classes, teacher_chans = _checkpoint_teacher(cfg.teacher, task)
    else:
        check_model_task(cfg.teacher, task.name, teacher=True)
        name = task.resolve_name(cfg.teacher)
        if not (cfg.teacher_weights or cfg.teacher_pretrained or cfg.allow_random_teacher):
            raise ConfigError(
                f"teacher '{name}' has no weights: pass --teacher-weights FILE, --teacher-pretrained "
                "(needs the Hugging Face hub), or a checkpoint from `cwkd train`; "
                "--allow-random-teacher distils from random weights (for testing only)"
            )
        if cfg.teacher_weights:  # built with the head the weights have; a mismatch is caught below
            _refuse_cwkd_checkpoint(cfg.teacher_weights)
            model = _with_weights(task, name, cfg.teacher_weights, in_chans) if task.timm_models else \
                task.build_model(name, num_classes=num_classes, in_chans=in_chans, weights=cfg.teacher_weights)
        elif cfg.teacher_pretrained:  # a classifier keeps its pretrained head; a dense model gets fresh heads
            model = task.build_model(name, num_classes=None if task.timm_models else num_classes, in_chans=in_chans,
                                     pretrained=True)
        else:
            model = task.build_model(name, num_classes=num_classes, in_chans=in_chans)
        stats = data_config(model, in_chans=in_chans)
        source = TeacherSource(model=name, weights=cfg.teacher_weights or
                               ("pretrained" if cfg.teacher_pretrained else "random"),
                               mean=tuple(stats.mean), std=tuple(stats.std))
        teacher_classes, teacher_chans = _num_classes(model), in_chans
    where = cfg.teacher if source.checkpoint else cfg.teacher_weights or f"timm's {source.weights} {source.model}"
    _refuse_nonfinite_teacher(model, where)
    if teacher_classes != num_classes:
        raise ConfigError(
            f"the teacher predicts {teacher_classes} classes but the data has {num_classes}; fine-tune it "
            f"first with `cwkd train --model {source.model} --data {cfg.data} ...` and pass that checkpoint"
        )
    if teacher_chans != in_chans:
        raise ConfigError(
            f"the teacher takes {teacher_chans} input channels but the student gets {in_chans}; "
            f"pass --in-chans {teacher_chans}"
        )
    return model.eval().requires_grad_(False), source


def _refuse_nonfinite_teacher(model: nn.Module, where: str) -> None:
    """A teacher with NaN/inf weights makes every feature loss non-finite: refuse it, by name, as it loads."""
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"the teacher's weights in {where} are non-finite ({len(bad)} tensor(s), e.g. {bad[0]}); "
                              "the run that trained it diverged: pass an earlier checkpoint of it, or train it again "
                              "with a lower --lr")


def _checkpoint_teacher(path: str, task: TaskSpec) -> tuple[nn.Module, TeacherSource, int, int]:
    """A teacher from a cwkd checkpoint of ``task``: its model, source, classes and input channels."""
    tensors, meta = _teacher_checkpoint(path)
    if not can_teach(get_task(meta.task).name, task.name):
        raise ConfigError(f"--teacher {path} is a {get_task(meta.task).name.value} checkpoint "
                          f"but this run is {task.name.value}; pass a teacher trained for "
                          f"{task.name.value} (or --task)")
    model = get_task(meta.task).build_model(meta.model, num_classes=meta.num_classes, in_chans=meta.in_chans)
    load_state_checked(model, student_state(tensors), f"the tensors in {path}",
                       hint="they do not match the checkpoint's own metadata; the file is damaged or edited")
    source = TeacherSource(checkpoint=str(path), model=meta.model, mean=meta.mean, std=meta.std)
    return model, source, meta.num_classes, meta.in_chans


def _refuse_cwkd_checkpoint(path: str) -> None:
    """A cwkd checkpoint given as --teacher-weights: say to pass it as --teacher, which reads its metadata.

    Why not load it anyway: --teacher is the one way a checkpoint teacher is recorded and resumed, and
    its metadata (classes, channels, input statistics) is what makes the teacher see the right input.
    """
    try:
        meta = read_metadata(path)
    except CheckpointError:
        return  # not a cwkd checkpoint (or unreadable): loaded, and reported, as plain weights
    raise ConfigError(f"{path} is a cwkd checkpoint (of {meta.model}); pass it as --teacher {path} "
                      "and drop --teacher-weights")


def _with_weights(task: TaskSpec, name: str, path: str, in_chans: int) -> nn.Module:
    """Build ``name`` (a plain timm model of ``task``) with the class count the weights file has, then load it."""
    classes, _ = shape_of_weights(name, read_state_dict(path), in_chans)
    return task.build_model(name, num_classes=classes, in_chans=in_chans, weights=path)


def _num_classes(model: nn.Module) -> int:
    value = getattr(model, "num_classes", None)
    if isinstance(value, int):
        return value
    raise ConfigError("cannot tell how many classes the teacher predicts; use a timm model or a checkpoint")


@dataclass(frozen=True)
class RunContext:
    """Where a run happens: its directory (written by rank 0 only), its device, its process and its console."""

    dir: RunDir
    device: torch.device
    rank: Dist
    console: RunConsole


@dataclass
class Pieces:
    """Everything a run's loop uses, built once by :func:`build_pieces` (the nanoGPT-style setup block)."""

    task: TaskSpec
    spec: DataSpec                   # the task's data (splits, classes, channels)
    dcfg: DataConfig                 # the student's input: size, mean, std, interpolation, crop
    distiller: FeatureDistiller      # student + aligners (+ frozen teacher): the one trainable module
    model: nn.Module                 # the distiller, or its DDP wrapper
    train_loader: object
    val_loader: object
    stepper: Stepper                 # optimizer, schedule, fp16 loss scaler
    autocast: Callable[[], torch.autocast]  # built once per run; call it around a forward pass
    channels_last: bool              # the memory format of batches (on CUDA)
    meta: CheckpointMeta             # checkpoint metadata
    tracking: Tracking = field(default_factory=Tracking)  # --log: TensorBoard, wandb, trackio (none by default)


def build_pieces(cfg: TrainConfig, ctx: RunContext) -> Pieces:
    """Data, models, loaders and optimizer; the run directory is prepared once they all loaded.

    A new run's config.json is written last (``cfg`` then holds what ``--alpha auto`` picked).
    """
    task = get_task(cfg.task)
    if cfg.kd_weight > 0 and task.logits is None:
        raise ConfigError(f"--kd-weight {cfg.kd_weight:g}: logit KD needs class logits, and {task.name.value} "
                          "models have none; drop --kd-weight (feature distillation works as it is)")
    spec = task.load_data(cfg.data, root=cfg.data_root, download=cfg.download, skip_corrupt=cfg.skip_corrupt)
    check_split_sizes(spec, ctx.rank.world)
    in_chans = cfg.in_chans or teacher_in_chans(cfg) or spec.channels
    if spec.modes is not None:
        ctx.console.info(spec.modes.describe(in_chans))
    distiller, dcfg, teacher_source = _distiller(cfg, task, spec, in_chans, ctx)
    student = "student" if distiller.teacher is not None else "model"  # plain training has no student
    for who, part in ((student, distiller.student), ("teacher", distiller.teacher)):
        if getattr(part, "cwkd_body", None) is not None:  # a dense model's backbone started from a classifier
            ctx.console.info(f"{who}: {part.cwkd_body.line()}")
    model: nn.Module = distiller
    if ctx.rank.enabled:
        model = DistributedDataParallel(distiller, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                        find_unused_parameters=task.ddp_find_unused)
    train_loader, val_loader = build_loaders(spec, dcfg, batch_size=cfg.batch_size, workers=cfg.workers,
                                             device=ctx.device, distributed=ctx.rank.enabled, seed=cfg.seed,
                                             datasets=task.datasets(spec, dcfg), collate=task.collate)
    teacher_source = recorded_score(ctx.dir.path, teacher_source) if ctx.dir.resuming else check_teacher(
        cfg, task, distiller, teacher_source, val_loader, spec.num_classes, ctx.device, ctx.rank, ctx.console)
    ctx.dir.prepare(cfg)  # after the teacher check: a refused teacher leaves --out as it was
    if cfg.alpha == "auto":  # a resumed run has the number its first start picked, and never probes again
        _auto_alpha(cfg, task, distiller, train_loader, ctx)
    p = Pieces(task=task, spec=spec, dcfg=dcfg, distiller=distiller, model=model, train_loader=train_loader,
               val_loader=val_loader, stepper=Stepper.build(distiller, cfg, len(train_loader), ctx.device),
               autocast=autocast(ctx.device, cfg.precision), channels_last=ctx.device.type == "cuda",
               meta=run_metadata(cfg, distiller, dcfg, spec, in_chans, teacher_source))
    if not ctx.dir.resuming:  # a resumed run keeps the config.json of its first start
        ctx.dir.write_config(cfg, distiller, dcfg, spec, teacher_source, ctx.device)
    return p


def _auto_alpha(cfg: TrainConfig, task: TaskSpec, distiller: FeatureDistiller, loader, ctx: RunContext) -> None:
    """``--alpha auto``: measure the first batches (no weight changes) and run with the number picked.

    ``cfg`` is this run's own copy: the number and ``alpha_auto`` go into config.json and the checkpoints.
    """
    from cwkd.core.autoalpha import BATCHES, pick_alpha

    seed_all(cfg.seed)
    set_epoch(loader, cfg.seed, 0)  # the first batches of epoch 0, whatever the loader drew before
    memory_format = torch.channels_last if ctx.device.type == "cuda" else torch.contiguous_format
    batches = (task.batch_to(b, ctx.device, memory_format) for b in itertools.islice(loader, BATCHES))
    picked = pick_alpha(distiller, batches, autocast=autocast(ctx.device, cfg.precision))
    cfg.alpha, cfg.alpha_auto = picked.alpha, True
    ctx.console.info(picked.line())


def _distiller(cfg: TrainConfig, task: TaskSpec, spec, in_chans: int,
               ctx: RunContext) -> tuple[FeatureDistiller, DataConfig, TeacherSource | None]:
    """Student, teacher and aligners in one module on the run's device; also the input config and teacher source.

    A resumed run that saved a state.pt builds its student without the starting weights: the state replaces them.
    """
    device, restoring = ctx.device, ctx.dir.resuming and (ctx.dir.path / "state.pt").is_file()
    size = cfg.input_size or task.default_input_size(spec)
    student = build_student(cfg, spec.num_classes, in_chans, input_size=size, restoring=restoring)
    teacher, teacher_source = build_teacher(cfg, spec.num_classes, in_chans) if cfg.uses_teacher else (None, None)
    dcfg = data_config(student, input_size=size, in_chans=in_chans, native_size=spec.native_size, mean=cfg.mean,
                       std=cfg.std)
    # Batches are normalised for the student; a teacher trained on other statistics gets them remapped.
    teacher_input = Renormalize.between((dcfg.mean, dcfg.std), (teacher_source.mean, teacher_source.std)) \
        if teacher is not None else None
    distiller = FeatureDistiller(
        teacher, student, pairs=cfg.pairs, method=cfg.method, alpha=cfg.alpha, hidden=cfg.hidden,
        input_size=dcfg.input_size, reduction=cfg.reduction, kd_weight=cfg.kd_weight,
        kd_temperature=cfg.kd_temperature, label_smoothing=cfg.label_smoothing, teacher_input=teacher_input,
        task=task, **cfg.method_options,
    )
    if device.type == "cuda":
        distiller.to(device, memory_format=torch.channels_last)
    else:
        distiller.to(device)
    if cfg.compile:  # compile in place: the module objects stay, so the feature hooks still fire
        distiller.student.compile()
        if teacher is not None:
            teacher.compile()
    return distiller, dcfg, teacher_source


def seed_all(seed: int, *mix: int) -> None:
    """Seed torch (every device) and Python from ``seed``, mixed with ``mix`` (epoch, step, rank)."""
    for value in mix:
        seed = (seed * 1_000_003 + value) % 2**63
    random.seed(seed)
    torch.manual_seed(seed)
