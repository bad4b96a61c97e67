"""Detection and instance-segmentation data: COCO instances JSON plus an image folder, joint transforms, collate.

Two layouts are found under ``--data ROOT``:

- COCO 2017: ``annotations/instances_train2017.json`` with images in ``train2017/``, and
  ``annotations/instances_val2017.json`` with ``val2017/``;
- cwkd's composited set (``cwkd.composite``): ``annotations/instances_{train,val}.json`` with ``{train,val}/``.

An item is ``(image, target)``: a 0-1 float ``(3, H, W)`` tensor, and ``{"boxes": (N, 4) float xyxy,
"labels": (N,) int64, "image_id": int}`` plus ``"masks": (N, H, W) uint8`` when masks are asked for,
which is what torchvision's detectors take. Labels are ``1..K`` in the order of the category ids (0 is
background), whatever the ids are (COCO's run 1-90 with gaps); ``category_ids[label - 1]`` maps back for
evaluation. Boxes are clipped to the image; boxes under 2 px wide or high are dropped and counted
(``dropped``), crowd regions (``iscrowd``) are left out of training targets (COCO's evaluation reads
them from the JSON), and images without objects stay (torchvision's detectors train on empty targets).
Masks may be polygons or RLE, rasterised with pycocotools when it is installed (as COCO's evaluation does);
without it, uncompressed RLE and polygons (drawn with PIL) still work. The JSON is checked once
at load (:mod:`cwkd.tasks.detection.cococheck`): a malformed record is one error naming the file, the record
and the field, and a polygon with fewer than 3 points is dropped with a warning (pycocotools cannot score it).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cwkd.data.images import read_image, scale_pad_crop
from cwkd.errors import DataError, DataSetWarning
from cwkd.files.rle import rle_decode
from cwkd.tasks.detection.cococheck import check_coco

#: The smallest box side kept, in pixels: thinner boxes are degenerate.
MIN_BOX_SIDE = 1.0
#: (annotation file, image folder) per split, for each layout found under ROOT, first match wins.
LAYOUTS = ({"train": ("annotations/instances_train2017.json", "train2017"),
            "val": ("annotations/instances_val2017.json", "val2017")},
           {"train": ("annotations/instances_train.json", "train"),
            "val": ("annotations/instances_val.json", "val")})


class CocoDetection(Dataset):
    """One split of a COCO instances JSON: ``(image, target)`` items as torchvision's detectors take them."""

    def __init__(self, annotations: str | Path, images: str | Path, *, masks: bool = False,
                 category_ids: Sequence[int] | None = None) -> None:
        self.annotations, self.images, self.masks = Path(annotations), Path(images), masks
        self.coco = _read_json(self.annotations)
        polygons, objects = check_coco(self.coco, self.annotations, masks=masks)
        categories = sorted(self.coco["categories"], key=lambda c: c["id"])
        self.category_ids = list(category_ids) if category_ids is not None else [c["id"] for c in categories]
        self.classes = [c["name"] for c in categories]
        if [c["id"] for c in categories] != self.category_ids:
            raise DataError(f"{self.annotations} has category ids {[c['id'] for c in categories]} but the train split "
                            f"has {self.category_ids}; both splits must list the same categories")
        self._label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.records = sorted(self.coco["images"], key=lambda r: r["id"])
        self.dropped = 0
        self._objects = self._index(self.coco["annotations"])
        self._warn_dropped(polygons, objects)

    def _warn_dropped(self, polygons: int, objects: int) -> None:
        """One warning per file, at load, for what the targets leave out that a user would not see otherwise."""
        if polygons:  # such a polygon can neither be drawn for training nor scored by COCO
            left = f", and {objects} object(s) that had no other polygon" if objects else ""
            warnings.warn(f"{self.annotations}: dropped {polygons} polygon(s) with fewer than 3 points{left}; "
                          "give each polygon 3 or more x, y points to keep it", DataSetWarning, stacklevel=3)
        if self.dropped:
            warnings.warn(f"{self.annotations}: left {self.dropped} object(s) with a box {MIN_BOX_SIDE:g} px wide or "
                          "high or less out of the targets (too small to draw or train on; COCO's scoring still "
                          "reads them); fix their bbox to train on them", DataSetWarning, stacklevel=3)

    def _index(self, annotations: list[dict]) -> dict[int, list[dict]]:
        known, objects = {r["id"] for r in self.records}, defaultdict(list)
        for ann in annotations:
            if ann.get("image_id") not in known or ann.get("category_id") not in self._label:
                raise DataError(f"{self.annotations}: annotation {ann.get('id')} names image {ann.get('image_id')} "
                                f"and category {ann.get('category_id')}, one of which the file does not list; "
                                "fix or remove that annotation")
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            if w <= MIN_BOX_SIDE or h <= MIN_BOX_SIDE:
                self.dropped += 1
                continue
            objects[ann["image_id"]].append(ann)
        return objects

    @property
    def num_classes(self) -> int:
        """Classes plus background: what a detector's ``num_classes`` must be."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        record = self.records[index]
        path = self.images / record["file_name"]
        image = read_image(path)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        anns = self._objects.get(record["id"], [])
        boxes = tv_tensors.BoundingBoxes(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4),
                                         format="XYWH", canvas_size=(image.height, image.width))
        boxes = TF.clamp_bounding_boxes(TF.convert_bounding_box_format(boxes, new_format="XYXY"))
        boxes = boxes.as_subclass(torch.Tensor)  # clipped to the image
        inside = _wide_enough(boxes).tolist()  # a box outside its image is degenerate once clipped
        anns, boxes = [a for a, keep in zip(anns, inside, strict=True) if keep], boxes[inside]
        target = {"boxes": boxes, "labels": torch.tensor([self._label[a["category_id"]] for a in anns],
                                                         dtype=torch.int64), "image_id": int(record["id"])}
        if self.masks:
            size = (image.height, image.width)
            target["masks"] = torch.from_numpy(np.stack([_mask(a, size, path) for a in anns])
                                               if anns else np.zeros((0, *size), dtype=np.uint8))
        return pixels, target


def _wide_enough(boxes: torch.Tensor) -> torch.Tensor:
    """Which xyxy boxes are more than ``MIN_BOX_SIDE`` wide and high."""
    return ((boxes[:, 2] - boxes[:, 0]) > MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) > MIN_BOX_SIDE)


def _read_json(path: Path) -> dict:
    try:
        coco = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as COCO JSON ({type(exc).__name__}: {exc}); replace the file") from exc
    if not isinstance(coco, dict):
        raise DataError(f"{path} holds a JSON {type(coco).__name__}, not an object; a COCO instances file is an "
                        "object with images, annotations and categories")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco.get(k), list)]
    if missing:
        raise DataError(f"{path} has no list '{missing[0]}'; a COCO instances file has images, annotations "
                        "and categories")
    if not coco["categories"]:
        raise DataError(f"{path} lists no categories; a detector needs at least one class")
    return coco


def _mask(ann: dict, size: tuple[int, int], image: Path) -> np.ndarray:
    """The ``uint8`` (H, W) mask of an annotation's polygons or RLE, checked against its image's size.

    With pycocotools installed it rasterises them, as COCO's evaluation does, so the training target is
    the mask that is scored; without it, PIL draws polygons and :func:`~cwkd.files.rle.rle_decode` reads
    uncompressed RLE (compressed RLE then needs pycocotools).
    """
    seg = ann.get("segmentation")
    if isinstance(seg, list):  # polygons: [[x0, y0, x1, y1, ...], ...] in pixels
        return _draw_polygons(seg, size)
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise DataError(f"annotation {ann.get('id')} of {image} has no mask (segmentation: {str(seg)[:40]}); "
                        "instance segmentation needs polygons or RLE for every object")
    if tuple(seg["size"]) != size:
        raise DataError(f"annotation {ann.get('id')}'s mask is {seg['size'][1]}x{seg['size'][0]} but its image "
                        f"{image} is {size[1]}x{size[0]}; a mask must have its image's size")
    coco_mask = _pycocotools()
    if isinstance(seg["counts"], list):
        return (coco_mask.decode(coco_mask.frPyObjects(seg, *size)) if coco_mask else rle_decode(seg)).astype(np.uint8)
    if coco_mask is None:
        raise DataError(f"annotation {ann.get('id')} of {image} has a compressed RLE mask, which needs pycocotools; "
                        "install it with `pip install 'cwkd[detection]'`")
    counts = seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]
    return coco_mask.decode({"size": list(seg["size"]), "counts": counts}).astype(np.uint8)


def _draw_polygons(polygons: list, size: tuple[int, int]) -> np.ndarray:
    """Polygons (each of 3 points or more: cwkd.tasks.detection.cococheck dropped the others at load) as a
    ``uint8`` mask."""
    coco_mask = _pycocotools()
    if coco_mask is not None:  # COCO.annToMask's way: one RLE per polygon, merged
        return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygons, *size))).astype(np.uint8)
    canvas = Image.new("L", (size[1], size[0]), 0)
    for polygon in polygons:
        ImageDraw.Draw(canvas).polygon([float(v) for v in polygon], fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8)


def _pycocotools():
    """``pycocotools.mask``, or None when pycocotools is not installed."""
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        return None
    return coco_mask


@dataclass
class DetectionSpec:
    """A loaded COCO-style data set: train and val splits, class names and the category ids behind labels 1..K."""

    name: str
    train: CocoDetection
    val: CocoDetection

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        """Classes plus background: what a detector's ``num_classes`` must be."""
        return self.train.num_classes


def load_coco(root: str | Path, *, masks: bool = False) -> DetectionSpec:
    """Find a COCO 2017 or a cwkd composited layout under ``root`` and return its train and val splits.

    Example:
        >>> spec = load_coco("data/fm-dense", masks=True)  # doctest: +SKIP
        >>> spec.num_classes, len(spec.val)
        (11, 200)
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"detection data {root} is not a folder; pass a COCO-style folder (annotations/ and the "
                        "image folders, e.g. COCO 2017's train2017/ and val2017/)")
    layout = next((lay for lay in LAYOUTS if (root / lay["train"][0]).is_file()), None)
    if layout is None:
        raise DataError(f"{root} has neither annotations/instances_train2017.json (COCO 2017) nor "
                        "annotations/instances_train.json (cwkd's composited set); pass the folder that holds "
                        "annotations/ and the image folders")
    splits = {}
    for split, (json_file, images) in layout.items():
        if not (root / json_file).is_file() or not (root / images).is_dir():
            raise DataError(f"{root / json_file} or {root / images}/ is missing; the {split} split needs both")
        ids = splits["train"].category_ids if splits else None
        splits[split] = CocoDetection(root / json_file, root / images, masks=masks, category_ids=ids)
    if not len(splits["train"]):
        raise DataError(f"{root / layout['train'][0]} lists no images; add some")
    _check_scorable(splits["val"], masks=masks)
    return DetectionSpec(root.name, splits["train"], splits["val"])


def _check_scorable(val: CocoDetection, *, masks: bool) -> None:
    """Refuse a val split COCO AP cannot score (no image, or no object outside crowd regions) before any training:
    its AP would be undefined every epoch, and no best checkpoint could be picked."""
    objects = sum(1 for ann in val.coco["annotations"] if not ann.get("iscrowd", 0))
    if not len(val) or not objects:
        what = "no images" if not len(val) else "no objects" + (" with a mask" if masks else "") + \
            " outside crowd regions"
        raise DataError(f"{val.annotations} lists {what}, so COCO AP cannot score the val split (it would be "
                        "undefined every epoch, and no best checkpoint picked); add annotated images to it")


class DetectionTransform:
    """Image, boxes and masks transformed together: random flip and scale jitter for training, nothing for val.

    The scale jitter resizes by a factor in ``scale`` and then crops (or pads with zeros on the bottom and
    right) back to the image's size, as torchvision's reference does (``ScaleJitter`` + ``FixedSizeCrop``):
    a plain resize would be undone by the detector's own resize. It runs on torchvision's ``transforms.v2``
    with ``tv_tensors``, which clip the boxes to the image; ``SanitizeBoundingBoxes`` then drops boxes
    ``MIN_BOX_SIDE`` px wide or high or less, with their labels and masks. Random draws come from torch's
    RNG, which :class:`cwkd.data.transforms.Transformed` seeds per item for exact resume.
    """

    def __init__(self, *, train: bool, flip: float = 0.5, scale: tuple[float, float] = (0.75, 1.25)) -> None:
        self.train, self.scale = train, scale
        self.flip = v2.RandomHorizontalFlip(flip)
        # SanitizeBoundingBoxes keeps sides >= min_size; cwkd keeps sides > MIN_BOX_SIDE, as at load.
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=math.nextafter(MIN_BOX_SIDE, math.inf))

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if not self.train:
            return image, target
        size = tuple(image.shape[-2:])
        sample = (tv_tensors.Image(image), _wrap(target, size))
        sample = self.flip(sample)
        if self.scale != (1.0, 1.0):
            factor = float(torch.empty(()).uniform_(*self.scale))
            sample = self.sanitize(scale_pad_crop(sample, factor, size, fill=0.0, crop=True))
        image, target = sample
        return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) if torch.is_tensor(v) else v
                                                  for k, v in target.items()}


def _wrap(target: dict, size: tuple[int, int]) -> dict:
    """A target dict with its boxes and masks as ``tv_tensors``, so v2 transforms move them with the image."""
    wrapped = {**target, "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=size)}
    if "masks" in target:
        wrapped["masks"] = tv_tensors.Mask(target["masks"])
    return wrapped


class TransformedDetections(Dataset):
    """A :class:`CocoDetection` through a :class:`DetectionTransform`."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return self.transform(*self.base[index])


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """A batch as (list of images, list of targets): detectors take images of different sizes, so nothing is stacked."""
    return [image for image, _ in batch], [target for _, target in batch]
