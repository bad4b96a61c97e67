"""COCO box AP and mask AP through pycocotools, an optional extra (``pip install 'cwkd[detection]'``).

Predictions are a torchvision detector's eval-mode outputs, in the coordinates of the images the data
set returned (the detector maps its boxes back itself): boxes xyxy become COCO's xywh, labels ``1..K``
go back to the data set's category ids, masks (``(N, 1, H, W)`` probabilities) are cut at 0.5 and
RLE-encoded. The ground truth is the split's own JSON, crowd regions included, as COCO scores.

Metrics are percentages, named ``box_ap``, ``box_ap50``, ``box_ap75``, ``box_ap_small``, ``box_ap_medium``,
``box_ap_large`` (and ``mask_...`` alike). A size range with no ground-truth object scores NaN (COCOeval's
-1); a model that detects nothing scores 0. After :meth:`CocoScore.compute`, ``per_class`` holds AP per
category (``box_ap``, ``mask_ap``: one list each, in the data set's class order) for ``cwkd eval --per-class``.

Example:
    >>> score = CocoScore(spec.val, masks=True)  # doctest: +SKIP
    >>> for images, targets in loader:
    ...     score.update(model(images), targets)
    >>> score.compute()["box_ap"]
    37.2
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from cwkd.data.transforms import seeded
from cwkd.errors import ConfigError
from cwkd.tasks.base import Scorer
from cwkd.tasks.detection.data import CocoDetection

#: COCOeval's summary, in the order of ``COCOeval.stats`` (its first six).
_STATS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
MASK_THRESHOLD = 0.5


def _pycocotools():
    try:
        from pycocotools import mask as coco_mask
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise ConfigError("COCO AP needs pycocotools, which is not installed; install it with "
                          "`pip install 'cwkd[detection]'`") from exc
    return COCO, COCOeval, coco_mask


class CocoScore:
    """Collects a split's detections, then scores them with COCOeval (``box_*``, and ``mask_*`` if ``masks``)."""

    def __init__(self, dataset: CocoDetection, *, masks: bool = False) -> None:
        self.COCO, self.COCOeval, self.mask_api = _pycocotools()
        self.dataset, self.masks = dataset, masks
        self.results: list[dict] = []
        self.image_ids: set[int] = set()
        self.per_class: dict[str, list[float | None]] = {}  # filled by compute()

    def update(self, outputs: Sequence[dict], targets: Sequence[dict]) -> None:
        """Add one batch: the detector's outputs and the targets they belong to (for ``image_id``)."""
        for output, target in zip(outputs, targets, strict=True):
            image_id = int(target["image_id"])
            self.image_ids.add(image_id)
            self.results += self._convert(output, image_id)

    def _convert(self, output: dict, image_id: int) -> list[dict]:
        boxes = output["boxes"].detach().float().cpu()
        boxes[:, 2:] -= boxes[:, :2]
        scores, labels = output["scores"].detach().float().cpu().tolist(), output["labels"].cpu().tolist()
        ids = self.dataset.category_ids
        rles = self._rles(output["masks"]) if self.masks else None
        results = []
        for i, (box, score, label) in enumerate(zip(boxes.tolist(), scores, labels, strict=True)):
            if not 1 <= label <= len(ids):
                continue  # label 0 (background; RetinaNet can emit it) has no category
            result = {"image_id": image_id, "category_id": ids[label - 1], "bbox": box, "score": score}
            if rles is not None:
                result["segmentation"] = rles[i]
            results.append(result)
        return results

    def _rles(self, masks: torch.Tensor) -> list[dict]:
        binary = (masks.detach().cpu() > MASK_THRESHOLD).reshape(-1, *masks.shape[-2:]).numpy()
        rles = self.mask_api.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # bytes -> str, as COCO's JSON results hold
        return rles

    def compute(self) -> dict[str, float]:
        """COCO AP in percent over the images seen so far; NaN where no ground truth of that size exists."""
        kinds = ("bbox", "segm") if self.masks else ("bbox",)
        if not self.results:
            self.per_class = {f"{_prefix(k)}_ap": [0.0] * len(self.dataset.category_ids) for k in kinds}
            return {f"{_prefix(k)}_{s}": 0.0 for k in kinds for s in _STATS}
        ground_truth = self._ground_truth()
        metrics, self.per_class = {}, {}
        for kind in kinds:
            with contextlib.redirect_stdout(io.StringIO()):  # COCO prints progress and its own table
                detections = ground_truth.loadRes(copy.deepcopy(self.results))
                evaluation = self.COCOeval(ground_truth, detections, kind)
                evaluation.params.imgIds = sorted(self.image_ids)
                evaluation.evaluate()
                evaluation.accumulate()
                evaluation.summarize()
            for name, value in zip(_STATS, evaluation.stats[:len(_STATS)], strict=True):
                metrics[f"{_prefix(kind)}_{name}"] = math.nan if value < 0 else round(float(value) * 100, 4)
            self.per_class[f"{_prefix(kind)}_ap"] = self._class_ap(evaluation)
        return metrics

    def _class_ap(self, evaluation) -> list[float | None]:
        """AP per category (percent, in the data set's class order; None where the split has no such object).

        COCOeval's ``precision`` is [IoU threshold, recall point, category, area, max detections]; AP is its
        mean over thresholds and recall points where it is defined (> -1), at area "all" and 100 detections.
        """
        precision = evaluation.eval["precision"]
        found = {cid: k for k, cid in enumerate(evaluation.params.catIds)}
        values = []
        for cid in self.dataset.category_ids:
            p = precision[:, :, found[cid], 0, -1] if cid in found else np.empty(0)
            p = p[p > -1]
            values.append(round(float(p.mean()) * 100, 4) if p.size else None)
        return values

    def _ground_truth(self):
        """The split's JSON as a pycocotools ``COCO``, with the fields COCOeval needs filled in where absent."""
        data = copy.deepcopy(self.dataset.coco)
        for ann in data["annotations"]:
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        data.setdefault("info", {})
        ground_truth = self.COCO()
        ground_truth.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            ground_truth.createIndex()
        return ground_truth


class DetectionScorer(Scorer):
    """COCO AP (percent, :class:`CocoScore`; ``per_class``: AP per class) and the loss per image, for
    :meth:`~cwkd.tasks.base.TaskSpec.evaluate` over a loader of ``dataset`` (a COCO split, transformed).

    The loss is the train-mode loss dict with BatchNorm and dropout in eval mode, so nothing is updated,
    drawn under a fixed seed (the R-CNNs sample proposals at random), so every evaluation agrees.
    """

    def __init__(self, dataset: Dataset, device: torch.device, *, masks: bool = False) -> None:
        self.device = device
        self.score = CocoScore(_coco_split(dataset), masks=masks)
        self.totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, images

    def running(self) -> contextlib.AbstractContextManager:
        return seeded(0)

    def add(self, model: nn.Module, images: list[torch.Tensor], targets: list[dict], amp) -> None:
        with amp(), _loss_mode(model):
            losses = model(images, targets)
        with amp():
            outputs = model.eval()(images)
        self.score.update(outputs, targets)
        count = float(len(images))
        self.totals += torch.stack([sum(losses.values()).double() * count,
                                    torch.tensor(count, device=self.device, dtype=torch.float64)])

    def reduce(self) -> None:
        dist.all_reduce(self.totals)
        _gather(self.score)

    def result(self) -> dict:
        loss_sum, count = self.totals.tolist()
        return {"loss": loss_sum / max(count, 1.0), **self.score.compute(), "per_class": self.score.per_class,
                "images": int(count)}


def _prefix(kind: str) -> str:
    return "box" if kind == "bbox" else "mask"


@contextlib.contextmanager
def _loss_mode(model: nn.Module):
    """Train mode, so the detector computes its losses, with BatchNorm and dropout in eval mode; eval mode after."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.Dropout):
            module.eval()
    try:
        yield
    finally:
        model.eval()


def _coco_split(dataset: Dataset) -> CocoDetection:
    """The :class:`~cwkd.tasks.detection.data.CocoDetection` under a loader's (transformed) data set."""
    while not isinstance(dataset, CocoDetection):
        if not hasattr(dataset, "base"):
            raise ConfigError("detection scores need a COCO split (cwkd.tasks.detection.data.CocoDetection) "
                              "under the loader")
        dataset = dataset.base
    return dataset


def _gather(score) -> None:
    """Every rank's detections in ``score``, each image once (the distributed sampler repeats a few)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (score.results, sorted(score.image_ids)))
    results, seen = [], set()
    for found, ids in everyone:
        new = set(ids) - seen
        results += [r for r in found if r["image_id"] in new]
        seen |= new
    score.results, score.image_ids = results, seen
