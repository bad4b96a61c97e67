"""Transforms: from a model's timm data config to the image -> tensor transform of each split, seeded per item.

The transform is built from the model's data config (input size, mean/std, interpolation), so the
same data set works for 1- and 3-channel models at any input size. :class:`Transformed` runs each item's
random transform under its own seed (from :class:`cwkd.data.loading.EpochSampler`), so augmentation is repeatable.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from cwkd.core.modelinfo import input_channels
from cwkd.data.images import to_8bit
from cwkd.data.spec import DataSpec
from cwkd.errors import ConfigError

#: At or below this input size, use CIFAR-style pad-and-crop instead of RandomResizedCrop.
SMALL_IMAGE_MAX = 64


@dataclass(frozen=True)
class DataConfig:
    """The student's input: (channels, height, width), per-channel mean and std, resize interpolation, crop.

    Example:
        >>> DataConfig(input_size=(1, 32, 32), mean=(0.5,), std=(0.25,)).crop_pct
        0.875
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875


def data_config(
    model: nn.Module,
    *,
    input_size: int | None = None,
    in_chans: int | None = None,
    native_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DataConfig:
    """Resolve input size, mean/std, interpolation and crop_pct from the model's timm config.

    ``input_size`` overrides the model's default height and width; ``mean`` and ``std`` override the
    model's statistics (one value, or one per input channel). ``native_size`` is accepted for the
    caller's bookkeeping but does not change the size: the engine decides whether to train at it. mean and
    std get one entry per model input channel (gray models use the average of the RGB statistics).

    Example:
        >>> cfg = data_config(create_model("test_resnet", in_chans=1), input_size=32)
        >>> cfg.input_size, len(cfg.mean)
        ((1, 32, 32), 1)
    """
    for label, value in (("input_size", input_size), ("in_chans", in_chans), ("native_size", native_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value}")
    cfg = resolve_data_config(model=model)
    chans = in_chans or input_channels(model) or cfg["input_size"][0]
    _, height, width = cfg["input_size"]
    if input_size is not None:
        height = width = input_size
    return DataConfig(
        input_size=(chans, height, width),
        mean=_override("--mean", mean, chans) or _per_channel(cfg["mean"], chans),
        std=_override("--std", std, chans) or _per_channel(cfg["std"], chans),
        interpolation=cfg.get("interpolation", "bilinear"),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )


def _override(flag: str, values: Sequence[float] | None, chans: int) -> tuple[float, ...] | None:
    """A user's --mean/--std: one value for every channel, or exactly one per channel."""
    if not values:
        return None
    if len(values) not in (1, chans):
        raise ConfigError(f"{flag} has {len(values)} values but the model takes {chans} input channel(s); "
                          f"give 1 or {chans} comma-separated values")
    return tuple(float(v) for v in values) * (chans if len(values) == 1 else 1)


def _per_channel(values: Sequence[float], chans: int) -> tuple[float, ...]:
    """One statistic per channel; a channel count the stats were not made for gets their average."""
    return tuple(map(float, values)) if len(values) == chans else (sum(values) / len(values),) * chans


class _ConvertMode:
    """Convert a PIL image to ``mode`` (a class, not a lambda, so loader workers can pickle it).

    16-bit, 32-bit and float images are scaled to 8 bits first (:func:`~cwkd.data.images.to_8bit`): PIL's own
    conversion would clip them.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        img = to_8bit(img)
        return img if img.mode == self.mode else img.convert(self.mode)


def _interpolation(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode("bilinear" if name == "random" else name)
    except ValueError as exc:
        raise ConfigError(f"unknown interpolation '{name}'; use bilinear, bicubic or nearest") from exc


def build_transform(cfg: DataConfig, *, train: bool, channels: int,
                    uint8: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Build the image -> tensor transform for a model config from :func:`data_config`.

    The tensor is the model's normalised float input, or with ``uint8`` the pixels as a uint8 ``[C, H, W]``
    tensor, which :class:`cwkd.data.feed.DeviceInput` normalises on the device (the loaders' way).

    Channels are converted to what the model takes (gray data is replicated for RGB models, RGB data is
    made gray for 1-channel models). Images of 64 px or less train with resize + pad-and-crop + flip; larger
    ones with RandomResizedCrop + flip. Evaluation is deterministic: resize and center crop.

    Example:
        >>> tf = build_transform(cfg, train=False, channels=1)
        >>> tf(spec.val[0][0]).shape
        torch.Size([1, 32, 32])
    """
    chans, height, width = cfg.input_size
    if chans not in (1, 3) or channels not in (1, 3):
        raise ConfigError(f"only 1- and 3-channel data and models work (model {chans}, data {channels})")
    if len(cfg.mean) != chans or len(cfg.std) != chans:
        raise ConfigError(f"mean/std need {chans} entries for a {chans}-channel model; use data_config")
    interp = _interpolation(cfg.interpolation)
    size = (height, width)
    steps: list[Callable] = [_ConvertMode("L" if chans == 1 else "RGB")]
    if max(size) <= SMALL_IMAGE_MAX:
        steps.append(T.Resize(size, interpolation=interp))
        if train:
            steps += [T.RandomCrop(size, padding=min(size) // 8), T.RandomHorizontalFlip()]
        else:
            steps.append(T.CenterCrop(size))
    elif train:
        steps += [T.RandomResizedCrop(size, interpolation=interp), T.RandomHorizontalFlip()]
    else:
        scale = math.floor(min(size) / cfg.crop_pct)
        steps += [T.Resize(scale, interpolation=interp), T.CenterCrop(size)]
    steps += [T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(steps)


class Transformed(Dataset):
    """Apply ``transform`` to each item of ``base`` (``transform(*item)``): the one transformed data set of every task.

    A key ``(index, seed)`` (from :class:`~cwkd.data.loading.EpochSampler`) runs the random transform under its own
    seed, so a sample's augmentation does not depend on which worker loads it or what was loaded before.

    Example:
        >>> train = Transformed(spec.train, JointTransform(64, mean, std, train=True))  # doctest: +SKIP
    """

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:
            return self.transform(*self.base[index])
        with seeded(seed):
            return self.transform(*self.base[index])


class _OnImage:
    """An image transform applied to the image of an ``(image, label)`` item (a class: workers pickle it)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image, label: int) -> tuple[torch.Tensor, int]:
        return self.transform(img), label


def transformed_datasets(spec: DataSpec, cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The train and val splits of ``(image, label)`` items through :func:`build_transform`, as uint8 pixels.

    Why uint8: a batch then crosses from the workers, and to the GPU, in a quarter of the bytes; the loaders
    of :func:`~cwkd.data.loading.build_loaders` normalise it on the device (:class:`cwkd.data.feed.DeviceInput`).
    """
    return tuple(Transformed(split, _OnImage(build_transform(cfg, train=train, channels=spec.channels, uint8=True)))
                 for split, train in ((spec.train, True), (spec.val, False)))  # type: ignore[return-value]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG and Python's ``random`` for a block (transforms draw from them), then restore both."""
    state, py_state = torch.get_rng_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)
        random.setstate(py_state)
