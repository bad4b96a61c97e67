"""A classifier's per-class scores: the confusion matrix ``cwkd eval --per-class`` prints, and accuracy per class."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class Confusion:
    """Counts (true, predicted) pairs while :func:`cwkd.training.engine.evaluate` runs, changing nothing it computes.

    Why a hook and a tee: the top-1 then comes from the one function that also wrote metrics.jsonl. ``cwkd eval
    --per-class`` uses it (:meth:`cwkd.tasks.base.TaskSpec.per_class_counter`): accuracy per class and the matrix.
    """

    def __init__(self, num_classes: int) -> None:
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self._targets: torch.Tensor | None = None

    def tee(self, loader: Iterable) -> Iterator:
        """Yield the loader's batches, remembering each batch's targets for the hook."""
        for images, targets in loader:
            self._targets = targets
            yield images, targets

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        """A forward hook on ``model`` that reads its predictions, removed on exit."""
        handle = model.register_forward_hook(self._record)
        try:
            yield
        finally:
            handle.remove()

    def _record(self, _module: nn.Module, _args: object, logits: torch.Tensor) -> None:
        pred = logits.float().topk(1, dim=1).indices[:, 0].cpu()
        n = self.counts.shape[0]
        self.counts += torch.bincount(self._targets.cpu() * n + pred, minlength=n * n).view(n, n)

    def per_class(self, classes: list[str]) -> list[dict]:
        """Accuracy (percent) and image count per true class."""
        rows = []
        for i, name in enumerate(classes):
            total = int(self.counts[i].sum())
            correct = int(self.counts[i, i])
            rows.append({"class": name, "images": total, "correct": correct,
                         "top1": 100 * correct / total if total else None})
        return rows
