"""The dense-task data generator: real items composited into VOC masks and COCO instances that agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cwkd.composite import Items, compose, write_dense_dataset
from cwkd.files.rle import rle_decode, rle_encode


def _items(n: int = 40) -> Items:
    """Item-like 28x28 images: a bright blob whose shape depends on the class, on a black margin."""
    rng = np.random.default_rng(0)
    images, labels = {}, {}
    for split, offset in (("train", 0), ("val", 100)):
        arr = np.zeros((n, 28, 28), dtype=np.uint8)
        lab = rng.integers(0, 10, n)
        for i, c in enumerate(lab):
            arr[i, 4:24, 4 + c:24 - c // 2] = 120 + offset  # train items 120, val items 220
        images[split], labels[split] = arr, lab
    return Items(images, labels, [f"c{i}" for i in range(10)])


def test_rle_round_trips_including_masks_that_start_set():
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = rng.random((7, 5)) > 0.5
        assert np.array_equal(rle_decode(rle_encode(mask)), mask)
    full = np.ones((3, 4), dtype=bool)
    assert rle_encode(full)["counts"] == [0, 12]


def test_compose_masks_match_the_pixels_and_later_items_cover_earlier():
    rng = np.random.default_rng(0)
    items = _items()
    made = compose(rng, items.images["train"], items.labels["train"], canvas=64, items=(3, 6))
    assert made.image.shape == (64, 64, 3) and made.semantic.shape == (64, 64)
    assert 1 <= len(made.instances) <= 6
    union = np.zeros((64, 64), dtype=int)
    for label, mask in made.instances:
        assert (made.semantic[mask] == label + 1).all()
        union += mask
    assert union.max() == 1  # visible masks never overlap
    assert ((made.semantic > 0) == (union == 1)).all()
    assert made.image[made.semantic > 0].max() > made.image[made.semantic == 0].max() - 60


def test_written_dataset_has_voc_and_coco_that_agree(tmp_path):
    root = write_dense_dataset(tmp_path / "d", _items(), canvas=48, counts={"train": 6, "val": 3}, seed=0)
    for split, count in (("train", 6), ("val", 3)):
        names = (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
        assert len(names) == count
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert len(coco["images"]) == count
        for image in coco["images"]:
            name = image["file_name"].removesuffix(".jpg")
            semantic = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png"))
            assert Image.open(root / split / image["file_name"]).size == (48, 48)
            rebuilt = np.zeros_like(semantic)
            for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
                mask = rle_decode(ann["segmentation"])
                x, y, w, h = ann["bbox"]
                ys, xs = np.nonzero(mask)
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
                assert ann["area"] == mask.sum()
                rebuilt[mask] = ann["category_id"]
            assert np.array_equal(rebuilt, semantic)


def test_val_canvases_use_only_val_items_and_the_seed_repeats(tmp_path):
    items = _items()
    a = write_dense_dataset(tmp_path / "a", items, canvas=48, counts={"train": 2, "val": 2}, seed=3)
    b = write_dense_dataset(tmp_path / "b", items, canvas=48, counts={"train": 2, "val": 2}, seed=3)
    for name in ("val_000000.png", "train_000001.png"):
        assert (a / "SegmentationClass" / name).read_bytes() == (b / "SegmentationClass" / name).read_bytes()
    # val items are drawn at 220 and train items at 120 (tinted by 0.45-1.0): the brightest val pixel shows it.
    val = np.asarray(Image.open(a / "JPEGImages" / "val_000000.jpg"))
    train = np.asarray(Image.open(a / "JPEGImages" / "train_000000.jpg"))
    assert val.max() > 150 and train.max() <= 135


@pytest.mark.slow
def test_script_writes_from_the_bundled_real_items(tmp_path):
    from benchmarks.make_dense_dataset import main

    assert main(["--out", str(tmp_path / "fm"), "--data", "fashion-mnist-mini", "--canvas", "64",
                 "--train", "4", "--val", "2"]) == 0
    coco = json.loads((tmp_path / "fm" / "annotations" / "instances_train.json").read_text())
    assert coco["annotations"] and {c["name"] for c in coco["categories"]} >= {"T-shirt/top", "Ankle boot"}
