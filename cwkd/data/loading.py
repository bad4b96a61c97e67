"""Transforms and loaders: from a model's timm data config to batches, seeded for exact resume.

The transform is built from the model's data config (input size, mean/std, interpolation), so the
same data set works for 1- and 3-channel models at any input size. :class:`EpochSampler` makes each
epoch's order depend on (seed, epoch) alone, and per-sample seeds make augmentation repeatable.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from cwkd.core.modelinfo import input_channels
from cwkd.data.feed import DeviceInput, resolve_workers
from cwkd.data.images import to_8bit
from cwkd.data.spec import DataSpec
from cwkd.errors import ConfigError, DataError

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

    A key ``(index, seed)`` (from :class:`EpochSampler`) runs the random transform under its own seed,
    so a sample's augmentation does not depend on which worker loads it or what was loaded before.

    Example:
        >>> masks = Transformed(spec.train, JointTransform(64, mean, std, train=True))  # doctest: +SKIP
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
    of :func:`build_loaders` normalise it on the device (:class:`cwkd.data.feed.DeviceInput`).
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


class EpochSampler(DistributedSampler):
    """Shuffle by ``(seed, epoch)`` alone and give every sample its own augmentation seed.

    Why: a resumed run must see the same order and the same random crops as an uninterrupted one,
    whatever the number of loader workers. It yields ``(index, seed)`` keys, which the loaders' datasets
    understand. ``set_epoch(epoch, start)`` also skips the first ``start`` samples of this rank's share,
    to finish an interrupted epoch. Outside a process group pass ``num_replicas=1, rank=0``.

    Example:
        >>> sampler = EpochSampler(dataset, seed=0, num_replicas=1, rank=0)
        >>> sampler.set_epoch(3, start=64)  # epoch 3, from its 65th sample
    """

    def __init__(self, dataset: Dataset, *, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use ``epoch``'s order, beginning at this rank's sample number ``start``."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(super().__iter__())[self.start:]
        gen = torch.Generator().manual_seed((self.seed + 1) * 1_000_003 + self.epoch)
        seeds = torch.randint(0, 2**62, (len(self.dataset),), generator=gen).tolist()  # type: ignore[arg-type]
        return iter([(i, seeds[i]) for i in order])


def _worker_init(_worker_id: int) -> None:
    """Loader workers leave stopping to the main process: they ignore SIGINT and SIGHUP, and SIGTERM
    unless the main process sent it (which is how it ends them).

    Why: Ctrl-C, and a scheduler's SIGTERM, reach every process of the group; a worker that died of it
    would make the main process fail on its next batch instead of stopping cleanly at a step boundary.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # a dropped ssh session: the main process saves and stops
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # Linux; elsewhere torch's own SIGTERM handler stays
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
        threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _exit_on_sigterm_from(parent: int) -> None:
    """Wait for SIGTERMs; exit quietly (status 0, as torch's handler does) on the main process's."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def check_split_sizes(spec: DataSpec, world: int = 1) -> None:
    """Refuse a data set too small to train on: each process needs 2 training images, and val one.

    Why: BatchNorm cannot train on a batch of one image, and an empty val split has no score.
    """
    if math.ceil(len(spec.train) / world) < 2:
        where, fix = (" per process", f" for {world} processes; add images or start fewer processes") \
            if world > 1 else ("", "; add images")
        raise DataError(f"training needs at least 2 training images{where}, and the train split of {spec.name} "
                        f"has {len(spec.train)}{fix} (BatchNorm cannot train on a batch of one)")
    if len(spec.val) == 0:
        raise DataError(f"the val split of {spec.name} has no images; add some, as training scores the model on "
                        "them after every epoch")


#: How a DataLoader worker's failure reads when shared memory (/dev/shm) ran out.
_SHM_ERROR = re.compile(r"shared memory|\bshm\b|bus error|</torch_", re.IGNORECASE)
_SHM_FIX = "pass --workers 0, or give the machine more shared memory (Docker: docker run --shm-size=2g ...)"


class _Loader(DataLoader):
    """A DataLoader whose batches go through ``on_device`` (uint8 images to the model's input on the device), and
    whose workers' shared-memory failures become one :class:`DataError` with the fix."""

    def __init__(self, *args, on_device: Callable | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_device = on_device

    def __iter__(self) -> Iterator:
        try:
            for batch in super().__iter__():
                yield batch if self.on_device is None else self.on_device(batch)
        except RuntimeError as exc:
            if self.num_workers == 0 or not _SHM_ERROR.search(str(exc)):
                raise
            first = str(exc).strip().splitlines()[0].split(". ")[0].rstrip(".")  # torch's own advice follows
            raise DataError(f"the data loader's {self.num_workers} worker process(es) ran out of shared memory "
                            f"(/dev/shm): {first}; {_SHM_FIX}") from exc


def _warn_small_shm(cfg: DataConfig, batch_size: int, workers: int, *, distributed: bool = False,
                    path: str = "/dev/shm", value_bytes: int = 4) -> None:
    """Warn when /dev/shm looks too small for the batches ``workers`` hand over (about 2 in flight each).

    Under torchrun every process on the machine shares /dev/shm: local rank 0 alone warns, for all of them.
    ``value_bytes``: 1 for uint8 images, 4 for float ones.
    """
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed else 1
    if distributed and os.environ.get("LOCAL_RANK", "0") != "0":
        return
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return  # no /dev/shm (not Linux): torch uses another mechanism
    need = value_bytes * batch_size * math.prod(cfg.input_size) * workers * 2 * processes  # prefetch_factor 2
    if free < need:
        each = f" in each of {processes} processes" if processes > 1 else ""
        warnings.warn(f"{path} has {free / 2**20:.0f} MiB free, but {workers} loader worker(s){each} need about "
                      f"{need / 2**20:.0f} MiB for batches of {batch_size}; if they crash, {_SHM_FIX}",
                      stacklevel=3)


def build_loaders(
    spec: DataSpec,
    cfg: DataConfig,
    *,
    batch_size: int,
    workers: int | str = "auto",
    device: torch.device | str = "cpu",
    distributed: bool = False,
    seed: int = 0,
    datasets: tuple[Dataset, Dataset] | None = None,
    collate: Callable | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Build the train loader (shuffled, seeded, last partial batch dropped) and the val loader (in order).

    The train loader's sampler is an :class:`EpochSampler` (sharded under ``distributed``): call
    ``train_loader.sampler.set_epoch(epoch)`` each epoch. Its order and augmentations depend on ``seed``
    and the epoch alone. Under ``distributed`` val uses a ``DistributedSampler`` that pads to a multiple of
    the world size, so a few samples may be counted twice. ``datasets`` (a task's transformed train and
    val sets) replace the image transform of :func:`transformed_datasets`; ``collate`` (a task's) batches them.

    Example:
        >>> train_loader, val_loader = build_loaders(spec, cfg, batch_size=64, workers=0)
    """
    workers = resolve_workers(workers)
    if batch_size < 1 or workers < 0:
        raise ConfigError(f"batch_size must be >= 1 and workers >= 0 (got {batch_size} and {workers})")
    train, val = datasets or transformed_datasets(spec, cfg)
    common = {
        "batch_size": batch_size,
        "num_workers": workers,
        "pin_memory": torch.device(device).type == "cuda",
        "persistent_workers": workers > 0,
        "worker_init_fn": _worker_init if workers > 0 else None,
        "collate_fn": collate,
    }
    if workers > 0:
        _warn_small_shm(cfg, batch_size, workers, distributed=distributed, value_bytes=_value_bytes(train))
    common["on_device"] = DeviceInput(cfg.mean, cfg.std, device)
    shard = {} if distributed else {"num_replicas": 1, "rank": 0}
    train_sampler = EpochSampler(train, seed=seed, **shard)
    # The generator only seeds the workers' base RNG, which keeps loading off the global RNG.
    gen = torch.Generator().manual_seed(seed)
    train_loader = _Loader(train, sampler=train_sampler, generator=gen,
                              drop_last=len(train_sampler) >= batch_size, **common)
    val_sampler = DistributedSampler(val, shuffle=False) if distributed else None
    val_loader = _Loader(val, sampler=val_sampler, shuffle=False, **common)
    return train_loader, val_loader


def _value_bytes(dataset: Dataset) -> int:
    """1 for items of :func:`build_transform` with ``uint8``, else 4 (float images, as other tasks give)."""
    transform = getattr(getattr(dataset, "transform", None), "transform", None)
    steps = getattr(transform, "transforms", None) or [None]
    return 1 if isinstance(steps[-1], T.PILToTensor) else 4


def set_epoch(loader, seed: int, epoch: int, start: int = 0) -> None:
    """Make the epoch's order and augmentations depend on (seed, epoch) alone, from sample ``start`` on.

    ``start`` (samples of this rank already trained) needs the :class:`EpochSampler` that
    :func:`build_loaders` gives; a resumed run then finishes the epoch it was stopped in.
    """
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch, start)
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed * 1000 + epoch)
