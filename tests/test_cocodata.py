"""COCO instances data: both layouts, label mapping, degenerate boxes, empty images, masks, joint transforms."""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cwkd.composite import write_dense_dataset
from cwkd.errors import DataError
from cwkd.tasks.detection.data import DetectionTransform, TransformedDetections, collate_detection, load_coco
from tests.test_composite import _items


def composited(tmp_path: Path) -> Path:
    """cwkd's composited layout: annotations/instances_{train,val}.json and {train,val}/, 64 px canvases."""
    return write_dense_dataset(tmp_path / "fm", _items(), canvas=64, counts={"train": 4, "val": 2}, seed=0)


def coco2017(tmp_path: Path, id_of=lambda cid: cid * 3 + 5) -> Path:
    """The composited set moved into COCO 2017's layout, with category ids remapped to non-contiguous ones."""
    source, root = composited(tmp_path), tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(source / split, root / f"{split}2017")
        coco = json.loads((source / "annotations" / f"instances_{split}.json").read_text())
        for item in coco["categories"]:
            item["id"] = id_of(item["id"])
        for ann in coco["annotations"]:
            ann["category_id"] = id_of(ann["category_id"])
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    return root


def _edit(root: Path, split: str, change) -> None:
    path = root / "annotations" / f"instances_{split}2017.json"
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))


def _mask_box(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_composited_layout_gives_images_boxes_labels_and_masks_that_agree(tmp_path):
    spec = load_coco(composited(tmp_path), masks=True)
    assert (spec.num_classes, len(spec.train), len(spec.val)) == (11, 4, 2)
    image, target = spec.train[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert target["labels"].dtype == torch.int64 and 1 <= target["labels"].min() <= target["labels"].max() <= 10
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (len(target["labels"]), 64, 64)
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        assert box.tolist() == _mask_box(mask)  # xyxy, the mask's extent


def test_coco2017_layout_maps_non_contiguous_ids_to_labels_1_to_k(tmp_path):
    plain, coco = load_coco(composited(tmp_path / "a")), load_coco(coco2017(tmp_path / "b"))
    assert coco.train.category_ids == [i * 3 + 5 for i in range(1, 11)]
    assert coco.num_classes == 11
    for index in range(len(plain.train)):
        assert torch.equal(plain.train[index][1]["labels"], coco.train[index][1]["labels"])


def test_degenerate_boxes_are_dropped_and_counted_and_empty_images_stay(tmp_path):
    root = coco2017(tmp_path)

    def change(coco):
        first = coco["images"][0]["id"]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != first]  # image 1: no objects
        coco["annotations"][0]["bbox"][2] = 1  # 1 px wide
        coco["annotations"][1]["bbox"][3] = 0.5
    _edit(root, "train", change)
    with pytest.warns(UserWarning, match=r"instances_train2017.json: left 2 object\(s\) with a box 1 px wide or high "
                                         "or less out of the targets"):  # once, at load (they were silent)
        spec = load_coco(root, masks=True)
    assert spec.train.dropped == 2
    image, target = spec.train[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 64, 64)


def test_polygon_and_compressed_rle_masks_are_read(tmp_path, monkeypatch):
    root = coco2017(tmp_path)

    def change(coco):
        coco["annotations"][0]["segmentation"] = [[10, 10, 30, 10, 30, 20, 10, 20]]
        coco["annotations"][0]["bbox"] = [10, 10, 20, 10]
    _edit(root, "train", change)
    with monkeypatch.context() as patch:  # without pycocotools
        patch.setitem(sys.modules, "pycocotools", None)
        mask = load_coco(root, masks=True).train[0][1]["masks"][0]
    assert _mask_box(mask) == [10, 10, 31, 21]  # PIL fills the polygon and its outline
    assert mask.sum() == 21 * 11

    coco_mask = pytest.importorskip("pycocotools.mask")
    mask = load_coco(root, masks=True).train[0][1]["masks"][0]
    assert _mask_box(mask) == [10, 10, 30, 20]  # pycocotools fills the polygon's area, as COCO scores it
    square = np.zeros((64, 64), dtype=np.uint8, order="F")
    square[5:15, 40:50] = 1
    encoded = coco_mask.encode(square)

    def compressed(coco):
        coco["annotations"][0]["segmentation"] = {"size": [64, 64], "counts": encoded["counts"].decode()}
    _edit(root, "train", compressed)
    assert np.array_equal(load_coco(root, masks=True).train[0][1]["masks"][0].numpy(), square)


@pytest.mark.parametrize("polygons", [[[3.2, 4.7, 40.5, 9.1, 22.8, 37.9]],
                                      [[5, 5, 60, 5, 60, 12, 12, 12, 12, 60, 5, 60], [30.5, 30.5, 50, 31, 41, 52.2]]])
def test_training_masks_are_what_coco_evaluation_decodes(tmp_path, polygons):
    coco_mask = pytest.importorskip("pycocotools.mask")
    root = coco2017(tmp_path)
    _edit(root, "train", lambda coco: coco["annotations"][0].update(segmentation=polygons))
    mask = load_coco(root, masks=True).train[0][1]["masks"][0].numpy()
    scored = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygons, 64, 64)))  # COCO.annToMask
    assert mask.dtype == np.uint8 and np.array_equal(mask, scored)


def test_a_mask_of_another_size_is_one_clear_error(tmp_path):
    root = coco2017(tmp_path)
    _edit(root, "train", lambda coco: coco["annotations"][0]["segmentation"].update(size=[32, 64]))
    with pytest.raises(DataError, match=r"mask is 64x32 but its image .* is 64x64; a mask must have its image's size"):
        load_coco(root, masks=True).train[0]
    load_coco(root).train[0]  # boxes only: the mask is never read


def test_layout_and_category_problems_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="neither annotations/instances_train2017.json"):
        load_coco(tmp_path)
    with pytest.raises(DataError, match="detection data .*nope is not a folder; pass a COCO-style folder"):
        load_coco(tmp_path / "nope")
    root = coco2017(tmp_path)
    _edit(root, "val", lambda coco: coco["categories"].pop())
    with pytest.raises(DataError, match="both splits must list the same categories"):
        load_coco(root)
    _edit(root, "train", lambda coco: coco["annotations"][0].update(category_id=999))
    with pytest.raises(DataError, match="annotation 1 names image 1 and category 999"):
        load_coco(root)


def test_flip_and_scale_jitter_move_boxes_with_their_masks(tmp_path):
    spec = load_coco(composited(tmp_path), masks=True)
    image, target = spec.train[1]
    flipped, moved = DetectionTransform(train=True, flip=1.0, scale=(1.0, 1.0))(image, target)
    assert torch.equal(flipped, image.flip(-1))
    for box, mask in zip(moved["boxes"], moved["masks"], strict=True):
        assert box.tolist() == _mask_box(mask)
    for factor in ((0.5, 0.5), (1.5, 1.5)):
        scaled, moved = DetectionTransform(train=True, flip=0.0, scale=factor)(image, target)
        assert scaled.shape == image.shape and len(moved["boxes"]) == len(moved["masks"]) == len(moved["labels"])
        for box, mask in zip(moved["boxes"], moved["masks"], strict=True):
            assert np.allclose(box.tolist(), _mask_box(mask), atol=1.0)
    assert DetectionTransform(train=False)(image, target)[1] is target


def test_scale_jitter_clips_boxes_and_drops_those_cut_to_a_sliver_with_their_label_and_mask():
    from cwkd.data.transforms import seeded
    masks = torch.zeros(2, 40, 50, dtype=torch.uint8)
    masks[0, :3, :3], masks[1, 10:30, 10:30] = 1, 1
    target = {"boxes": torch.tensor([[0.0, 0, 3, 3], [10, 10, 30, 30]]), "labels": torch.tensor([4, 7]),
              "masks": masks, "image_id": 1}
    kept = set()
    for seed in range(20):  # x1.25: a random 50x40 crop of 62x50, the corner box often cut to 1 px or less
        with seeded(seed):
            image, moved = DetectionTransform(train=True, flip=0.0, scale=(1.25, 1.25))(torch.rand(3, 40, 50), target)
        boxes = moved["boxes"]
        assert image.shape == (3, 40, 50) and len(boxes) == len(moved["labels"]) == len(moved["masks"])
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= 50).all() and (boxes[:, 1::2] <= 40).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) > 1.0).all()
        for box, mask in zip(boxes, moved["masks"], strict=True):
            assert np.allclose(box.tolist(), _mask_box(mask), atol=1.0)
        kept.add(tuple(moved["labels"].tolist()))
    assert kept == {(4, 7), (7,)}


def test_collate_keeps_lists_of_different_sizes(tmp_path):
    spec = load_coco(composited(tmp_path))
    data = TransformedDetections(spec.train, DetectionTransform(train=False))
    images, targets = collate_detection([data[0], (torch.zeros(3, 32, 48), data[1][1])])
    assert [tuple(i.shape) for i in images] == [(3, 64, 64), (3, 32, 48)] and len(targets) == 2


def test_compressed_rle_without_pycocotools_names_the_extra(tmp_path, monkeypatch):
    root = coco2017(tmp_path)
    _edit(root, "train", lambda coco: coco["annotations"][0].update(segmentation={"size": [64, 64], "counts": "PP"}))
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(DataError, match=r"compressed RLE mask, which needs pycocotools; .*cwkd\[detection\]"):
        load_coco(root, masks=True).train[0]


@pytest.mark.parametrize("split, change, needle", [
    ("train", lambda c: c["annotations"][0].pop("bbox"),
     "annotations[0] (id 1) has 'bbox' None; it must be 4 numbers [x, y, width, height] in pixels"),
    ("train", lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0] (id 1) has 'bbox' [1, 2, 3]; "),
    ("train", lambda c: c["annotations"].__setitem__(1, "cat"), "annotations[1] is 'cat', not an object"),
    ("val", lambda c: c["images"][1].pop("file_name"), "images[1] (id 2) has no 'file_name'"),
    ("train", lambda c: c["images"][0].update(width="abc"), "images[0] (id 1) has 'width' 'abc'; it must be a "
                                                            "positive integer"),
    ("train", lambda c: c["categories"][2].pop("name"), "categories[2] (id 14) has no 'name'"),
    ("val", lambda c: c["images"][1].update(id=c["images"][0]["id"]), "images[1] (id 1) repeats an id"),
    ("train", lambda c: c["annotations"][0].update(segmentation=[[1, 2, "x", 4, 5, 6]]), "has a polygon"),
    ("val", lambda c: c["annotations"][1].update(segmentation={"size": [64, 64], "counts": 5}),
     "annotations[1] (id 2) has 'segmentation' {'size': [64, 64], 'counts': 5}; an RLE mask has 'counts'"),
])
def test_wrongly_shaped_coco_fields_are_one_line_naming_file_record_and_field(tmp_path, split, change, needle):
    """Each of these was a traceback (an image without file_name only mid-epoch, in a loader worker)."""
    root = coco2017(tmp_path)
    _edit(root, split, change)
    path = root / "annotations" / f"instances_{split}2017.json"
    with pytest.raises(DataError, match=rf"^{re.escape(f'{path}: ')}.*{re.escape(needle)}.*fix or remove that record"):
        load_coco(root, masks=True)


def test_a_json_that_is_not_an_object_is_one_line(tmp_path):
    root = coco2017(tmp_path)
    (root / "annotations" / "instances_train2017.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="instances_train2017.json holds a JSON list, not an object; a COCO instances"):
        load_coco(root)


def test_polygons_under_3_points_are_dropped_at_load_with_one_warning(tmp_path):
    """pycocotools fails on such a polygon when it scores the val split, after a whole epoch has trained."""
    root = coco2017(tmp_path)

    def change(coco):
        coco["annotations"][0]["segmentation"] = [[1, 2, 3, 4], [10, 10, 30, 10, 30, 20]]  # one of 2 points
        coco["annotations"][1]["segmentation"] = [[5, 6]]  # its only polygon: the object goes too
    _edit(root, "val", change)
    with pytest.warns(UserWarning, match=r"instances_val2017.json: dropped 2 polygon\(s\) with fewer than 3 "
                                         r"points, and 1 object\(s\) that had no other polygon"):
        spec = load_coco(root, masks=True)
    assert [a["id"] for a in spec.val.coco["annotations"]][:2] == [1, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_coco(root)  # boxes only: polygons are never read
    pytest.importorskip("pycocotools")
    from tests.test_cocoeval import _ground_truth_as_predictions

    assert _ground_truth_as_predictions(spec.val).compute()["mask_ap"] > 50  # scored (PIL's outline adds pixels)


@pytest.mark.parametrize("change, needle", [
    (lambda c: c.update(annotations=[]), "lists no objects outside crowd regions"),
    (lambda c: [a.update(iscrowd=1) for a in c["annotations"]], "lists no objects outside crowd regions"),
    (lambda c: c.update(images=[], annotations=[]), "lists no images"),
])
def test_a_val_split_coco_ap_cannot_score_is_refused_before_training(tmp_path, change, needle):
    """It used to train every epoch with AP NaN, write no best.safetensors, and report 'best -1.00% at epoch 0'."""
    root = coco2017(tmp_path)
    _edit(root, "val", change)
    with pytest.raises(DataError, match=f"instances_val2017.json {needle}, so COCO AP cannot score the val split"):
        load_coco(root)
