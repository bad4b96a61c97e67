"""`cwkd export --format hf`: a folder timm loads (offline here through `local-dir:`), with a model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from cwkd.errors import ExportError
from cwkd.evaluation import load_student
from cwkd.export import export_student
from cwkd.files.checkpoint import save_checkpoint
from cwkd.files.metadata import CheckpointMeta
from cwkd.tasks import get_task

from .helpers import cli_fails, cli_ok

FAST = ["--epochs", "1", "--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def student(folder, tmp_path_factory) -> Path:
    """A gray student distilled from a random teacher (the format does not care how good it is)."""
    out = tmp_path_factory.mktemp("runs") / "cwt"
    cli_ok(["distill", "--teacher", "test_resnet", "--allow-random-teacher", "--student", "test_efficientnet",
            "--data", folder, "--out", out, "--in-chans", "1", *FAST])
    return out / "best.safetensors"


@pytest.mark.slow
def test_the_folder_loads_in_timm_offline_and_matches_the_checkpoint(student, tmp_path):
    out = tmp_path / "hf"
    output = cli_ok(["export", student, "--format", "hf", "--out", out, "--verify", "--no-benchmark"])
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in output and "verify:" in output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_efficientnet" and config["num_classes"] == 2
    assert config["label_names"] == ["cat", "dog"] and config["model_args"]["in_chans"] == 1
    expected = load_student(student)
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [1, 32, 32] and cfg["mean"] == list(expected.pretrained_cfg["mean"])
    assert "license" not in cfg and "tag" not in cfg  # those were the ImageNet weights', not these
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # HF_HUB_OFFLINE=1 (conftest)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)
    assert list(timm.data.resolve_data_config(model=model)["std"]) == list(expected.pretrained_cfg["std"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "- knowledge-distillation\n- cwkd\n" in card
    assert "Teacher (base model): `test_resnet`; method `cwt`" in card
    assert "% top-1 on the validation split (best epoch 1)" in card


@pytest.mark.slow
def test_a_taken_folder_needs_overwrite_and_other_files_are_never_replaced(student, tmp_path):
    out = tmp_path / "hf"
    cli_ok(["export", student, "--format", "hf", "--out", out, "--no-benchmark"])
    cli_fails(["export", student, "--format", "hf", "--out", out], "already holds an export", "--overwrite")
    cli_ok(["export", student, "--format", "hf", "--out", out, "--overwrite", "--no-benchmark"])
    (out / "notes.txt").write_text("mine")
    cli_fails(["export", student, "--format", "hf", "--out", out, "--overwrite"], "holds other files (notes.txt)")
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_push_to_hub_offline_is_one_line_after_the_folder_is_written(student, tmp_path):
    out = tmp_path / "hf"
    cli_fails(["export", student, "--format", "hf", "--out", out, "--push-to-hub", "someone/student"],
              f"wrote {out}, but uploading it to someone/student failed", "hf upload someone/student")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cli_fails(["export", student, "--out", tmp_path / "s.safetensors", "--push-to-hub", "someone/student"],
              "add --format hf")


@pytest.mark.parametrize("task, name", [("segmentation", "pspnet_test_resnet"), ("detection", "fasterrcnn_test_resnet"),
                                        ("instance", "maskrcnn_test_resnet")])
def test_dense_students_are_refused_naming_the_formats_that_work(task, name, tmp_path):
    model = get_task(task).build_model(name, num_classes=3, input_size=64)
    checkpoint = tmp_path / "best.safetensors"
    save_checkpoint(checkpoint, {f"student.{k}": v for k, v in model.state_dict().items()},
                    CheckpointMeta(model=name, num_classes=3, in_chans=3, input_size=(3, 64, 64), mean=(0.5,) * 3,
                                   std=(0.5,) * 3, task=task))
    with pytest.raises(ExportError, match=f"{task} models are not timm models; use --format safetensors .* or "
                                          "--format onnx"):
        export_student(checkpoint, format="hf", out=tmp_path / "hf")
