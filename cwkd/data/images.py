"""Decoding image files: high bit depths scaled to 8 bits, and one channel count for a whole folder; and the
resize-pad-crop the dense tasks' augmentations share (:func:`scale_pad_crop`).

PIL opens 16-bit gray PNGs and TIFFs as ``I;16``, 32-bit integer images as ``I`` and float TIFFs as
``F``; its ``convert("L")`` clips those to 0-255 instead of scaling them, which turns a 16-bit image
black-and-white. :func:`to_8bit` scales them first. (16-bit RGB and RGBA PNGs already open as 8-bit
``RGB``/``RGBA``: PIL keeps the high byte.)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.transforms import v2

from cwkd.errors import DataError

#: Modes with one channel of information (a gray image); every other mode counts as colour, palette
#: images included, so a colour data set is never read as gray.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
#: Modes whose pixels do not fit in 8 bits; :func:`to_8bit` scales them.
DEEP_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
#: Up to this many files are read (header only) to decide a folder's channel count; above it, an even
#: sample across every class and split. Why this number: about 1 s for 10,000 small PNGs on a 2-core machine.
SCAN_LIMIT = 10_000
#: What PIL raises on a bad file.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float image to an 8-bit gray (``L``) image; others pass through.

    16-bit values are divided by 257 (65535 -> 255). 32-bit integers are scaled from the depth their
    largest value needs: 8 bits as they are, 16 bits by 1/257, beyond that by 255 / the image's
    maximum. Floats are taken as 0-1 when the image's largest value is at most 1, otherwise as 0-255
    (clipped); NaN becomes 0. Negative values clip to 0.

    Example:
        >>> to_8bit(Image.open("depth16.png")).mode  # doctest: +SKIP
        'L'
    """
    if img.mode not in DEEP_MODES:
        return img
    pixels = np.asarray(img, dtype=np.float64)
    top = float(np.nanmax(pixels)) if pixels.size and not np.isnan(pixels).all() else 0.0
    if img.mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0
    elif img.mode.startswith("I;16") or 255 < top <= 65535:
        scale = 1 / 257
    elif top > 65535:
        scale = 255.0 / top
    else:
        scale = 1.0
    scaled = np.nan_to_num(pixels * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # uint8 2-D: mode L


def open_image(path: Path, mode: str) -> Image.Image:
    """Read ``path`` fully as ``mode`` ("L" or "RGB"), high bit depths scaled to 8 bits first."""
    with Image.open(path) as img:
        img.load()  # decode now, so a bad file fails here, not in a later transform
        return to_8bit(img).convert(mode)


@dataclass(frozen=True)
class ModeCount:
    """What a header scan found: colour and gray images, and how many of them are deeper than 8 bits."""

    colour: int = 0
    gray: int = 0
    deep: int = 0
    scanned: int = 0
    total: int = 0

    @property
    def channels(self) -> int:
        """3 if any image is colour (gray ones are then replicated, which loses nothing), else 1."""
        return 3 if self.colour or not self.gray else 1

    def describe(self, in_chans: int) -> str:
        """One line for the run log, e.g. ``images: 1,234 colour, 56 gray -> 3 channels (56 gray converted to RGB)``."""
        found = [f"{n:,} {kind}" for n, kind in ((self.colour, "colour"), (self.gray, "gray")) if n]
        sample = f" (header scan of {self.scanned:,} of {self.total:,} files)" if self.scanned < self.total else ""
        line = f"images: {', '.join(found) or 'none readable'}{sample} -> {in_chans} channel{'s' * (in_chans > 1)}"
        notes = []
        if in_chans == 3 and self.gray:
            notes.append(f"{self.gray:,} gray converted to RGB")
        elif in_chans == 1 and self.colour:
            notes.append(f"{self.colour:,} colour converted to gray; pass --in-chans 3 to keep colour")
        if self.deep:
            notes.append(f"{self.deep:,} with 16-bit, 32-bit or float pixels scaled to 8 bits")
        return line + (f" ({'; '.join(notes)})" if notes else "")


def scan_modes(groups: list[list[Path]], limit: int | None = None) -> ModeCount:
    """Count colour and gray images from file headers alone (no pixel is decoded).

    ``groups`` are the files of each class of each split. When they hold more than ``limit`` files
    (default :data:`SCAN_LIMIT`), an evenly spaced sample of every group is read instead, so no class
    is left out. Unreadable files are not counted here; reading them for real reports (or skips) them.
    """
    limit = limit or SCAN_LIMIT
    total = sum(len(g) for g in groups)
    share = math.ceil(limit / max(1, len(groups)))
    picked = [f for g in groups for f in (g if total <= limit else _spread(g, share))]
    modes: Counter[str] = Counter()
    for path in picked:
        try:
            with Image.open(path) as img:
                modes[img.mode] += 1
        except IMAGE_ERRORS:
            continue
    gray = sum(n for m, n in modes.items() if m in GRAY_MODES)
    deep = sum(n for m, n in modes.items() if m in DEEP_MODES)
    return ModeCount(colour=sum(modes.values()) - gray, gray=gray, deep=deep, scanned=len(picked), total=total)


def _spread(files: list[Path], count: int) -> list[Path]:
    """``count`` files spread evenly over ``files`` (all of them when there are fewer)."""
    if len(files) <= count:
        return files
    step = len(files) / count
    return [files[int(i * step)] for i in range(count)]


def read_image(path: Path) -> Image.Image:
    """An RGB image for a dense task; 16-bit, 32-bit and float images scaled to 8 bits as for classification."""
    try:
        return open_image(path, "RGB")
    except IMAGE_ERRORS as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc}); delete or replace it") from exc


def scale_pad_crop(sample: tuple, factor: float, out: tuple[int, int], *, fill: float | Mapping[type, Any],
                   crop: bool) -> Any:
    """Resize a v2 sample (an image first) by ``factor``, pad it on the bottom and right to at least ``out``.

    With ``crop`` it is then cropped to ``out`` at a random place (torch's RNG); without, it keeps the
    padded size. The sample's other ``tv_tensors`` move with the image (torchvision's ``transforms.v2``).
    Why pad before the crop, not ``RandomCrop(pad_if_needed=True)``: that pads both sides and places a
    small image anywhere in the crop, where training has always kept it at the top left, as for val.
    """
    height, width = sample[0].shape[-2:]
    size = [max(1, round(height * factor)), max(1, round(width * factor))]
    sample = v2.Resize(size, antialias=True)(sample)
    pad = [0, 0, max(0, out[1] - size[1]), max(0, out[0] - size[0])]
    if any(pad):
        sample = v2.Pad(pad, fill=fill)(sample)
    return v2.RandomCrop(out)(sample) if crop else sample
