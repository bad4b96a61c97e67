"""What the distiller asks of a task: its loss, its logits for KD, its forward, and where its features are.

:class:`DistillTask` answers as a plain classifier does (cross-entropy on the model's output, which is its
logits); :class:`~cwkd.core.distiller.FeatureDistiller` uses it when given no task. A task of
:mod:`cwkd.tasks` is one too (``TaskSpec`` subclasses it), and so may be any object with these six members.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from cwkd.core.losses import cross_entropy


class FeatureTaps(Protocol):
    """Features a task captures itself: its ``pairs``, and both sides' maps after a student forward.

    ``pop(teacher=True)`` returns ``(student_maps, teacher_maps)`` keyed by the pairs' layer names and
    clears what it held; ``attach``/``detach`` add and remove its hooks.
    """

    pairs: list

    def attach(self) -> None: ...

    def detach(self) -> None: ...

    def pop(self, teacher: bool = True) -> tuple[dict, dict]: ...


class DistillTask:
    """A task as the distiller sees it; these defaults are a plain classifier's. Override what differs.

    Example:
        >>> parts = DistillTask().loss(torch.zeros(2, 3), torch.tensor([0, 1]))
        >>> round(parts["task_loss"].item(), 4)
        1.0986
    """

    def loss(self, outputs, targets, *, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
        """The loss parts: ``task_loss`` (what is optimised) and any parts it sums; here cross-entropy."""
        return cross_entropy(outputs, targets, label_smoothing=label_smoothing)

    def logits(self, outputs) -> torch.Tensor:
        """The class logits that logit KD matches, classes on dim 1: a classifier's output itself.

        A task whose models have none sets ``logits = None``; ``kd_weight`` must then be 0.
        """
        return outputs

    def kd_positions(self, targets) -> torch.Tensor | None:
        """Which positions of :attr:`logits` logit KD counts (a bool tensor of their shape), or None: all."""
        return None

    def forward(self, model: nn.Module, inputs, targets):
        """The model's output on a training batch (a detector takes the targets too, and returns its losses)."""
        return model(inputs)

    def feature_prefix(self, model: nn.Module) -> str:
        """Where ``pairs="last"``/``"all"`` look for stages: ``""`` (the whole model) or a submodule's ``name.``."""
        return ""

    def feature_taps(self, teacher: nn.Module, student: nn.Module, input_size: tuple[int, int, int],
                     pairs) -> FeatureTaps | None:
        """The task's own way to pair and capture features, or None: layers hooked by name (the default)."""
        return None
