"""Tasks: what a model predicts, how it is scored, and the data it learns from.

The training engine, the distiller and the run files name no task; they ask the task object that
:func:`get_task` returns (see :class:`cwkd.tasks.base.TaskSpec` for the interface). One folder per task:
``classification/``, ``segmentation/`` and ``detection/`` (detection and instance segmentation), each with its
``task.py``, ``data.py``, ``models.py`` and ``metric.py``. This module is the registry: the rest of the package
reaches a concrete task only through it (``tests/test_layers.py``; docs/architecture.md).

Example:
    >>> task = get_task(infer_task("pspnet_resnet18"))
    >>> task.name.value, task.best_metric
    ('segmentation', 'miou')
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cwkd.choices import Task
from cwkd.errors import ConfigError

if TYPE_CHECKING:
    from cwkd.tasks.base import TaskSpec

#: The module and class of each task, imported on first use (a classifier never loads the others).
_MODULES = {Task.classification: ("cwkd.tasks.classification.task", "Classification"),
            Task.segmentation: ("cwkd.tasks.segmentation.task", "Segmentation"),
            Task.detection: ("cwkd.tasks.detection.task", "Detection"),
            Task.instance: ("cwkd.tasks.detection.task", "Instance")}
#: Tasks whose models may teach another task's: a detector's FPN teaches a Mask R-CNN's, and back.
_TEACHES = {Task.detection: {Task.instance}, Task.instance: {Task.detection}}


def get_task(name: Task | str | None) -> TaskSpec:
    """The task object for ``name`` (None: classification, what a checkpoint without a task holds)."""
    task = _as_task(name if name is not None else Task.classification)
    module, cls = _MODULES[task]
    return getattr(importlib.import_module(module), cls)()


def infer_task(model: str | None, given: Task | str | None = None, *, other: str | None = None) -> Task:
    """The task of a run: ``given`` when set, else what the model name says (segmentation for
    ``pspnet_*``, ``deeplabv3_*``, ``fcn_*``, ``lraspp_*``; detection for ``fasterrcnn_*``, ``retinanet_*``;
    instance segmentation for ``maskrcnn_*``; else classification).

    ``other`` (the teacher's name) must agree with ``model`` when both are model names (a Mask R-CNN
    may teach a Faster R-CNN, and back: see :func:`can_teach`).
    """
    if given is not None:
        return _as_task(given)
    task = _of(model or "")
    if other and not other.endswith((".safetensors", ".pth", ".pt", ".bin")) and not can_teach(_of(other), task):
        raise ConfigError(f"the teacher {other} is a {_of(other).value} model but the student {model} is a "
                          f"{task.value} model; pick two models of one task, or pass --task")
    return task


def can_teach(teacher: Task, student: Task) -> bool:
    """Whether a ``teacher``-task model can teach a ``student``-task one (the same task, or detector to detector)."""
    return teacher is student or teacher in _TEACHES.get(student, ())


def is_model_name(value: str) -> bool:
    """Whether timm knows ``value`` (or the alias it stands for) as a model; paths never are."""
    from cwkd.tasks.classification.models import is_model_name as timm_knows

    return timm_knows(value)


def shape_of_weights(name: str, state: dict, in_chans: int) -> tuple[int | None, int | None]:
    """The classifier size and input channels a timm model ``name``'s weights ``state`` was saved with."""
    from cwkd.tasks.classification.models import shape_of_weights as shape

    return shape(name, state, in_chans)


def _of(name: str) -> Task:
    """The task a model name says."""
    from cwkd.tasks.detection.models import detection_task
    from cwkd.tasks.segmentation.models import is_segmentation_name

    if is_segmentation_name(name):
        return Task.segmentation
    found = detection_task(name)
    return Task(found) if found else Task.classification


def _as_task(value: Task | str) -> Task:
    try:
        return Task(value)
    except ValueError:
        raise ConfigError(f"unknown task '{value}'; use one of {', '.join(t.value for t in Task)}") from None


__all__ = ["Task", "can_teach", "get_task", "infer_task", "is_model_name", "shape_of_weights"]
