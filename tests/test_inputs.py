"""Input data and model inputs as a user hands them over: deep images, mixed channels, broken IDX files,
tiny splits, a small /dev/shm, and paths where a model name belongs (issue 10)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cwkd.cli.app import app
from cwkd.data import images
from cwkd.data.loading import build_loaders, check_split_sizes
from cwkd.data.spec import DataSpec
from cwkd.data.transforms import build_transform, data_config
from cwkd.errors import DataError
from cwkd.files.checkpoint import save_checkpoint
from cwkd.files.metadata import CheckpointMeta
from cwkd.tasks.classification.data import ArrayDataset, load_data
from cwkd.tasks.classification.models import create_model

from .helpers import cli_fails as _fails

runner = CliRunner()
FAST = ["--epochs", "1", "--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu"]


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _folder(root: Path, per_class: dict[str, np.ndarray], train: int = 3, val: int = 2) -> Path:
    """A train/val folder with ``train`` (``val``) copies of each class's image; the class order is sorted."""
    for split, count in (("train", train), ("val", val)):
        for name, pixels in per_class.items():
            for i in range(count):
                _save(root / split / name / f"{i}{'.tif' if pixels.dtype.kind == 'f' else '.png'}", pixels)
    return root


def _pixels(spec: DataSpec, index: int = 0) -> np.ndarray:
    return np.asarray(spec.train[index][0])


# ----------------------------------------------------------------------------- 1. high bit depths


RAMP16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535 in 257s


def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    spec = load_data(str(_folder(tmp_path, {"a": RAMP16, "b": RAMP16})))
    assert Image.open(next((tmp_path / "train" / "a").iterdir())).mode == "I;16"
    np.testing.assert_array_equal(_pixels(spec), np.arange(256).reshape(16, 16))  # value / 257, every level kept
    assert spec.channels == 1 and spec.modes.deep == 10


def test_float_tiff_is_scaled_not_thresholded(tmp_path):
    unit, wide = np.linspace(0, 1, 256, dtype=np.float32), np.linspace(-10, 300, 256, dtype=np.float32)
    plain = np.linspace(0, 255, 256, dtype=np.float32)
    spec = load_data(str(_folder(tmp_path, {"a": unit.reshape(16, 16), "b": wide.reshape(16, 16),
                                            "c": plain.reshape(16, 16)}, train=1)))
    np.testing.assert_array_equal(_pixels(spec, 0).ravel(), np.arange(256))  # 0-1 floats: times 255
    np.testing.assert_array_equal(_pixels(spec, 1).ravel(), np.clip(np.rint(wide), 0, 255))  # else clipped
    np.testing.assert_array_equal(_pixels(spec, 2).ravel(), np.arange(256))


@pytest.mark.parametrize(("top", "scale"), [(65535, 1 / 257), (4_000_000, 255 / 4_000_000)])
def test_32bit_integer_image_is_scaled_by_its_depth(top, scale):
    pixels = np.linspace(0, top, 256).astype(np.int32).reshape(16, 16)
    img = images.to_8bit(Image.fromarray(pixels))
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), np.rint(pixels * scale).astype(np.uint8))


def test_transform_scales_a_16bit_image_from_any_dataset():
    """A dataset from the Python API that yields I;16 images gets the same scaling in the transform."""
    model = create_model("test_resnet", in_chans=1)
    tf = build_transform(data_config(model, input_size=16), train=False, channels=1)
    deep = tf(Image.fromarray(RAMP16))
    eight = tf(Image.fromarray((RAMP16 // 257).astype(np.uint8)))
    torch.testing.assert_close(deep, eight)


# ----------------------------------------------------------------------------- 2. channel decision


GRAY = np.full((16, 16), 90, np.uint8)
COLOUR = np.stack([np.full((16, 16), v, np.uint8) for v in (200, 40, 10)], axis=-1)


def test_gray_first_class_does_not_make_a_colour_set_gray(tmp_path):
    spec = load_data(str(_folder(tmp_path, {"a_gray": GRAY, "b_colour": COLOUR}, train=9)))
    assert spec.channels == 3
    assert (spec.modes.colour, spec.modes.gray) == (11, 11)
    assert spec.train[0][0].mode == "RGB" and _pixels(spec, 0).tolist()[0][0] == [90, 90, 90]
    assert _pixels(spec, 9).tolist()[0][0] == [200, 40, 10]  # colour kept
    assert spec.modes.describe(3) == "images: 11 colour, 11 gray -> 3 channels (11 gray converted to RGB)"
    assert spec.modes.describe(1) == ("images: 11 colour, 11 gray -> 1 channel (11 colour converted to gray; "
                                      "pass --in-chans 3 to keep colour)")


def test_colour_only_in_val_counts(tmp_path):
    _folder(tmp_path, {"a": GRAY, "b": GRAY})
    _save(tmp_path / "val" / "b" / "colour.png", COLOUR)
    assert load_data(str(tmp_path)).channels == 3


def test_a_large_folder_is_sampled_across_every_class(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "SCAN_LIMIT", 12)
    _folder(tmp_path, {"a": GRAY, "b": GRAY, "c": GRAY, "d": COLOUR}, train=10, val=2)
    spec = load_data(str(tmp_path))
    assert spec.channels == 3 and spec.modes.scanned < spec.modes.total == 48
    assert f"header scan of {spec.modes.scanned} of 48 files" in spec.modes.describe(3)


@pytest.mark.slow
def test_training_log_says_what_was_decided(tmp_path):
    data = _folder(tmp_path / "data", {"a_gray": GRAY, "b_colour": COLOUR}, train=9)
    result = runner.invoke(app, ["train", "--model", "test_resnet", "--data", str(data),
                                 "--out", str(tmp_path / "run"), *FAST])
    assert result.exit_code == 0, result.output
    assert "images: 11 colour, 11 gray -> 3 channels (11 gray converted to RGB)" in result.output
    assert "input (3, 32, 32)" in result.output


# ----------------------------------------------------------------------------- 3. broken IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def _fashion(root: Path, n_train: int = 6, n_val: int = 4) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_val, dtype=np.uint8) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stem, array in arrays.items():
        paths[stem] = root / f"{stem}.gz"
        paths[stem].write_bytes(gzip.compress(_idx_bytes(array)))
    return paths


def _rewrite(path: Path, raw: bytes, compress: bool = True) -> None:
    path.write_bytes(gzip.compress(raw) if compress else raw)


BROKEN = {
    "truncated gz": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "corrupt gz body": lambda p: p.write_bytes(p.read_bytes()[:20] + b"\xff" * 200 + p.read_bytes()[220:]),
    "bad magic": lambda p: _rewrite(p, b"\x12\x34" + gzip.decompress(p.read_bytes())[2:]),
    "header cut short": lambda p: _rewrite(p, gzip.decompress(p.read_bytes())[:9]),
    "padded": lambda p: _rewrite(p, gzip.decompress(p.read_bytes()) + b"\0" * 28),
    "labels file as images": lambda p: p.write_bytes((p.parent / "train-labels-idx1-ubyte.gz").read_bytes()),
}


@pytest.mark.parametrize("fault", list(BROKEN))
def test_broken_fashion_mnist_file_is_named_with_the_fix(tmp_path, fault):
    target = _fashion(tmp_path)["train-images-idx3-ubyte"]
    BROKEN[fault](target)
    with pytest.raises(DataError) as err:
        load_data("fashion-mnist", root=str(tmp_path))
    assert str(target) in str(err.value) and "dataset-fashion-mnist" in str(err.value)


def test_labels_out_of_range_are_refused(tmp_path):
    target = _fashion(tmp_path)["t10k-labels-idx1-ubyte"]
    _rewrite(target, _idx_bytes(np.array([0, 3, 12, 1], dtype=np.uint8)))
    with pytest.raises(DataError, match="holds label 12, but Fashion-MNIST labels are 0-9"):
        load_data("fashion-mnist", root=str(tmp_path))


def test_truncated_gz_is_one_line_not_aborted(tmp_path):
    """click turned gzip's EOFError into a bare "Aborted." (even under --debug)."""
    BROKEN["truncated gz"](_fashion(tmp_path / "fm")["train-images-idx3-ubyte"])
    _fails(["train", "--model", "test_resnet", "--data", "fashion-mnist", "--data-root", tmp_path / "fm",
            "--out", tmp_path / "run", *FAST], "train-images-idx3-ubyte.gz is truncated", "dataset-fashion-mnist")
    result = runner.invoke(app, ["--debug", "train", "--model", "test_resnet", "--data", "fashion-mnist",
                                 "--data-root", str(tmp_path / "fm"), *FAST])
    assert isinstance(result.exception, DataError) and "Aborted" not in result.output
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 4. tiny splits


def _array_spec(n_train: int, n_val: int) -> DataSpec:
    def split(n):
        return ArrayDataset(np.zeros((n, 8, 8), np.uint8), np.zeros(n, np.int64), ["a"])
    return DataSpec("toy", split(n_train), split(n_val), ["a"], channels=1, native_size=8)


def test_one_training_image_is_refused_before_a_run_directory_exists(tmp_path):
    data = _folder(tmp_path / "data", {"a": COLOUR}, train=1, val=1)
    _fails(["train", "--model", "test_resnet", "--data", data, "--out", tmp_path / "run", *FAST],
           "needs at least 2 training images", "has 1")
    assert not (tmp_path / "run").exists()


def test_split_sizes_per_process_and_empty_val():
    check_split_sizes(_array_spec(2, 1))  # two images train (as one batch of 2)
    with pytest.raises(DataError, match=r"per process, and the train split of toy has 3 for 4 processes"):
        check_split_sizes(_array_spec(3, 1), world=4)
    with pytest.raises(DataError, match="val split of toy has no images"):
        check_split_sizes(_array_spec(4, 0))


def test_empty_val_split_is_one_line(tmp_path):
    _fashion(tmp_path / "fm", n_train=6, n_val=0)
    _fails(["train", "--model", "test_resnet", "--data", "fashion-mnist", "--data-root", tmp_path / "fm",
            "--out", tmp_path / "run", *FAST], "val split of fashion-mnist has no images")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 5. small /dev/shm


SHM_MESSAGES = [
    "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's workers are "
    "out of shared memory. Please try to raise your shared memory limit.",
    "unable to write to file </torch_18692_1954506624>: No space left on device (28)",
    "unable to allocate shared memory(shm) for file </torch_1_2>: Resource temporarily unavailable (11)",
]


def test_shared_memory_failure_names_the_fix(monkeypatch):
    raised = {"message": ""}

    def crash(self):
        raise RuntimeError(raised["message"])

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", crash)
    cfg = data_config(create_model("test_resnet", in_chans=1), input_size=8)
    train, val = build_loaders(_array_spec(4, 2), cfg, batch_size=2, workers=2)
    for raised["message"] in SHM_MESSAGES:
        for loader in (train, val):
            with pytest.raises(DataError, match=r"ran out of shared memory.*--workers 0.*--shm-size=2g"):
                next(iter(loader))
    raised["message"] = "something else broke"
    with pytest.raises(RuntimeError, match="something else broke"):  # other errors are left alone
        next(iter(train))


def test_small_shm_warns_before_loading(monkeypatch):
    import shutil

    from cwkd.data import loading as loaders

    monkeypatch.setattr(loaders.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(64 << 20, 60 << 20, 4 << 20))
    cfg = data_config(create_model("test_resnet"), input_size=224)
    with pytest.warns(UserWarning, match=r"/dev/shm has 4 MiB free.*--workers 0"):
        build_loaders(_array_spec(4, 2), cfg, batch_size=64, workers=2)


def test_small_shm_under_torchrun_warns_once_for_every_process_on_the_machine(monkeypatch):
    import shutil
    import warnings

    from cwkd.data import loading as loaders

    cfg = data_config(create_model("test_resnet"), input_size=224)
    one = 4 * 64 * 3 * 224 * 224 * 2 * 2  # what one process's 2 workers hand over at batch 64
    monkeypatch.setattr(loaders.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(8 * one, 0, 2 * one))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.warns(UserWarning, match=r"2 loader worker\(s\) in each of 4 processes need about"):
        loaders._warn_small_shm(cfg, 64, 2, distributed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaders._warn_small_shm(cfg, 64, 2)  # one process alone fits
        monkeypatch.setenv("LOCAL_RANK", "1")
        loaders._warn_small_shm(cfg, 64, 2, distributed=True)  # the other ranks stay quiet


@pytest.mark.slow
def test_shared_memory_failure_in_a_run_is_one_line(tmp_path, monkeypatch):
    def crash(self):
        raise RuntimeError(SHM_MESSAGES[0])

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", crash)
    data = _folder(tmp_path / "data", {"a": COLOUR, "b": GRAY}, train=4)
    _fails(["train", "--model", "test_resnet", "--data", data, "--out", tmp_path / "run", *FAST[:-4],
            "--workers", "2", "--device", "cpu"], "ran out of shared memory", "--workers 0", "--shm-size=2g")


# ----------------------------------------------------------------------------- 6. paths where a model belongs


@pytest.fixture()
def colour_data(tmp_path):
    return _folder(tmp_path / "data", {"a": COLOUR, "b": GRAY})


def _distill(tmp_path, data, *args) -> list:
    return ["distill", "--student", "test_resnet", "--data", data, "--out", tmp_path / "run", *FAST, *args]


def test_teacher_run_directory_points_at_its_checkpoint(tmp_path, colour_data):
    run = tmp_path / "runs" / "teacher"
    run.mkdir(parents=True)
    _fails(_distill(tmp_path, colour_data, "--teacher", run), f"--teacher {run} is a directory",
           f"(e.g. --teacher {run}/best.safetensors); it has no checkpoint yet")
    (run / "best.safetensors").write_bytes(b"")
    _fails(_distill(tmp_path, colour_data, "--teacher", run), f"pass its best.safetensors (e.g. --teacher "
           f"{run}/best.safetensors)")


@pytest.mark.parametrize("value", ["runs/teacher", "teacher.pth", "t.ckpt"])
def test_missing_teacher_path_is_not_an_unknown_model(tmp_path, colour_data, value):
    message = _fails(_distill(tmp_path, colour_data, "--teacher", value), f"file {value} does not exist")
    assert "unknown model" not in message


def test_path_as_student_is_never_looked_up_as_a_model(tmp_path, colour_data):
    weights = tmp_path / "student.pth"
    weights.write_bytes(b"")
    args = ["train", "--data", colour_data, "--out", tmp_path / "run", *FAST, "--model"]
    _fails([*args, weights], f"{weights} is a file, not a model name", "--weights")
    _fails([*args, "nets/resnet18"], "file nets/resnet18 does not exist")


def test_cwkd_checkpoint_as_teacher_weights_says_use_teacher(tmp_path, colour_data):
    model = create_model("test_resnet", num_classes=2)
    ckpt = tmp_path / "best.safetensors"
    meta = CheckpointMeta(model="test_resnet", num_classes=2, in_chans=3, input_size=(3, 32, 32),
                          mean=(0.5,) * 3, std=(0.5,) * 3)
    save_checkpoint(ckpt, {f"student.{k}": v for k, v in model.state_dict().items()}, meta)
    message = _fails(_distill(tmp_path, colour_data, "--teacher", "test_resnet", "--teacher-weights", ckpt),
                     f"{ckpt} is a cwkd checkpoint (of test_resnet); pass it as --teacher {ckpt}")
    assert "classes" not in message
