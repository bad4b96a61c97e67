"""Model creation: aliases, suggestions, offline pretrained weights, and fine-tuning from a file."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cwkd import CheckpointError, ModelNotFoundError, create_model
from cwkd.cli.app import app
from cwkd.tasks.classification.models import resolve_name


def test_aliases_and_suggestions():
    assert resolve_name("mobilenetv1") == "mobilenetv1_100"
    with pytest.raises(ModelNotFoundError, match="did you mean"):
        resolve_name("resnet5")


def test_pretrained_offline_fails_fast_with_the_offline_route(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="--weights"):
        create_model("test_resnet", pretrained=True)
    assert time.monotonic() - started < 10


def test_weights_file_with_another_head_fine_tunes(tmp_path):
    source = create_model("test_resnet", num_classes=1000, in_chans=3)
    path = tmp_path / "imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        create_model("test_resnet", num_classes=10, weights=path)  # a teacher must match exactly
    model = create_model("test_resnet", num_classes=10, in_chans=1, weights=path, new_head=True)
    assert model.get_classifier().out_features == 10
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    stem = source.state_dict()["conv1.0.weight"]
    assert model.conv1[0].weight.shape[1] == 1 and not torch.equal(model.conv1[0].weight, stem[:, :1])


def test_train_from_a_weights_file(tmp_path):
    from .helpers import make_image_folder

    folder = make_image_folder(tmp_path / "data")
    source = create_model("test_resnet", num_classes=1000)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    result = CliRunner().invoke(app, ["train", "--model", "test_resnet", "--weights", str(path), "--data",
                                      str(folder), "--epochs", "1", "--batch-size", "4", "--input-size", "32",
                                      "--workers", "0", "--in-chans", "3", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
