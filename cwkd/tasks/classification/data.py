"""Data sets: Fashion-MNIST, CIFAR, the bundled mini set and image folders.

Every data set yields ``(PIL.Image, int)``; :mod:`cwkd.data.loading` turns them into batches with transforms
built from the model's timm data config.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cwkd.data.images import IMAGE_ERRORS, open_image, scan_modes
from cwkd.data.spec import DataSpec
from cwkd.errors import DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
#: Names ``load_data`` knows; anything else is taken as a path to an image folder.
DATASETS = ("fashion-mnist", "fashion-mnist-mini", "cifar10", "cifar100")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_FMNIST_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_val": "t10k-images-idx3-ubyte", "y_val": "t10k-labels-idx1-ubyte",
}  # fmt: skip
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CIFAR = {"cifar10": ("CIFAR10", "cifar-10-batches-py"), "cifar100": ("CIFAR100", "cifar-100-python")}


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
                return open_image(path, self.mode), label
            except IMAGE_ERRORS as exc:
                if not self.skip_corrupt:
                    raise DataError(
                        f"cannot read image {path} ({type(exc).__name__}: {exc}); delete or replace it, "
                        "or pass --skip-corrupt (skip_corrupt=True) to skip unreadable files"
                    ) from None  # the message names the cause; a chained PIL traceback would only add noise
                self._bad[i] = True
                warnings.warn(f"skipping unreadable image {path} ({type(exc).__name__}: {exc})", stacklevel=2)
        raise DataError(f"none of the {len(self.samples)} images in this split could be read")


# ----------------------------------------------------------------------------- IDX files (Fashion-MNIST)


def read_idx(path: str | Path, fix: str = "re-download it or reinstall the data") -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw, into a numpy array.

    A file that is cut short, not IDX, or whose size disagrees with its header raises :class:`DataError`
    naming the file and ending with ``fix``.

    Example:
        >>> labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip raises EOFError for a cut-short file
        what = "is truncated" if isinstance(exc, EOFError) else "cannot be read"
        raise DataError(f"IDX file {path} {what} ({type(exc).__name__}: {exc}); {fix}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'}); {fix}")
    ndim, start = raw[3], 4 + 4 * raw[3]
    if len(raw) < start:
        raise DataError(f"{path} is truncated inside its header ({len(raw)} bytes); {fix}")
    shape = struct.unpack(f">{ndim}i", raw[4:start])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(shape)
    body = raw[start:]
    if min(shape, default=0) < 0 or len(body) != count * dtype.itemsize:
        raise DataError(f"{path} is truncated or padded: its header says {shape} ({count * dtype.itemsize:,} "
                        f"bytes of data), the file has {len(body):,}; {fix}")
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
    fix = ("delete it and pass --download to fetch it again, or reinstall the Debian package "
           "(`apt-get install --reinstall dataset-fashion-mnist`)")
    arrays = {key: read_idx(path, fix) for key, path in files.items()}
    for key, path in files.items():  # a well-formed IDX file can still be the wrong one
        _check_fashion_array(arrays[key], key.startswith("x"), path, fix)
    return _gray_spec("fashion-mnist", arrays, FASHION_MNIST_CLASSES)


def _check_fashion_array(array: np.ndarray, images: bool, path: Path, fix: str) -> None:
    """Images must be uint8 ``(N, H, W)``, labels uint8 ``(N,)`` in 0-9."""
    if array.dtype != np.uint8 or array.ndim != (3 if images else 1):
        want = "images (N, 28, 28)" if images else "labels (N,)"
        raise DataError(f"{path} holds {array.dtype} data of shape {array.shape}, not Fashion-MNIST {want}; {fix}")
    if not images and array.size and int(array.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{path} holds label {int(array.max())}, but Fashion-MNIST labels are 0-9; {fix}")


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
    modes = scan_modes([[p for p, _ in group] for split in (train, val)
                        for _, group in itertools.groupby(split, key=lambda sample: sample[1])])
    mode = "L" if modes.channels == 1 else "RGB"
    return DataSpec(
        name=str(data),
        train=ImageFolderDataset(train, train_classes, mode, skip_corrupt),
        val=ImageFolderDataset(val, val_classes, mode, skip_corrupt),
        classes=train_classes,
        channels=modes.channels,
        native_size=None,
        modes=modes,
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
