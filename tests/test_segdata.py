"""Segmentation data: VOC and plain layouts, joint transforms, bad masks, and the mIoU metric."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cwkd.composite import Items, write_dense_dataset
from cwkd.data.transforms import Transformed, seeded
from cwkd.errors import DataError
from cwkd.tasks.segmentation.data import IGNORE_INDEX, JointTransform, load_segmentation
from cwkd.tasks.segmentation.metric import SegmentationScore


def _voc(tmp_path, n=4):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 255, (20, 28, 28)).astype(np.uint8) for s in ("train", "val")}
    labels = {s: rng.integers(0, 10, 20) for s in ("train", "val")}
    return write_dense_dataset(tmp_path / "voc", Items(images, labels, [f"c{i}" for i in range(10)]), canvas=40,
                               counts={"train": n, "val": 2})


def _plain(tmp_path, masks):
    for split in ("train", "val"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        for i, mask in enumerate(masks):
            Image.fromarray(np.full((*mask.shape, 3), 90, np.uint8)).save(tmp_path / split / "images" / f"{i}.jpg")
            Image.fromarray(mask).save(tmp_path / split / "masks" / f"{i}.png")
    return tmp_path


def test_voc_layout_from_the_generator_loads_with_its_class_names(tmp_path):
    spec = load_segmentation(_voc(tmp_path))
    assert spec.classes[0] == "background" and spec.num_classes == 11
    assert len(spec.train) == 4 and len(spec.val) == 2
    image, mask = spec.train[0]
    assert image.size == (40, 40) and mask.shape == (40, 40) and mask.max() <= 10


def test_plain_layout_numbers_classes_from_the_masks(tmp_path):
    mask = np.zeros((12, 16), np.uint8)
    mask[2:5, 3:9], mask[0, 0] = 3, IGNORE_INDEX
    with pytest.warns(UserWarning, match="4 \\(0-3\\), 2 of which no mask holds"):  # 1 and 2 appear nowhere
        spec = load_segmentation(_plain(tmp_path, [mask, mask]))
    assert spec.classes == ["0", "1", "2", "3"]
    assert spec.val[1][1][2, 3] == 3


def test_under_torchrun_rank_0_alone_warns_about_the_data_set(tmp_path):
    """Every process loads the same data: its warnings come from rank 0 only; a warning of one process's own
    (a file skipped on its shard) still comes from any rank."""
    from cwkd.errors import DataSetWarning
    from cwkd.runtime import Dist, main_rank_warnings

    mask = np.zeros((12, 16), np.uint8)
    mask[2:5, 3:9] = 3
    root = _plain(tmp_path, [mask, mask])
    with pytest.warns(DataSetWarning, match="2 of which no mask holds"), main_rank_warnings(Dist(0, 2)):
        load_segmentation(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with main_rank_warnings(Dist(1, 2)):
            load_segmentation(root)
            with pytest.warns(UserWarning, match="skipping unreadable image"):
                warnings.warn("skipping unreadable image x.png", UserWarning, stacklevel=1)
    with pytest.warns(DataSetWarning):  # the filter ends with the run
        load_segmentation(root)


def test_a_stray_mask_value_without_classes_txt_is_warned_once_not_silently_78_classes(tmp_path):
    masks = [np.zeros((12, 16), np.uint8) for _ in range(3)]
    for value, mask in enumerate(masks, start=1):
        mask[2:5, 3:9] = value
    masks[2][0, 0] = 77
    root = _plain(tmp_path, masks)
    with pytest.warns(UserWarning, match=r"has no classes.txt, so its masks' values \(0-3, 77\) number the "
                                         r"classes: 78 \(0-77\), 73 of which no mask holds; if 77 is a stray "
                                         r"value, fix .*train/masks/2.png, else list every class in .*classes.txt"
                      ) as caught:
        spec = load_segmentation(root)
    assert spec.num_classes == 78 and len(caught) == 1
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(78)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_segmentation(root)  # the classes are listed: nothing to warn about


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    mask = np.zeros((12, 16), np.uint8)
    root = _plain(tmp_path, [mask])
    Image.fromarray(np.full((12, 16), 32896, np.uint16)).save(root / "train" / "images" / "0.png")  # mid-gray
    (root / "train" / "images" / "0.jpg").unlink()
    image, _ = load_segmentation(root).train[0]
    assert image.mode == "RGB" and np.asarray(image).max() == 128


def test_bad_masks_get_one_clear_error(tmp_path):
    mask = np.zeros((12, 16), np.uint8)
    root = _plain(tmp_path, [mask])
    (root / "classes.txt").write_text("background\nthing\n")
    Image.fromarray(np.full((12, 16), 7, np.uint8)).save(root / "train" / "masks" / "0.png")
    with pytest.raises(DataError, match=r"class value\(s\) \[7\] but the data set has 2 classes"):
        load_segmentation(root).train[0]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "train" / "masks" / "0.png")
    with pytest.raises(DataError, match="must have its image's size"):
        load_segmentation(root).train[0]
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(root / "train" / "masks" / "0.png")
    with pytest.raises(DataError, match="one class index per pixel"):
        load_segmentation(root).train[0]
    (root / "val" / "masks" / "0.png").unlink()
    with pytest.raises(DataError, match="has no mask"):
        load_segmentation(root)
    with pytest.raises(DataError, match="is not a folder"):
        load_segmentation(root / "nowhere")


def test_joint_transform_keeps_image_and_mask_aligned(tmp_path):
    image = np.zeros((30, 50, 3), np.uint8)
    image[:, 25:] = 255
    mask = np.zeros((30, 50), np.uint8)
    mask[:, 25:] = 1
    pil = Image.fromarray(image)
    for train in (True, False):
        tf = JointTransform(32, (0.5,) * 3, (0.5,) * 3, train=train)
        for seed in range(10):
            torch.manual_seed(seed)
            pixels, target = tf(pil, mask)
            assert pixels.shape == (3, 32, 32) and target.shape == (32, 32) and target.dtype == torch.int64
            scored = target != IGNORE_INDEX
            assert ((pixels[0] > 0)[scored] == (target == 1)[scored]).float().mean() > 0.95
    pixels, target = JointTransform(32, (0.5,) * 3, (0.5,) * 3, train=False)(pil, mask)
    assert (target[20:] == IGNORE_INDEX).all() and (target[:19] != IGNORE_INDEX).all()  # 50x30 -> 32x19, padded


def test_a_train_crop_keeps_a_small_image_at_the_top_and_pads_its_mask_with_255():
    pil, mask = Image.new("RGB", (40, 40), (255, 255, 255)), np.ones((40, 40), np.uint8)
    tf = JointTransform(32, (0.5,) * 3, (0.5,) * 3, train=True, scale=(0.5, 0.5))  # 40 -> 16 px, padded to 32
    sides = set()
    for seed in range(8):
        with seeded(seed):
            pixels, target = tf(pil, mask)
        image = slice(0, 16) if (target[:16, :16] == 1).all() else slice(16, 32)  # top left, or top right flipped
        assert (target[:16, image] == 1).all() and (target != 1).sum() == 32 * 32 - 16 * 16
        assert (target[target != 1] == IGNORE_INDEX).all() and (pixels[:, 16:] == 0).all()  # padding is the mean
        sides.add(image.start)
    assert sides == {0, 16}


def test_the_same_item_seed_gives_the_same_crop_whatever_ran_before():
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 255, (30, 70, 3), dtype=np.uint8))
    mask = rng.integers(0, 3, (30, 70), dtype=np.uint8)
    tf = JointTransform(32, (0.5,) * 3, (0.5,) * 3, train=True)
    with seeded(7):
        first = tf(pil, mask)
    torch.manual_seed(123)
    tf(pil, mask)  # draws from the global RNG, as an unseeded item would
    with seeded(7):
        again = tf(pil, mask)
    with seeded(8):
        other = tf(pil, mask)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_a_downscaled_image_is_antialiased_not_sampled():
    image = np.zeros((128, 128, 3), np.uint8)
    image[::4, ::4] = 255  # one lit pixel per 4x4 block: plain bilinear sampling at 1/4 misses every one
    pixels, _ = JointTransform(32, (0.0,) * 3, (1.0,) * 3, train=False)(Image.fromarray(image),
                                                                        np.zeros((128, 128), np.uint8))
    assert pixels.mean().item() == pytest.approx(1 / 16, abs=0.01)


def test_transformed_masks_batch(tmp_path):
    spec = load_segmentation(_voc(tmp_path))
    data = Transformed(spec.train, JointTransform(24, (0.5,) * 3, (0.5,) * 3, train=True))
    images, masks = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert images.shape == (4, 3, 24, 24) and masks.shape == (4, 24, 24)


def test_miou_ignores_255_and_classes_that_never_appear():
    score = SegmentationScore(4)
    target = torch.tensor([[0, 0, 1, 1], [1, 255, 255, 2]])
    predicted = torch.tensor([[0, 1, 1, 1], [1, 3, 0, 2]])
    score.update(predicted, target)
    result = score.compute()
    # class 0: 1 hit / union 2; class 1: 3 / 4; class 2: 1 / 1; class 3 absent (its only prediction is ignored)
    assert result["iou"][:3] == pytest.approx([50.0, 75.0, 100.0]) and result["iou"][3] is None
    assert result["miou"] == pytest.approx(75.0)
    assert result["pixel_acc"] == pytest.approx(100 * 5 / 6)
    logits = torch.nn.functional.one_hot(predicted.clamp(max=3), 4).permute(2, 0, 1)[None].float()
    again = SegmentationScore(4)
    again.update(logits, target[None])
    assert again.compute()["miou"] == pytest.approx(75.0)
