"""Building a run's pieces from its config: teacher, student and checkpoint metadata."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cwkd import __version__
from cwkd.choices import Task
from cwkd.data.loading import data_config
from cwkd.errors import CheckpointError, ConfigError
from cwkd.files.checkpoint import load_checkpoint, read_metadata, read_state_dict, student_state
from cwkd.files.metadata import CheckpointMeta
from cwkd.files.weights import load_state_checked, looks_like_path
from cwkd.tasks import can_teach, get_task, infer_task, is_model_name, shape_of_weights
from cwkd.training.config import TrainConfig
from cwkd.training.teachercheck import TeacherSource

if TYPE_CHECKING:  # only their types are needed here
    from cwkd.core.distiller import FeatureDistiller
    from cwkd.data.loading import DataConfig
    from cwkd.data.spec import DataSpec
    from cwkd.tasks.base import TaskSpec


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
            model = _with_weights(name, cfg.teacher_weights, in_chans) if task.has_logits else \
                task.build_model(name, num_classes=num_classes, in_chans=in_chans, weights=cfg.teacher_weights)
        elif cfg.teacher_pretrained:  # a classifier keeps its pretrained head; a dense model gets fresh heads
            model = task.build_model(name, num_classes=None if task.has_logits else num_classes, in_chans=in_chans,
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


def _with_weights(name: str, path: str, in_chans: int) -> nn.Module:
    """Build ``name`` with the classifier size the weights file has, then load it."""
    classes, _ = shape_of_weights(name, read_state_dict(path), in_chans)
    return get_task(Task.classification).build_model(name, num_classes=classes, in_chans=in_chans, weights=path)


def _num_classes(model: nn.Module) -> int:
    value = getattr(model, "num_classes", None)
    if isinstance(value, int):
        return value
    raise ConfigError("cannot tell how many classes the teacher predicts; use a timm model or a checkpoint")


def run_metadata(cfg: TrainConfig, distiller: FeatureDistiller, dcfg: DataConfig, spec: DataSpec, in_chans: int,
                 teacher_source: TeacherSource | None) -> CheckpointMeta:
    """What every checkpoint of a run carries so it can be evaluated and exported on its own."""
    return CheckpointMeta(
        model=getattr(distiller.student, "cwkd_name", cfg.student),
        num_classes=spec.num_classes,
        in_chans=in_chans,
        input_size=tuple(dcfg.input_size),
        mean=tuple(float(v) for v in dcfg.mean),
        std=tuple(float(v) for v in dcfg.std),
        interpolation=dcfg.interpolation,
        crop_pct=float(dcfg.crop_pct),
        pairs=tuple(distiller.describe()),
        method=cfg.method.value,
        alpha=cfg.alpha,
        alpha_auto=cfg.alpha_auto,
        **{k: getattr(v, "value", v) for k, v in cfg.method_options.items()},
        task=cfg.task.value,
        dataset=spec.name,
        classes=tuple(spec.classes),
        cwkd_version=__version__,
        kind="distill",
        teacher=teacher_source.model if teacher_source else None,
        teacher_metric=teacher_source.metric if teacher_source else None,
        teacher_score=teacher_source.score if teacher_source else None,
        backbone_weights=cfg.student_backbone_weights or ("pretrained" if cfg.student_pretrained and
                                                          not cfg.student_weights else None),
    )
