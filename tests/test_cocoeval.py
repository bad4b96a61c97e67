"""COCO box and mask AP through pycocotools: perfect predictions score 100, wrong classes 0, quietly."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from cwkd.errors import ConfigError
from cwkd.tasks.detection.data import collate_detection, load_coco
from cwkd.tasks.detection.metric import CocoScore
from tests.test_cocodata import coco2017, composited

#: Scoring needs the optional extra (CI installs it through the dev extra); the error without it is tested below.
needs_pycocotools = pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None,
                                       reason="pip install 'cwkd[detection]'")


def _ground_truth_as_predictions(dataset, relabel=lambda labels: labels) -> CocoScore:
    score = CocoScore(dataset, masks=dataset.masks)
    for index in range(len(dataset)):
        _, target = dataset[index]
        output = {"boxes": target["boxes"], "labels": relabel(target["labels"]),
                  "scores": torch.ones(len(target["labels"]))}
        if dataset.masks:
            output["masks"] = target["masks"][:, None].float()  # (N, 1, H, W) as Mask R-CNN returns
        score.update([output], [target])
    return score


@needs_pycocotools
def test_perfect_boxes_and_masks_score_100_and_the_size_ranges_without_objects_are_nan(tmp_path, capsys):
    metrics = _ground_truth_as_predictions(load_coco(composited(tmp_path), masks=True).val).compute()
    for kind in ("box", "mask"):
        assert metrics[f"{kind}_ap"] == metrics[f"{kind}_ap50"] == metrics[f"{kind}_ap75"] == 100.0
    assert metrics["box_ap_small"] == 100.0 and math.isnan(metrics["box_ap_large"])  # 64 px canvases: all small
    assert capsys.readouterr().out == ""  # COCOeval's own prints are swallowed


@needs_pycocotools
def test_non_contiguous_category_ids_map_back_for_scoring(tmp_path):
    metrics = _ground_truth_as_predictions(load_coco(coco2017(tmp_path)).val).compute()
    assert metrics["box_ap"] == 100.0 and "mask_ap" not in metrics


@needs_pycocotools
def test_per_class_ap_follows_the_data_sets_classes_through_non_contiguous_ids(tmp_path):
    val = load_coco(coco2017(tmp_path)).val
    present = sorted({int(label) for index in range(len(val)) for label in val[index][1]["labels"]})
    missed = present[0]  # that class's objects are all missed: it scores 0, the others stay 100
    score = _ground_truth_as_predictions(val, lambda labels: torch.where(labels == missed, 0, labels))
    metrics = score.compute()
    assert score.per_class["box_ap"] == [None if label not in present else 0.0 if label == missed else 100.0
                                         for label in range(1, 11)]  # None: no such object in the split
    assert metrics["box_ap"] == pytest.approx(100.0 * (len(present) - 1) / len(present))


@needs_pycocotools
def test_a_wrong_class_scores_0_and_so_does_detecting_nothing(tmp_path):
    val = load_coco(composited(tmp_path)).val
    assert _ground_truth_as_predictions(val, lambda labels: labels % 10 + 1).compute()["box_ap"] == 0.0
    assert _ground_truth_as_predictions(val, lambda labels: labels * 0).compute()["box_ap"] == 0.0  # background
    empty = CocoScore(val)
    empty.update([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                   "scores": torch.zeros(0)}], [val[0][1]])
    assert empty.compute()["box_ap"] == 0.0


@needs_pycocotools
@pytest.mark.slow
def test_a_real_detector_is_scored_on_the_val_split(tmp_path):
    from cwkd.tasks.detection.models import create_detection_model

    spec = load_coco(composited(tmp_path), masks=True)
    model = create_detection_model("maskrcnn_test_resnet", spec.num_classes, input_size=64).eval()
    score = CocoScore(spec.val, masks=True)
    loader = torch.utils.data.DataLoader(spec.val, batch_size=2, collate_fn=collate_detection)
    with torch.no_grad():
        for images, targets in loader:
            score.update(model(images), targets)
    metrics = score.compute()
    assert {"box_ap", "box_ap50", "mask_ap", "mask_ap_large"} <= set(metrics)
    assert all(math.isnan(v) or 0.0 <= v <= 100.0 for v in metrics.values())


def test_without_pycocotools_the_error_names_the_extra(tmp_path, monkeypatch):
    val = load_coco(composited(tmp_path)).val
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ConfigError, match=r"pip install 'cwkd\[detection\]'"):
        CocoScore(val)
