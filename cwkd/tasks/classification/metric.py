"""A classifier's scores: top-1, top-5 and the loss over a loader, and the confusion matrix ``cwkd eval --per-class``
prints, with accuracy per class."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cwkd.tasks.base import Scorer


class ClassificationScorer(Scorer):
    """Top-1, top-5 (percent) and mean cross-entropy, summed in float64 over the batches."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top1, top5, count

    def add(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, amp) -> None:
        with amp():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(targets[:, None])
        self.totals += torch.stack([
            F.cross_entropy(logits, targets, reduction="sum").double(),
            hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
            torch.tensor(float(targets.numel()), device=self.device, dtype=torch.float64),
        ])

    def reduce(self) -> None:
        dist.all_reduce(self.totals)

    def result(self) -> dict:
        loss_sum, top1, top5, count = self.totals.tolist()
        count = max(count, 1.0)
        return {"loss": loss_sum / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count,
                "images": int(count)}


class Confusion:
    """Counts (true, predicted) pairs while :meth:`~cwkd.tasks.base.TaskSpec.evaluate` runs, changing nothing it
    computes.

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
