"""Dense-task data made from real Fashion-MNIST items: canvases with a class mask and COCO instances.

Each canvas holds several real Fashion-MNIST items (2-6 by default), each scaled, tinted and placed at
random, later items covering earlier ones where they overlap. One call writes both layouts a user
already has for the dense tasks:

- VOC: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (index PNG: background 0, the ten
  classes 1-10, 255 nowhere) and ``ImageSets/Segmentation/<split>.txt``;
- COCO: ``annotations/instances_<split>.json`` with one box, class and mask (uncompressed RLE, no
  pycocotools needed to write it) per visible item, images in ``<split>/``.

The train split draws items from Fashion-MNIST's train split and the val split from its test split,
never mixed, so a model is scored on items it never saw.

Example:
    >>> from cwkd.tasks.classification.data import load_data
    >>> spec = load_data("fashion-mnist-mini")  # doctest: +SKIP
    >>> write_dense_dataset("data/fm-dense", items_from_spec(spec), canvas=96, counts={"train": 200, "val": 50})
    ... # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cwkd.files.rle import rle_encode

#: Pixels of a 28x28 item brighter than this (of 255) belong to the item; the rest is its black margin.
FOREGROUND = 24
#: The value of "ignore" in a class mask (VOC's border colour); the generator writes none.
IGNORE = 255


@dataclass(frozen=True)
class Items:
    """Real items to composite, per split: ``images[split]`` (N, 28, 28) uint8, ``labels[split]`` (N,)."""

    images: Mapping[str, np.ndarray]
    labels: Mapping[str, np.ndarray]
    classes: Sequence[str]


@dataclass(frozen=True)
class Canvas:
    """One composited image: RGB pixels, the class mask, and one (class, mask) per visible item."""

    image: np.ndarray             # (H, W, 3) uint8
    semantic: np.ndarray          # (H, W) uint8: 0 background, class index + 1 elsewhere
    instances: list[tuple[int, np.ndarray]]  # (class index, (H, W) bool visible mask)


def items_from_spec(spec) -> Items:
    """The items of a gray array data set such as ``load_data("fashion-mnist")`` (train -> train, val -> val)."""
    images, labels = {}, {}
    for split in ("train", "val"):
        data = getattr(spec, split)
        images[split], labels[split] = np.asarray(data.images), np.asarray(data.labels)
    return Items(images, labels, list(spec.classes))


def compose(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, *, canvas: int,
            items: tuple[int, int] = (2, 6), scale: tuple[float, float] = (0.6, 1.6)) -> Canvas:
    """One canvas of ``canvas`` x ``canvas`` pixels with ``items`` (inclusive range) random real items.

    An item's side is ``28 * s * canvas / 96`` pixels for ``s`` uniform in ``scale``, so the mix of
    sizes is the same at every canvas size. Items that end up fully covered are dropped.
    """
    background = rng.integers(0, 40, size=3)
    pixels = np.clip(background + rng.normal(0, 8, (canvas, canvas, 3)), 0, 255)
    owner = np.full((canvas, canvas), -1, dtype=np.int16)  # which placed item a pixel shows
    placed: list[int] = []
    for slot in range(int(rng.integers(items[0], items[1] + 1))):
        pick = int(rng.integers(len(images)))
        side = max(8, round(28 * rng.uniform(*scale) * canvas / 96))
        side = min(side, canvas)
        item = np.asarray(Image.fromarray(images[pick]).resize((side, side), Image.BILINEAR), dtype=np.float32)
        mask = item > FOREGROUND
        if not mask.any():
            continue
        top, left = (int(rng.integers(0, canvas - side + 1)) for _ in range(2))
        tint = rng.uniform(0.45, 1.0, size=3)  # a colour per item, so colour alone says nothing of the class
        region = (slice(top, top + side), slice(left, left + side))
        pixels[region][mask] = item[mask, None] * tint
        owner[region][mask] = slot
        placed.append(int(labels[pick]))
    semantic = np.zeros((canvas, canvas), dtype=np.uint8)
    instances = []
    for slot, label in enumerate(placed):
        visible = owner == slot
        if visible.sum() >= 4:  # a sliver of a few pixels is no object
            semantic[visible] = label + 1
            instances.append((label, visible))
    return Canvas(pixels.astype(np.uint8), semantic, instances)


def write_dense_dataset(root: str | Path, items: Items, *, canvas: int = 96, counts: Mapping[str, int] | None = None,
                        seed: int = 0, per_canvas: tuple[int, int] = (2, 6)) -> Path:
    """Write ``counts[split]`` canvases per split under ``root`` in the VOC and COCO layouts; return ``root``.

    The same seed writes the same files. Existing files of the same names are replaced.
    """
    root = Path(root)
    counts = dict(counts or {"train": 1000, "val": 200})
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "annotations"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index, (split, count) in enumerate(counts.items()):
        rng = np.random.default_rng([seed, index])
        (root / split).mkdir(exist_ok=True)
        names, coco = [], _coco_header(items.classes)
        for number, made in enumerate(_canvases(rng, items, split, count, canvas, per_canvas)):
            name = f"{split}_{number:06d}"
            names.append(name)
            jpeg = Image.fromarray(made.image)
            jpeg.save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            (root / split / f"{name}.jpg").write_bytes((root / "JPEGImages" / f"{name}.jpg").read_bytes())
            Image.fromarray(made.semantic, mode="L").save(root / "SegmentationClass" / f"{name}.png")
            _coco_add(coco, made, image_id=number + 1, file_name=f"{name}.jpg")
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(n + "\n" for n in names))
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    (root / "classes.txt").write_text("background\n" + "".join(c + "\n" for c in items.classes))
    return root


def _canvases(rng: np.random.Generator, items: Items, split: str, count: int, canvas: int,
              per_canvas: tuple[int, int]) -> Iterator[Canvas]:
    images, labels = items.images[split], items.labels[split]
    for _ in range(count):
        yield compose(rng, images, labels, canvas=canvas, items=per_canvas)


def _coco_header(classes: Sequence[str]) -> dict:
    # COCO's category ids start at 1; they match the class mask's values.
    return {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(classes)]}


def _coco_add(coco: dict, made: Canvas, *, image_id: int, file_name: str) -> None:
    height, width = made.semantic.shape
    coco["images"].append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    for label, mask in made.instances:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x0, y0 = int(cols[0]), int(rows[0])
        box = [x0, y0, int(cols[-1]) + 1 - x0, int(rows[-1]) + 1 - y0]  # x, y, w, h in pixels
        coco["annotations"].append({
            "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": label + 1,
            "bbox": box, "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle_encode(mask),
        })
