"""Feeding the device: ``--workers auto``, and uint8 batches normalised on the device (cwkd.data.feed)."""

from __future__ import annotations

import os

import pytest

from cwkd.data import feed
from cwkd.errors import ConfigError
from cwkd.training.config import TrainConfig
from tests.helpers import cli_fails

# ----------------------------------------------------------------------------- 1. --workers auto


@pytest.mark.parametrize(("cores", "processes", "expected"), [
    (1, 1, 0),     # a single core: load in the main process
    (2, 1, 2),     # this machine: the old default
    (16, 1, 16),   # the GPU machine
    (64, 1, 16),   # capped
    (16, 4, 4),    # torchrun with 4 processes on one machine: a quarter each
    (128, 8, 16),  # an 8-GPU node
    (4, 8, 1),     # more processes than cores: still one each
])
def test_auto_is_this_process_share_of_the_cores(cores, processes, expected):
    assert feed.resolve_workers("auto", cores=cores, processes=processes) == expected


def test_auto_reads_the_affinity_and_torchrun_local_world_size(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(12)))
    else:
        monkeypatch.setattr(os, "cpu_count", lambda: 12)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert feed.resolve_workers("auto") == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert feed.resolve_workers("auto") == 4


def test_a_number_of_workers_is_kept_and_a_bad_one_refused():
    assert feed.resolve_workers(0) == 0 and feed.resolve_workers(7) == 7
    for bad in ("many", -1, 2.5):
        with pytest.raises(ConfigError, match="--workers"):
            feed.resolve_workers(bad)


def test_config_defaults_to_auto_and_parses_what_is_typed():
    cfg = TrainConfig(data="fashion-mnist-mini", student="test_resnet", method="none")
    assert cfg.workers == "auto"
    assert TrainConfig(data="x", student="test_resnet", method="none", workers="Auto").workers == "auto"
    assert TrainConfig(data="x", student="test_resnet", method="none", workers="3").workers == 3
    assert TrainConfig.from_dict(cfg.to_dict()).workers == "auto"  # config.json keeps auto: a resume re-resolves it
    assert TrainConfig.from_dict({**cfg.to_dict(), "workers": 2}).workers == 2  # a config.json from before
    with pytest.raises(ConfigError, match=r"--workers must be from 0 to 256 \(or auto\)"):
        TrainConfig(data="x", student="test_resnet", method="none", workers=-1)


def test_cli_refuses_a_workers_value_that_is_not_a_number_or_auto():
    cli_fails(["train", "--model", "test_resnet", "--data", "fashion-mnist-mini", "--workers", "lots"],
              "--workers must be a whole number of at least 0, or auto")
    cli_fails(["eval", "no-such.safetensors", "--workers", "-3"], "--workers must be from 0 to 256")


# ----------------------------------------------------------------------------- 2. uint8 batches on the device


def _spec(tmp_path, gray: bool):
    """A gray array data set of 28 px items, or an RGB image folder of 80 px files (RandomResizedCrop's path)."""
    import numpy as np

    from cwkd.data.spec import DataSpec
    from cwkd.tasks.classification.data import ArrayDataset, load_data
    from tests.helpers import make_image_folder

    if not gray:
        return load_data(str(make_image_folder(tmp_path / "rgb", per_class=6, size=80)))
    rng = np.random.default_rng(0)
    split = [ArrayDataset(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 2, ["a", "b"])
             for n in (12, 6)]
    return DataSpec("gray", split[0], split[1], ["a", "b"], channels=1, native_size=28)


@pytest.mark.parametrize(("gray", "size"), [(True, 32), (False, 72), (False, 224)])
def test_device_normalised_batches_equal_the_float_transform(tmp_path, gray, size):
    """What the model sees is unchanged: the loaders' uint8 batches, normalised by DeviceInput, equal the old host
    path (ToTensor + Normalize in the transform) for the same samples and augmentation seeds, train and val."""
    import timm
    import torch

    from cwkd.data.loading import build_loaders
    from cwkd.data.transforms import Transformed, _OnImage, build_transform, data_config

    spec = _spec(tmp_path, gray)
    model = timm.create_model("test_resnet", in_chans=1 if gray else 3)
    dcfg = data_config(model, input_size=size, in_chans=1 if gray else 3, mean=[0.3] if gray else None,
                       std=[0.2] if gray else None)
    train_loader, val_loader = build_loaders(spec, dcfg, batch_size=4, workers=0, seed=3)
    for loader, split, train in ((train_loader, spec.train, True), (val_loader, spec.val, False)):
        assert loader.dataset[0][0].dtype == torch.uint8  # what the workers hand over
        images, labels = next(iter(loader))
        keys = list(iter(loader.sampler))[:4] if train else range(4)
        old = Transformed(split, _OnImage(build_transform(dcfg, train=train, channels=spec.channels)))
        expected = torch.stack([old[key][0] for key in keys])
        assert images.dtype == torch.float32 and images.shape == expected.shape
        torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
        assert labels.tolist() == [old[key][1] for key in keys]


def test_device_input_leaves_float_and_list_batches_alone():
    """A task that normalises on the host (segmentation) or batches lists (detection) passes through unchanged."""
    import torch

    to_input = feed.DeviceInput((0.5,) * 3, (0.25,) * 3, "cpu")
    floats = [torch.rand(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)]
    assert to_input(floats) is floats
    lists = ([torch.rand(3, 4, 4)], [{"boxes": torch.zeros(0, 4)}])
    assert to_input(lists) is lists
    out = to_input((torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2), "label"))
    assert isinstance(out, tuple) and out[1] == "label"
    torch.testing.assert_close(out[0][0, :, 0], torch.tensor([[-2.0, 2.0]] * 3))


def test_teacher_remap_of_a_device_batch_equals_the_teachers_own_normalisation(tmp_path):
    """The teacher, trained on other statistics, gets the student's device-normalised batch remapped: the same as
    normalising the raw pixels with its own mean and std on the old host path."""
    import dataclasses

    import timm
    import torch

    from cwkd.core.distiller import Renormalize
    from cwkd.data.loading import build_loaders
    from cwkd.data.transforms import Transformed, _OnImage, build_transform, data_config

    spec = _spec(tmp_path, gray=False)
    dcfg = data_config(timm.create_model("test_resnet"), input_size=72)
    teacher = dataclasses.replace(dcfg, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    _, val_loader = build_loaders(spec, dcfg, batch_size=4, workers=0)
    remap = Renormalize.between((dcfg.mean, dcfg.std), (teacher.mean, teacher.std))
    own = Transformed(spec.val, _OnImage(build_transform(teacher, train=False, channels=3)))
    torch.testing.assert_close(remap(next(iter(val_loader))[0]), torch.stack([own[i][0] for i in range(4)]),
                               rtol=0, atol=1e-5)


def test_the_shm_warning_counts_uint8_batches_as_one_byte_a_value(tmp_path, monkeypatch):
    """/dev/shm room for uint8 batches but not for float ones: classification does not warn, a float task does."""
    import math
    import shutil
    import warnings
    from collections import namedtuple

    import timm

    from cwkd.data.loading import build_loaders
    from cwkd.data.transforms import Transformed, _OnImage, build_transform, data_config

    spec = _spec(tmp_path, gray=True)
    dcfg = data_config(timm.create_model("test_resnet", in_chans=1), input_size=32, in_chans=1)
    uint8_need = 4 * math.prod(dcfg.input_size) * 1 * 2  # batch 4, one worker, 2 batches in flight
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(0, 0, 2 * uint8_need))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_loaders(spec, dcfg, batch_size=4, workers=1)
    floats = tuple(Transformed(split, _OnImage(build_transform(dcfg, train=False, channels=1)))
                   for split in (spec.train, spec.val))
    with pytest.warns(UserWarning, match="/dev/shm has 0 MiB free"):
        build_loaders(spec, dcfg, batch_size=4, workers=1, datasets=floats)


# ----------------------------------------------------------------------------- 3. the data-wait share


@pytest.mark.slow
def test_an_input_bound_run_reports_its_data_wait(folder, tmp_path, monkeypatch):
    """metrics.jsonl and the epoch line give the share of the epoch spent waiting for batches: most of it when
    every image takes 40 ms to read and the model a few."""
    import time

    from cwkd.tasks.classification.data import ImageFolderDataset
    from cwkd.training.engine import run
    from tests.helpers import read_metrics

    read = ImageFolderDataset.__getitem__
    monkeypatch.setattr(ImageFolderDataset, "__getitem__", lambda self, i: (time.sleep(0.04), read(self, i))[1])
    lines = []
    monkeypatch.setattr("cwkd.training.console.RunConsole.info", lambda self, text: lines.append(text))
    cfg = TrainConfig(data=str(folder), student="test_resnet", method="none", epochs=1, batch_size=4, input_size=32,
                      workers=0, device="cpu", out=str(tmp_path / "run"))
    run(cfg)
    share = read_metrics(tmp_path / "run")[0]["data_wait"]
    assert 0.5 < share <= 1.0
    assert f"(data wait {100 * share:.0f}%)" in next(line for line in lines if line.startswith("epoch 1/1"))
