"""Checkpoint metadata: files written before CheckpointMeta existed still load, and both stored forms round-trip."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from cwkd.data.transforms import DataConfig
from cwkd.errors import CheckpointError
from cwkd.evaluation import read_student
from cwkd.files.checkpoint import load_checkpoint, save_checkpoint
from cwkd.files.metadata import CheckpointMeta
from cwkd.tasks.classification.models import create_model
from cwkd.training.config import TrainConfig
from cwkd.training.rundir import run_metadata

#: The exact metadata a run checkpoint held before CheckpointMeta (rundir.checkpoint_metadata + save_epoch).
_OLD_RUN_META = {
    "model": "test_resnet", "num_classes": 2, "in_chans": 3, "input_size": [3, 32, 32],
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear", "crop_pct": 0.875,
    "pairs": [{"teacher": "layer4", "student": "layer4"}], "method": "cwt", "task": "classification",
    "dataset": "/data/pets", "classes": ["cat", "dog"], "cwkd_version": "0.1.0", "kind": "distill", "teacher": None,
    "epoch": 3, "best_metric": "top1", "val_top1": 71.5,
}
#: The exact flat metadata of a student file written by `cwkd export` before CheckpointMeta.
_OLD_STUDENT_META = {
    "format": "cwkd-student", "model": "test_resnet", "num_classes": "2", "in_chans": "3",
    "input_size": "[3, 32, 32]", "mean": "[0.485, 0.456, 0.406]", "std": "[0.229, 0.224, 0.225]",
    "classes": '["cat", "dog"]', "interpolation": "bilinear", "crop_pct": "0.875", "dataset": "/data/pets",
    "method": "cwt", "epoch": "3", "task": "classification", "best_metric": "top1", "cwkd_version": "0.1.0",
    "val_top1": "71.5",
}


def _student_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("test_resnet", num_classes=2).state_dict()


def test_a_run_checkpoint_written_before_checkpoint_meta_loads(tmp_path: Path) -> None:
    path = tmp_path / "best.safetensors"
    header = {"format": "cwkd", "format_version": "1", "cwkd": json.dumps(_OLD_RUN_META)}
    safetensors.torch.save_file({f"student.{k}": v for k, v in _student_state().items()}, path, metadata=header)
    _, meta = load_checkpoint(path)
    assert (meta.model, meta.num_classes, meta.input_size, meta.classes) == ("test_resnet", 2, (3, 32, 32),
                                                                             ("cat", "dog"))
    assert meta.scores == {"top1": 71.5} and meta.epoch == 3 and meta.teacher is None
    model, _ = read_student(path)
    assert model(torch.randn(1, *meta.input_size)).shape == (1, 2)
    # Written again, it keeps every key and value it had (a None is left out, as a reader treats both alike).
    assert meta.to_dict() == {k: v for k, v in _OLD_RUN_META.items() if v is not None}


def test_a_student_file_written_before_checkpoint_meta_loads(tmp_path: Path) -> None:
    path = tmp_path / "student.safetensors"
    safetensors.torch.save_file(_student_state(), path, metadata=_OLD_STUDENT_META)
    model, meta = read_student(path)
    assert meta.mean == (0.485, 0.456, 0.406) and meta.crop_pct == 0.875 and meta.scores == {"top1": 71.5}
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert meta.to_strings() == _OLD_STUDENT_META  # and an export writes the same strings as before


def test_flat_strings_refuse_bad_values_with_the_key() -> None:
    with pytest.raises(CheckpointError, match="s.safetensors has unreadable student metadata.*export it again"):
        CheckpointMeta.from_strings({**_OLD_STUDENT_META, "num_classes": "two"}, "s.safetensors")
    with pytest.raises(CheckpointError, match="s.safetensors: checkpoint metadata 'std' should be a list of 3 "
                                              "positive numbers.*; export it again"):
        CheckpointMeta.from_strings({**_OLD_STUDENT_META, "std": "[0.2, 0.0, 0.2]"}, "s.safetensors")


def test_run_metadata_writes_the_keys_a_run_checkpoint_always_had(tmp_path: Path) -> None:
    cfg = TrainConfig(data="/data/pets", student="test_resnet", teacher="resnet50", method="cwt")
    distiller = SimpleNamespace(student=SimpleNamespace(cwkd_name="test_resnet"),
                                describe=lambda: [{"teacher": "layer4", "student": "layer4"}])
    spec = SimpleNamespace(name="/data/pets", num_classes=2, classes=["cat", "dog"])
    dcfg = DataConfig(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    meta = run_metadata(cfg, distiller, dcfg, spec, 3, None)
    meta = meta.replace(epoch=3, best_metric="top1", scores={"top1": 71.5}, cwkd_version="0.1.0")
    save_checkpoint(tmp_path / "last.safetensors", {"w": torch.zeros(1)}, meta)
    with safetensors.safe_open(str(tmp_path / "last.safetensors"), "pt") as f:
        stored = json.loads(f.metadata()["cwkd"])
    assert stored == {k: v for k, v in _OLD_RUN_META.items() if v is not None} | {"alpha": 1.0, "alpha_auto": False}
