"""Semantic-segmentation data: image + class-mask pairs from a VOC-style or a plain folder, joint transforms.

Two layouts are found under ``--data ROOT``:

- VOC: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (index PNGs) and
  ``ImageSets/Segmentation/{train,val}.txt`` (also inside ``VOCdevkit/VOC2012/``);
- plain: ``{train,val}/images/<name>.<ext>`` with ``{train,val}/masks/<name>.png`` of the same stem.

A mask holds one class index per pixel; 255 means "ignore" (VOC's object borders). Class names come
from ``classes.txt`` (one per line, background first) when the folder has one, else numbers: one per
value up to the largest the masks hold, with a warning when some of those values appear in no mask.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cwkd.data.images import IMAGE_ERRORS, read_image, scale_pad_crop
from cwkd.errors import DataError, DataSetWarning

#: Mask value that the loss and the metric skip.
IGNORE_INDEX = 255
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class SegmentationSpec:
    """A loaded segmentation data set: train/val pairs of (image path, mask path) and the class names."""

    name: str
    train: MaskDataset
    val: MaskDataset
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class MaskDataset(Dataset):
    """(RGB ``PIL.Image``, ``uint8`` mask array) pairs; each mask is checked against its image and the classes."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], num_classes: int | None = None) -> None:
        self.pairs = list(pairs)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        mask = read_mask(mask_path)
        if mask.shape != (image.height, image.width):
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                            f"{image.width}x{image.height}; a mask must have its image's size")
        if self.num_classes is not None:
            _check_values(mask, mask_path, self.num_classes)
        return image, mask


def read_mask(path: Path) -> np.ndarray:
    """A class-index mask as ``uint8`` (H, W): index (``P``) or gray (``L``) PNGs; colour masks are refused."""
    image = _open(path)
    if image.mode not in ("P", "L", "I", "I;16"):
        raise DataError(f"mask {path} is a {image.mode} image; masks must hold one class index per pixel "
                        "(an index/palette or 8-bit gray PNG, as VOC's SegmentationClass), not colours")
    mask = np.asarray(image)
    if mask.max(initial=0) > 255:
        raise DataError(f"mask {path} has values above 255; use class indices 0-254 (255 = ignore)")
    return mask.astype(np.uint8)


def _check_values(mask: np.ndarray, path: Path, num_classes: int) -> None:
    bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
    if bad.size:
        raise DataError(f"mask {path} has class value(s) {bad[:5].tolist()} but the data set has {num_classes} "
                        f"classes (0-{num_classes - 1}, 255 = ignore); fix the mask or list every class in "
                        "classes.txt")


def _open(path: Path) -> Image.Image:
    """A mask file as stored (its values are class indices, never rescaled)."""
    try:
        image = Image.open(path)
        image.load()
    except IMAGE_ERRORS as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc}); delete or replace it") from exc
    return image


def load_segmentation(root: str | Path) -> SegmentationSpec:
    """Find a VOC-style or plain layout under ``root`` and return its train and val splits.

    Example:
        >>> spec = load_segmentation("data/fm-dense")  # doctest: +SKIP
        >>> spec.classes[:2], len(spec.train)
        (['background', 'T-shirt/top'], 2000)
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"segmentation data {root} is not a folder; pass a VOC-style folder (JPEGImages/, "
                        "SegmentationClass/, ImageSets/Segmentation/) or one with train/images and train/masks")
    base = root / "VOCdevkit" / "VOC2012" if (root / "VOCdevkit" / "VOC2012").is_dir() else root
    find = _voc_split if (base / "ImageSets" / "Segmentation").is_dir() else _plain_split
    train, val = find(base, "train"), find(base, "val")
    classes = _class_names(base, train + val)
    return SegmentationSpec(root.name, MaskDataset(train, len(classes)), MaskDataset(val, len(classes)), classes)


def _voc_split(base: Path, split: str) -> list[tuple[Path, Path]]:
    listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{listing} is missing; a VOC-style folder lists each split's ids there")
    pairs = []
    for name in listing.read_text().split():
        image = next((base / "JPEGImages" / f"{name}{ext}" for ext in _IMAGE_EXTS
                      if (base / "JPEGImages" / f"{name}{ext}").is_file()), None)
        mask = base / "SegmentationClass" / f"{name}.png"
        if image is None or not mask.is_file():
            missing = mask if image is not None else base / "JPEGImages" / f"{name}.jpg"
            raise DataError(f"{listing} lists '{name}' but {missing} does not exist; fix the list or add the file")
        pairs.append((image, mask))
    if not pairs:
        raise DataError(f"{listing} lists no images; add ids, one per line")
    return pairs


def _plain_split(base: Path, split: str) -> list[tuple[Path, Path]]:
    images, masks = base / split / "images", base / split / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise DataError(f"{base} has neither ImageSets/Segmentation/ (VOC) nor {split}/images and {split}/masks; "
                        f"lay it out as {base}/{split}/images/<name>.jpg with {base}/{split}/masks/<name>.png")
    pairs = []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in _IMAGE_EXTS):
        mask = masks / f"{image.stem}.png"
        if not mask.is_file():
            raise DataError(f"image {image} has no mask {mask}; every image needs a mask of the same name")
        pairs.append((image, mask))
    if not pairs:
        raise DataError(f"{images} has no images ({', '.join(_IMAGE_EXTS)})")
    return pairs


def _class_names(base: Path, pairs: list[tuple[Path, Path]]) -> list[str]:
    listing = base / "classes.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if len(names) < 2:
            raise DataError(f"{listing} names {len(names)} class(es); list at least background and one class")
        return names
    first: dict[int, Path] = {}  # each class value the masks hold, and the first mask that holds it
    for _, path in pairs:
        for value in np.unique(read_mask(path)).tolist():
            first.setdefault(value, path)
    first.pop(IGNORE_INDEX, None)
    top = max(first, default=0)
    if first and len(first) < top + 1:  # a stray value (a 77 among 0-9) would silently make a 78-class model
        warnings.warn(f"{base} has no classes.txt, so its masks' values ({_ranges(sorted(first))}) number the "
                      f"classes: {top + 1} (0-{top}), {top + 1 - len(first)} of which no mask holds; if {top} is a "
                      f"stray value, fix {first[top]}, else list every class in {listing}",
                      DataSetWarning, stacklevel=3)
    return [str(i) for i in range(max(top + 1, 2))]


def _ranges(values: list[int]) -> str:
    """Sorted integers as runs: ``[0, 1, 2, 3, 77]`` -> ``0-3, 77``."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


class JointTransform:
    """Image and mask transformed together: random scale, crop and flip for training; resize and pad for val.

    The image's longer side is scaled to ``size`` (times a factor drawn from ``scale`` for training), then
    padded on the bottom and right to ``size`` and, for training, cropped to ``size`` at a random place and
    flipped with probability 0.5, all with torchvision's ``transforms.v2`` on ``tv_tensors``. Masks are
    resized with nearest neighbours and padded with 255, so padding is never scored; images are resized
    bilinearly with antialiasing and padded with zeros after normalisation (the mean). Random draws come
    from torch's RNG, which :class:`cwkd.data.transforms.Transformed` seeds per item for exact resume.
    The output is a normalised ``(C, size, size)`` float tensor and a ``(size, size)`` int64 mask.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], *, train: bool,
                 scale: tuple[float, float] = (0.5, 2.0), channels: int = 3) -> None:
        self.size, self.train, self.scale, self.channels = size, train, scale, channels
        self.normalize = v2.Normalize(list(mean), list(std))
        self.flip = v2.RandomHorizontalFlip(0.5)

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = TF.to_dtype(TF.to_image(image.convert("L" if self.channels == 1 else "RGB")), torch.float32,
                             scale=True)
        sample = (self.normalize(pixels), tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask))))
        factor = self.size / max(mask.shape)
        if self.train:
            factor *= float(torch.empty(()).uniform_(*self.scale))
        fill = {tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX}
        sample = scale_pad_crop(sample, factor, (self.size, self.size), fill=fill, crop=self.train)
        pixels, target = self.flip(sample) if self.train else sample
        return pixels.as_subclass(torch.Tensor).contiguous(), target.as_subclass(torch.Tensor).long().contiguous()
