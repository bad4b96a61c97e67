"""Segmentation scores from a confusion matrix: mIoU, pixel accuracy and per-class IoU.

Pixels labelled 255 ("ignore") are left out. The mean IoU averages over the classes that appear in
the ground truth or the prediction (a class absent from both has no IoU, not an IoU of 0).
"""

from __future__ import annotations

import torch

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
