"""`cwkd eval` and `cwkd.load_student`: a short distillation run, measured again from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm.data
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import cwkd
from cwkd.cli.app import app
from cwkd.evaluation import read_student

from .helpers import make_image_folder

runner = CliRunner()
COMMON = ["--epochs", "1", "--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu"]
EVAL = ["--workers", "0", "--device", "cpu", "--batch-size", "4"]


@pytest.fixture(scope="module")
def run_dir(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cwt"
    result = runner.invoke(app, ["distill", "--teacher", "test_resnet", "--allow-random-teacher", "--student",
                                 "test_efficientnet", "--data", str(folder), "--out", str(out), *COMMON])
    assert result.exit_code == 0, result.output
    return out


def _eval_json(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, *EVAL, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_reproduces_the_recorded_top1(run_dir):
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    report = _eval_json(str(run_dir / "best.safetensors"))  # no --data: the checkpoint's data set
    assert report["top1"] == record["val_top1"]
    assert report["top5"] == record["val_top5"]
    assert report["loss"] == pytest.approx(record["val_loss"], rel=1e-5)
    assert report["images"] == 8 and report["images_per_s"] > 0
    assert report["model"] == "test_efficientnet" and report["split"] == "val"


def test_eval_prints_a_table_with_per_class_counts(run_dir, folder):
    result = runner.invoke(app, ["eval", str(run_dir / "best.safetensors"), "--data", str(folder), "--per-class",
                                 "--split", "train", *EVAL])
    assert result.exit_code == 0, result.output
    for text in ("top-1", "top-5", "images/s", "per-class accuracy", "cat", "dog", "confusion matrix"):
        assert text in result.output, text
    report = _eval_json(str(run_dir / "best.safetensors"), "--per-class", "--split", "train")
    assert report["images"] == 16 and report["split"] == "train"
    assert [row["class"] for row in report["per_class"]] == ["cat", "dog"]
    assert sum(map(sum, report["confusion"])) == 16
    correct = sum(report["confusion"][i][i] for i in range(2))
    assert report["top1"] == pytest.approx(100 * correct / 16)


def test_timm_name_with_weights_scores_like_the_checkpoint(run_dir, folder, tmp_path):
    student = cwkd.load_student(run_dir / "best.safetensors")
    weights = tmp_path / "student.pth"
    torch.save(student.state_dict(), weights)  # a plain state dict, as any training script writes
    expected = _eval_json(str(run_dir / "best.safetensors"))["top1"]
    report = _eval_json("test_efficientnet", "--weights", str(weights), "--data", str(folder), "--input-size", "32")
    assert report["top1"] == expected
    # The checkpoint itself works as --weights too: its student.* keys are unwrapped.
    report = _eval_json("test_efficientnet", "--weights", str(run_dir / "best.safetensors"), "--data", str(folder),
                        "--input-size", "32")
    assert report["top1"] == expected


def test_a_timm_name_without_weights_is_refused(folder):
    result = runner.invoke(app, ["eval", "test_resnet", "--data", str(folder), *EVAL])
    assert result.exit_code == 1 and "--weights" in result.output


def test_data_with_other_classes_is_refused(run_dir, tmp_path):
    other = make_image_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=2)
    result = runner.invoke(app, ["eval", str(run_dir / "best.safetensors"), "--data", str(other), *EVAL])
    assert result.exit_code == 1
    assert "predicts 2 classes" in result.output and "Traceback" not in result.output


def test_a_file_that_is_not_a_checkpoint_is_one_clean_error(tmp_path, folder):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    for path in (plain, tmp_path / "missing.safetensors"):
        result = runner.invoke(app, ["eval", str(path), "--data", str(folder), *EVAL])
        assert result.exit_code == 1 and result.output.startswith("error:"), result.output


def test_load_student_is_the_bare_timm_model_in_eval_mode(run_dir):
    student = cwkd.load_student(run_dir / "best.safetensors")
    _, meta = read_student(run_dir / "best.safetensors")
    assert not student.training
    assert not any("aligner" in k for k in student.state_dict())
    assert type(student).__module__.startswith("timm.")
    cfg = timm.data.resolve_data_config(model=student)
    assert cfg["input_size"] == meta.input_size and cfg["mean"] == meta.mean
    with torch.no_grad():
        assert student(torch.randn(2, *meta.input_size)).shape == (2, 2)
