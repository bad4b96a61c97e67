"""Segmentation scores from a confusion matrix: mIoU, pixel accuracy and per-class IoU.

Pixels labelled 255 ("ignore") are left out. The mean IoU averages over the classes that appear in
the ground truth or the prediction (a class absent from both has no IoU, not an IoU of 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cwkd.tasks.base import Scorer
from cwkd.tasks.segmentation.data import IGNORE_INDEX


class SegmentationScore:
    """A running ``num_classes`` x ``num_classes`` confusion matrix (rows: true class, columns: predicted).

    Example:
        >>> score = SegmentationScore(3)
        >>> score.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 255]]))
        >>> score.compute()["miou"]
        100.0
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``predicted`` class indices (or ``(N, C, H, W)`` logits) against ``target`` indices."""
        if predicted.ndim == target.ndim + 1:
            predicted = predicted.argmax(dim=1)
        keep = target != IGNORE_INDEX
        index = target[keep].long() * self.num_classes + predicted[keep].long()
        self.counts += torch.bincount(index, minlength=self.num_classes ** 2).view(self.num_classes, -1)

    def compute(self) -> dict[str, float | list[float | None]]:
        """``miou`` and ``pixel_acc`` in percent, and ``iou`` per class (None where the class never appears)."""
        counts = self.counts.double()
        hits = counts.diag()
        union = counts.sum(0) + counts.sum(1) - hits
        iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))
        present = ~iou.isnan()
        total = counts.sum()
        return {
            "miou": 100 * iou[present].mean().item() if present.any() else 0.0,
            "pixel_acc": 100 * (hits.sum() / total).item() if total > 0 else 0.0,
            "iou": [None if v != v else 100 * v for v in iou.tolist()],
        }


class SegmentationScorer(Scorer):
    """mIoU, pixel accuracy and per-class IoU (``iou``) of the ``out`` logits, and the mean cross-entropy per
    labelled pixel; the classes are the logits'."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.score: SegmentationScore | None = None  # made at the first batch, which says the number of classes
        self.totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, images

    def add(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, amp) -> None:
        with amp():
            logits = model(images)["out"].float()
        self.score = self.score or SegmentationScore(logits.shape[1], self.device)
        self.score.update(logits, targets)
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        self.totals += torch.stack([loss.double(), torch.tensor(float(len(images)), device=self.device).double()])

    def reduce(self) -> None:
        if self.score is not None:  # nothing scored: result() says so without summing
            dist.all_reduce(self.totals)
            dist.all_reduce(self.score.counts)

    def result(self) -> dict:
        if self.score is None:
            return {"loss": float("nan"), "miou": 0.0, "pixel_acc": 0.0, "iou": [], "images": 0}
        pixels = max(float(self.score.counts.sum()), 1.0)
        loss_sum, images = self.totals.tolist()
        return {"loss": loss_sum / pixels, **self.score.compute(), "images": int(images)}
