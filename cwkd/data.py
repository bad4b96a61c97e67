"""Data sets, transforms and loaders: Fashion-MNIST, CIFAR, the bundled mini set and image folders.

Every data set yields ``(PIL.Image, int)``; the transform that turns images into tensors is built from
the model's timm data config, so the same data works for 1- and 3-channel models at any input size.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import signal
import struct
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from cwkd.errors import ConfigError, DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
#: Names ``load_data`` knows; anything else is taken as a path to an image folder.
DATASETS = ("fashion-mnist", "fashion-mnist-mini", "cifar10", "cifar100")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SMALL_IMAGE_MAX = 64  # at or below this size, use CIFAR-style pad-and-crop instead of RandomResizedCrop

_FMNIST_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_val": "t10k-images-idx3-ubyte", "y_val": "t10k-labels-idx1-ubyte",
}  # fmt: skip
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CIFAR = {"cifar10": ("CIFAR10", "cifar-10-batches-py"), "cifar100": ("CIFAR100", "cifar-100-python")}
_BAD_IMAGE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files


@dataclass
class DataSpec:
    """A loaded data set: train/val splits of ``(PIL.Image, int)`` plus what the transforms need to know."""

    name: str
    train: Dataset
    val: Dataset
    classes: list[str]
    channels: int
    native_size: int | None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ArrayDataset(Dataset):
    """Images held in a uint8 array ``[N, H, W]`` (gray) or ``[N, H, W, 3]`` (RGB), served as PIL images.

    Why PIL and not tensors: every data set then goes through the same torchvision transforms.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels; the arrays must match")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


class ImageFolderDataset(Dataset):
    """Images in ``split/<class>/<file>``, read lazily; unreadable files raise or are skipped.

    With ``skip_corrupt`` a bad file is replaced by the next readable one, reported once with
    ``warnings.warn`` and counted in ``skipped``. The record of bad files lives in shared memory, so
    loader workers (separate processes) add to the same count and skip a file another worker found.
    """

    def __init__(
        self, samples: list[tuple[Path, int]], classes: list[str], mode: str, skip_corrupt: bool
    ) -> None:
        self.samples = samples
        self.classes = classes
        self.mode = mode  # "L" or "RGB": every image is converted to it so batches stack
        self.skip_corrupt = skip_corrupt
        self._bad = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    @property
    def skipped(self) -> int:
        """How many unreadable files have been skipped so far (each file counted once)."""
        return int(self._bad.sum())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        for step in range(len(self.samples)):
            i = (index + step) % len(self.samples)
            if self._bad[i]:
                continue
            path, label = self.samples[i]
            try:
                return _open_image(path, self.mode), label
            except _BAD_IMAGE as exc:
                if not self.skip_corrupt:
                    raise DataError(
                        f"cannot read image {path} ({type(exc).__name__}: {exc}); delete or replace it, "
                        "or pass --skip-corrupt (skip_corrupt=True) to skip unreadable files"
                    ) from None  # the message names the cause; a chained PIL traceback would only add noise
                self._bad[i] = True
                warnings.warn(f"skipping unreadable image {path} ({type(exc).__name__}: {exc})", stacklevel=2)
        raise DataError(f"none of the {len(self.samples)} images in this split could be read")


def _open_image(path: Path, mode: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert(mode)  # convert() forces the full decode, so bad files fail here, not later


# ----------------------------------------------------------------------------- IDX files (Fashion-MNIST)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw, into a numpy array.

    Example:
        >>> labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path} ({exc}); re-download or reinstall the data") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); re-download or reinstall the data")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(shape)
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise DataError(f"{path} is truncated or padded: header says {shape}; re-download or reinstall it")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def find_fashion_mnist(root: str | Path | None = None) -> dict[str, Path] | None:
    """Return the four Fashion-MNIST IDX files (gz or raw) in the first place that has them all, or None."""
    for base in _fashion_mnist_places(root):
        for folder in (base, base / "fashion-mnist", base / "FashionMNIST" / "raw"):
            found = {key: _first_file(folder, stem) for key, stem in _FMNIST_FILES.items()}
            if all(found.values()):
                return found  # type: ignore[return-value]
    return None


def _first_file(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


def _fashion_mnist_places(root: str | Path | None) -> list[Path]:
    places = [Path(root).expanduser()] if root else []
    if os.environ.get("CWKD_DATA"):
        places.append(Path(os.environ["CWKD_DATA"]).expanduser())
    return [*places, SYSTEM_FASHION_MNIST]


def _load_fashion_mnist(root: str | None, download: bool) -> DataSpec:
    files = find_fashion_mnist(root)
    if files is None and download:
        target = _download_root(root)
        _torchvision_fetch("FashionMNIST", target)
        files = find_fashion_mnist(target)
    if files is None:
        looked = ", ".join(str(p) for p in _fashion_mnist_places(root))
        raise DataError(
            f"Fashion-MNIST not found (looked in {looked}); run `apt-get install dataset-fashion-mnist`, "
            "point --data-root (or $CWKD_DATA) at the IDX files, or pass --download"
        )
    return _gray_spec(
        "fashion-mnist", {key: read_idx(path) for key, path in files.items()}, FASHION_MNIST_CLASSES
    )


def _load_mini() -> DataSpec:
    asset = resources.files("cwkd") / "assets" / "fashion_mnist_mini.npz"
    if not asset.is_file():
        raise DataError(f"the bundled mini data set is missing ({asset}); reinstall cwkd")
    with resources.as_file(asset) as path, np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    return _gray_spec("fashion-mnist-mini", arrays, [str(c) for c in arrays["classes"]])


def _gray_spec(name: str, arrays: dict[str, np.ndarray], classes: Sequence[str]) -> DataSpec:
    train = ArrayDataset(arrays["x_train"], arrays["y_train"], classes)
    val = ArrayDataset(arrays["x_val"], arrays["y_val"], classes)
    return DataSpec(name, train, val, list(classes), channels=1, native_size=train.images.shape[1])


# ----------------------------------------------------------------------------- CIFAR (torchvision)


def _download_root(root: str | None) -> Path:
    return Path(root or os.environ.get("CWKD_DATA") or Path.home() / ".cache" / "cwkd").expanduser()


def _torchvision_fetch(cls_name: str, root: Path, **kwargs: object) -> Dataset:
    """Build a torchvision data set with download=True, turning network failures into one clean DataError."""
    import torchvision.datasets as tvd

    try:
        return getattr(tvd, cls_name)(str(root), download=True, **kwargs)
    except Exception as exc:  # URLError, HTTPError, checksum errors: all mean "could not fetch"
        raise DataError(
            f"downloading {cls_name} into {root} failed ({type(exc).__name__}: {exc}); check the network "
            "or place the files there yourself and pass --data-root"
        ) from exc


def _load_cifar(name: str, root: str | None, download: bool) -> DataSpec:
    import torchvision.datasets as tvd

    cls_name, folder = _CIFAR[name]
    places = [Path(p).expanduser() for p in (root, os.environ.get("CWKD_DATA")) if p]
    places.append(Path.home() / ".cache" / "cwkd")
    base = next((p for p in places if (p / folder).is_dir()), None)
    if base is None and download:
        base = _download_root(root)
        _torchvision_fetch(cls_name, base, train=True)
    if base is None:
        looked = ", ".join(str(p) for p in places)
        raise DataError(
            f"{name} not found (looked for {folder}/ in {looked}); pass --download to fetch it, "
            "or point --data-root (or $CWKD_DATA) at the folder that holds it"
        )
    try:
        splits = [getattr(tvd, cls_name)(str(base), train=t, download=download) for t in (True, False)]
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise DataError(
            f"{name} in {base / folder} is incomplete or corrupt ({exc}); delete it and pass --download"
        ) from exc
    return DataSpec(name, splits[0], splits[1], list(splits[0].classes), channels=3, native_size=32)


# ----------------------------------------------------------------------------- image folders


def _load_folder(data: str, skip_corrupt: bool) -> DataSpec:
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(
            f"data '{data}' is neither a known data set ({', '.join(DATASETS)}) nor an existing folder; "
            "pass one of those names or a folder with train/ and val/ sub-folders"
        )
    if not root.is_dir():
        raise DataError(f"data path {root} is a file; pass a folder with train/ and val/ sub-folders")
    train_dir = root / "train"
    val_dir = next((d for d in (root / "val", root / "test") if d.is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        missing = "train/" if not train_dir.is_dir() else "val/ (or test/)"
        raise DataError(
            f"{root} has no {missing} sub-folder; lay it out as {root}/train/<class>/<image> "
            f"and {root}/val/<class>/<image>"
        )
    train_classes, val_classes = _class_folders(train_dir), _class_folders(val_dir)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"train/ and {val_dir.name}/ have different class folders (only in train: {only_train or 'none'};"
            f" only in {val_dir.name}: {only_val or 'none'}); give both splits the same class folders"
        )
    train = _scan_split(train_dir, train_classes, every_class=True)
    val = _scan_split(val_dir, val_classes, every_class=False)
    channels = _guess_channels(train)
    mode = "L" if channels == 1 else "RGB"
    return DataSpec(
        name=str(data),
        train=ImageFolderDataset(train, train_classes, mode, skip_corrupt),
        val=ImageFolderDataset(val, val_classes, mode, skip_corrupt),
        classes=train_classes,
        channels=channels,
        native_size=None,
    )


def _class_folders(split: Path) -> list[str]:
    classes = sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{split} has no class folders; put each class's images in {split}/<class>/")
    return classes


def _scan_split(split: Path, classes: list[str], *, every_class: bool) -> list[tuple[Path, int]]:
    """List ``(file, label)``; training needs images in every class, validation in at least one."""
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if every_class and not files:
            raise DataError(
                f"class folder {split / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder from every split"
            )
        samples += [(p, label) for p in files if p.is_file()]
    if not samples:
        raise DataError(f"{split} has no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return samples


def _guess_channels(samples: list[tuple[Path, int]], probe: int = 8) -> int:
    """1 if the first few readable images are all grayscale, else 3; why: decides the model's in_chans."""
    modes = []
    for path, _ in samples[: probe * 4]:
        try:
            with Image.open(path) as img:
                modes.append(img.mode)
        except _BAD_IMAGE:
            continue  # reading it for real reports (or skips) it later
        if len(modes) == probe:
            break
    return 1 if modes and all(m in ("1", "L", "LA", "I", "I;16", "F") for m in modes) else 3


def load_data(
    data: str, *, root: str | None = None, download: bool = False, skip_corrupt: bool = False
) -> DataSpec:
    """Load a named data set or an image folder with ``train/`` and ``val/`` (or ``test/``) sub-folders.

    Known names win over folders of the same name; write ``./cifar10`` to mean a folder. ``root`` is
    where named data sets are looked for (then ``$CWKD_DATA``); ``skip_corrupt`` applies to folders.

    Example:
        >>> spec = load_data("fashion-mnist-mini")
        >>> spec.num_classes, len(spec.train), len(spec.val)
        (10, 6000, 1000)
    """
    key = data.strip().lower().replace("_", "-")
    if key == "fashion-mnist":
        return _load_fashion_mnist(root, download)
    if key == "fashion-mnist-mini":
        return _load_mini()
    if key in _CIFAR:
        return _load_cifar(key, root, download)
    return _load_folder(data, skip_corrupt)


# ----------------------------------------------------------------------------- transforms and loaders


def data_config(
    model: nn.Module,
    *,
    input_size: int | None = None,
    in_chans: int | None = None,
    native_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict:
    """Resolve input size, mean/std, interpolation and crop_pct from the model's timm config.

    ``input_size`` overrides the model's default height and width; ``mean`` and ``std`` override the
    model's statistics (one value, or one per input channel). ``native_size`` is accepted for the
    caller's bookkeeping but does not change the size: the engine decides whether to train at it. mean and
    std get one entry per model input channel (gray models use the average of the RGB statistics).

    Example:
        >>> cfg = data_config(create_model("test_resnet", in_chans=1), input_size=32)
        >>> cfg["input_size"], len(cfg["mean"])
        ((1, 32, 32), 1)
    """
    for label, value in (("input_size", input_size), ("in_chans", in_chans), ("native_size", native_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value}")
    cfg = resolve_data_config(model=model)
    chans = in_chans or _model_in_chans(model) or cfg["input_size"][0]
    _, height, width = cfg["input_size"]
    if input_size is not None:
        height = width = input_size
    return {
        "input_size": (chans, height, width),
        "mean": _override("--mean", mean, chans) or _per_channel(cfg["mean"], chans),
        "std": _override("--std", std, chans) or _per_channel(cfg["std"], chans),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }


def _model_in_chans(model: nn.Module) -> int | None:
    """The input channels of the model's first convolution; why: timm's config says 3 even for in_chans=1."""
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def default_input_size(native: int | None) -> int | None:
    """Small native images (28 px, 32 px) train at the next multiple of 32; folders use the model's size."""
    return None if native is None else 32 * math.ceil(native / 32)


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
    """Convert a PIL image to ``mode`` (a class, not a lambda, so loader workers can pickle it)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)


def _interpolation(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode("bilinear" if name == "random" else name)
    except ValueError as exc:
        raise ConfigError(f"unknown interpolation '{name}'; use bilinear, bicubic or nearest") from exc


def build_transform(cfg: dict, *, train: bool, channels: int) -> Callable[[Image.Image], torch.Tensor]:
    """Build the image -> tensor transform for a model config from :func:`data_config`.

    Channels are converted to what the model takes (gray data is replicated for RGB models, RGB data is
    made gray for 1-channel models). Images of 64 px or less train with resize + pad-and-crop + flip; larger
    ones with RandomResizedCrop + flip. Evaluation is deterministic: resize and center crop.

    Example:
        >>> tf = build_transform(cfg, train=False, channels=1)
        >>> tf(spec.val[0][0]).shape
        torch.Size([1, 32, 32])
    """
    chans, height, width = cfg["input_size"]
    if chans not in (1, 3) or channels not in (1, 3):
        raise ConfigError(f"only 1- and 3-channel data and models work (model {chans}, data {channels})")
    if len(cfg["mean"]) != chans or len(cfg["std"]) != chans:
        raise ConfigError(f"mean/std need {chans} entries for a {chans}-channel model; use data_config")
    interp = _interpolation(cfg["interpolation"])
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
        scale = math.floor(min(size) / cfg["crop_pct"])
        steps += [T.Resize(scale, interpolation=interp), T.CenterCrop(size)]
    steps += [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    return T.Compose(steps)


class _Transformed(Dataset):
    """Apply ``transform`` to the image of each ``(image, label)`` item.

    A key ``(index, seed)`` (from :class:`EpochSampler`) runs the random transform under its own seed,
    so a sample's augmentation does not depend on which worker loads it or what was loaded before.
    """

    def __init__(self, base: Dataset, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        img, label = self.base[index]
        if seed is None:
            return self.transform(img), label
        with _seeded(seed):
            return self.transform(img), label


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for a block (torchvision's transforms draw from it), then restore its state."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


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
    """Loader workers leave stopping to the main process: they ignore SIGINT, and SIGTERM unless the
    main process sent it (which is how it ends them).

    Why: Ctrl-C, and a scheduler's SIGTERM, reach every process of the group; a worker that died of it
    would make the main process fail on its next batch instead of stopping cleanly at a step boundary.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # Linux; elsewhere torch's own SIGTERM handler stays
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
        threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _exit_on_sigterm_from(parent: int) -> None:
    """Wait for SIGTERMs; exit quietly (status 0, as torch's handler does) on the main process's."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def build_loaders(
    spec: DataSpec,
    cfg: dict,
    *,
    batch_size: int,
    workers: int = 2,
    device: torch.device | str = "cpu",
    distributed: bool = False,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Build the train loader (shuffled, seeded, last partial batch dropped) and the val loader (in order).

    The train loader's sampler is an :class:`EpochSampler` (sharded under ``distributed``): call
    ``train_loader.sampler.set_epoch(epoch)`` each epoch. Its order and augmentations depend on ``seed``
    and the epoch alone. Under ``distributed`` val uses a ``DistributedSampler`` that pads to a multiple of
    the world size, so a few samples may be counted twice.

    Example:
        >>> train_loader, val_loader = build_loaders(spec, cfg, batch_size=64, workers=0)
    """
    if batch_size < 1 or workers < 0:
        raise ConfigError(f"batch_size must be >= 1 and workers >= 0 (got {batch_size} and {workers})")
    train = _Transformed(spec.train, build_transform(cfg, train=True, channels=spec.channels))
    val = _Transformed(spec.val, build_transform(cfg, train=False, channels=spec.channels))
    common = {
        "batch_size": batch_size,
        "num_workers": workers,
        "pin_memory": torch.device(device).type == "cuda",
        "persistent_workers": workers > 0,
        "worker_init_fn": _worker_init if workers > 0 else None,
    }
    shard = {} if distributed else {"num_replicas": 1, "rank": 0}
    train_sampler = EpochSampler(train, seed=seed, **shard)
    # The generator only seeds the workers' base RNG, which keeps loading off the global RNG.
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, sampler=train_sampler, generator=gen,
                              drop_last=len(train_sampler) >= batch_size, **common)
    val_sampler = DistributedSampler(val, shuffle=False) if distributed else None
    val_loader = DataLoader(val, sampler=val_sampler, shuffle=False, **common)
    return train_loader, val_loader
