"""Data loading as a user meets it: named sets, image folders and their mistakes, transforms, loaders."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cwkd.data.loading import build_loaders
from cwkd.data.transforms import build_transform, data_config
from cwkd.errors import ConfigError, DataError
from cwkd.tasks.classification import data as cwkd_data
from cwkd.tasks.classification.data import ArrayDataset, load_data, read_idx
from cwkd.tasks.classification.models import create_model


def _png(path: Path, mode: str = "RGB", size: int = 12, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def _folder(
    root: Path, classes=("cat", "dog"), per_class: int = 3, mode: str = "RGB", val: str = "val"
) -> Path:
    for split, n in (("train", per_class), (val, 2)):
        for c in classes:
            for i in range(n):
                _png(root / split / c / f"{i}.png", mode=mode, seed=i)
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.fixture
def no_system_data(tmp_path, monkeypatch):
    """Hide the Debian package, $CWKD_DATA and ~/.cache so 'not found' paths are exercised."""
    monkeypatch.setattr(cwkd_data, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.delenv("CWKD_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# ----------------------------------------------------------------------------- IDX and named sets


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_gz_and_raw(tmp_path, suffix):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([1, -2, 70000], dtype=">i4")
    _write_idx(tmp_path / f"img{suffix}", images)
    _write_idx(tmp_path / f"int{suffix}", ints)
    np.testing.assert_array_equal(read_idx(tmp_path / f"img{suffix}"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / f"int{suffix}"), [1, -2, 70000])


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"not an idx file")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    _write_idx(tmp_path / "short", np.zeros((2, 3), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


def _fake_fashion_mnist(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n, suffix in (("train", 20, ".gz"), ("t10k", 10, "")):  # one split gzipped, one raw
        _write_idx(
            folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        )
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))


def test_fashion_mnist_from_root_and_env(tmp_path, monkeypatch, no_system_data):
    _fake_fashion_mnist(tmp_path / "fm")
    spec = load_data("fashion-mnist", root=str(tmp_path / "fm"))
    assert (spec.num_classes, len(spec.train), len(spec.val)) == (10, 20, 10)
    assert (spec.channels, spec.native_size) == (1, 28)
    img, label = spec.train[3]
    assert img.mode == "L" and img.size == (28, 28) and label == 3
    monkeypatch.setenv("CWKD_DATA", str(tmp_path))  # also found as $CWKD_DATA/fashion-mnist/
    (tmp_path / "fm").rename(tmp_path / "fashion-mnist")
    assert len(load_data("fashion_mnist").val) == 10


def test_fashion_mnist_missing_says_where_and_how(tmp_path, no_system_data):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        load_data("fashion-mnist", root=str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value) and "--data-root" in str(err.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_without_download(tmp_path, name, no_system_data):
    with pytest.raises(DataError, match="--download"):
        load_data(name, root=str(tmp_path))


def test_cifar_corrupt_folder_says_fix(tmp_path, no_system_data):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match="incomplete or corrupt"):
        load_data("cifar10", root=str(tmp_path))


def test_bundled_mini_set_is_balanced():
    spec = load_data("fashion-mnist-mini")
    assert spec.num_classes == 10 and spec.classes[0] == "T-shirt/top"
    assert np.bincount(spec.train.labels).tolist() == [600] * 10
    assert np.bincount(spec.val.labels).tolist() == [100] * 10
    img, _ = spec.val[0]
    assert img.mode == "L" and img.size == (28, 28)


# ----------------------------------------------------------------------------- image folders


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("L", 1)])
def test_image_folder_loads(tmp_path, mode, channels):
    spec = load_data(str(_folder(tmp_path / "ds", mode=mode)))
    assert spec.classes == ["cat", "dog"] and spec.channels == channels and spec.native_size is None
    assert (len(spec.train), len(spec.val)) == (6, 4)
    img, label = spec.train[5]
    assert img.mode == mode and label == 1


def test_image_folder_accepts_test_split(tmp_path):
    assert len(load_data(str(_folder(tmp_path / "ds", val="test"))).val) == 4


def _no_val(root: Path) -> None:
    _png(root / "train" / "a" / "0.png")


def _no_train(root: Path) -> None:
    _png(root / "val" / "a" / "0.png")


def _no_classes(root: Path) -> None:
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    _png(root / "train" / "loose.png")


def _no_images(root: Path) -> None:
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "notes.txt").write_text("no images here")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_no_val, "no val/"),
        (_no_train, "no train/"),
        (_no_classes, "no class folders"),
        (_no_images, "has no images"),
    ],
)
def test_image_folder_layout_errors(tmp_path, make, message):
    make(tmp_path / "ds")
    with pytest.raises(DataError, match=message):
        load_data(str(tmp_path / "ds"))


def test_image_folder_path_errors(tmp_path):
    with pytest.raises(DataError, match="nor an existing folder"):
        load_data(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="nor an existing folder"):
        load_data("imagenet-typo")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        load_data(str(tmp_path / "file.txt"))


def test_image_folder_class_mismatch_names_classes(tmp_path):
    root = _folder(tmp_path / "ds")
    _png(root / "train" / "bird" / "0.png")
    _png(root / "val" / "fish" / "0.png")
    with pytest.raises(DataError, match=r"only in train: \['bird'\].*only in val: \['fish'\]"):
        load_data(str(root))


def test_corrupt_image_raises_with_hint(tmp_path):
    root = _folder(tmp_path / "ds")
    bad = root / "train" / "cat" / "1.png"
    bad.write_bytes(b"\x89PNG garbage, not an image")
    spec = load_data(str(root))
    with pytest.raises(DataError, match="--skip-corrupt") as err:
        spec.train[1]
    assert str(bad) in str(err.value)


def test_corrupt_image_skipped_with_warning(tmp_path):
    root = _folder(tmp_path / "ds")
    (root / "train" / "cat" / "1.png").write_bytes(b"garbage")
    spec = load_data(str(root), skip_corrupt=True)
    with pytest.warns(UserWarning, match="1.png"):
        img, label = spec.train[1]  # replaced by the next good sample, cat/2.png
    assert isinstance(img, Image.Image) and label == 0
    spec.train[1]  # the same bad file is not counted twice
    assert spec.train.skipped == 1
    assert sum(1 for _ in (spec.train[i] for i in range(len(spec.train)))) == 6


def test_all_corrupt_split_raises(tmp_path):
    root = _folder(tmp_path / "ds", classes=("a",), per_class=2)
    for p in (root / "train" / "a").iterdir():
        p.write_bytes(b"garbage")
    spec = load_data(str(root), skip_corrupt=True)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 2 images"):
        spec.train[0]


# ----------------------------------------------------------------------------- transforms and loaders


@pytest.fixture(scope="module")
def gray_model():
    return create_model("test_resnet", num_classes=10, in_chans=1)


@pytest.fixture(scope="module")
def rgb_model():
    return create_model("test_resnet", num_classes=10, in_chans=3)


def test_data_config_reads_model_channels(gray_model, rgb_model):
    gray = data_config(gray_model, input_size=32)
    assert gray.input_size == (1, 32, 32) and len(gray.mean) == len(gray.std) == 1
    rgb = data_config(rgb_model, native_size=28)
    assert rgb.input_size == (3, 160, 160) and len(rgb.mean) == 3  # model default kept
    assert data_config(rgb_model, in_chans=1).input_size[0] == 1
    with pytest.raises(ConfigError, match="input_size"):
        data_config(rgb_model, input_size=0)


@pytest.mark.parametrize("model_chans", [1, 3])
@pytest.mark.parametrize("data_mode", ["L", "RGB"])
@pytest.mark.parametrize("size", [32, 72])
@pytest.mark.parametrize("train", [True, False])
def test_transform_shapes(gray_model, rgb_model, model_chans, data_mode, size, train):
    model = gray_model if model_chans == 1 else rgb_model
    cfg = data_config(model, input_size=size)
    tf = build_transform(cfg, train=train, channels=1 if data_mode == "L" else 3)
    shape = (40, 30, 3) if data_mode == "RGB" else (40, 30)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    out = tf(img)
    assert out.shape == (model_chans, size, size) and out.dtype == torch.float32
    if not train:
        assert torch.equal(out, tf(img))


def test_transform_rejects_mismatched_stats(rgb_model):
    cfg = dataclasses.replace(data_config(rgb_model, input_size=32), mean=(0.5,))
    with pytest.raises(ConfigError, match="mean/std"):
        build_transform(cfg, train=False, channels=3)


def _array_spec(n_train: int, n_val: int) -> cwkd_data.DataSpec:
    rng = np.random.default_rng(0)
    classes = [str(i) for i in range(4)]

    def split(n: int) -> ArrayDataset:
        return ArrayDataset(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 4, classes)

    return cwkd_data.DataSpec("toy", split(n_train), split(n_val), classes, channels=1, native_size=28)


def test_build_loaders_batches(gray_model):
    spec = _array_spec(40, 10)
    cfg = data_config(gray_model, input_size=28)
    train, val = build_loaders(spec, cfg, batch_size=16, workers=0)
    x, y = next(iter(train))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(train) == 2  # 40 // 16, the last partial batch dropped
    assert torch.cat([y for _, y in val]).tolist() == (np.arange(10) % 4).tolist()  # in order, all kept
    again, _ = build_loaders(spec, cfg, batch_size=16, workers=0)
    assert torch.equal(next(iter(again))[1], y)  # same seed, same order
    assert not train.pin_memory


def test_build_loaders_small_train_set_not_dropped(gray_model):
    train, _ = build_loaders(
        _array_spec(5, 5), data_config(gray_model, input_size=28), batch_size=16, workers=0
    )
    assert len(train) == 1 and next(iter(train))[0].shape[0] == 5


def test_build_loaders_rejects_bad_options(gray_model):
    with pytest.raises(ConfigError):
        build_loaders(_array_spec(5, 5), data_config(gray_model), batch_size=0)


@pytest.mark.slow
def test_build_loaders_with_workers_and_folder(tmp_path, rgb_model):
    spec = load_data(str(_folder(tmp_path / "ds", mode="L", per_class=4)))
    train, val = build_loaders(spec, data_config(rgb_model, input_size=32), batch_size=4, workers=2)
    assert train.persistent_workers
    x, _ = next(iter(train))
    assert x.shape == (4, 3, 32, 32)
    assert sum(len(y) for _, y in val) == 4


def test_build_loaders_distributed(tmp_path, gray_model):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        train, val = build_loaders(
            _array_spec(40, 10),
            data_config(gray_model, input_size=28),
            batch_size=16,
            workers=0,
            distributed=True,
        )
        assert isinstance(train.sampler, torch.utils.data.DistributedSampler) and len(train) == 2
        assert sum(len(y) for _, y in val) == 10
    finally:
        torch.distributed.destroy_process_group()
