"""Tasks: what a model predicts, how it is scored, and the data it learns from.

The training engine, the distiller and the run files name no task; they ask the task object that
:func:`get_task` returns (see :class:`cwkd.tasks.base.TaskSpec` for the interface). One file per task:
``classification.py`` and ``segmentation.py``.

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
_MODULES = {Task.classification: ("cwkd.tasks.classification", "Classification"),
            Task.segmentation: ("cwkd.tasks.segmentation", "Segmentation")}


def get_task(name: Task | str | None) -> TaskSpec:
    """The task object for ``name`` (None: classification, what a checkpoint without a task holds)."""
    task = _as_task(name if name is not None else Task.classification)
    module, cls = _MODULES[task]
    return getattr(importlib.import_module(module), cls)()


def infer_task(model: str | None, given: Task | str | None = None, *, other: str | None = None) -> Task:
    """The task of a run: ``given`` when set, else what the model name says (segmentation for
    ``pspnet_*``, ``deeplabv3_*``, ``fcn_*``, ``lraspp_*``, else classification).

    ``other`` (the teacher's name) must agree with ``model`` when both are model names.
    """
    if given is not None:
        return _as_task(given)
    from cwkd.heads import is_segmentation_name

    def of(name: str) -> Task:
        return Task.segmentation if is_segmentation_name(name) else Task.classification

    task = of(model or "")
    if other and not other.endswith((".safetensors", ".pth", ".pt", ".bin")) and of(other) is not task:
        raise ConfigError(f"the teacher {other} is a {of(other).value} model but the student {model} is a "
                          f"{task.value} model; pick two models of one task, or pass --task")
    return task


def _as_task(value: Task | str) -> Task:
    try:
        return Task(value)
    except ValueError:
        raise ConfigError(f"unknown task '{value}'; use one of {', '.join(t.value for t in Task)}") from None


__all__ = ["Task", "get_task", "infer_task"]
