"""`cwkd distill` scores the teacher on val as distillation feeds it, and refuses one that cannot teach."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cwkd.files.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from cwkd.training.teachercheck import TeacherScore

from .helpers import cli_fails, cli_ok

COMMON = ["--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu"]


def _teacher(folder: Path, out: Path, epochs: int) -> Path:
    cli_ok(["train", "--model", "test_resnet", "--data", folder, "--out", out, "--epochs", epochs, *COMMON])
    return out / "best.safetensors"


@pytest.fixture(scope="module")
def good(folder, tmp_path_factory) -> Path:
    """A teacher that learnt the generated classes (two epochs reach 100 % on them)."""
    path = _teacher(folder, tmp_path_factory.mktemp("runs") / "good", 2)
    assert read_metadata(path).scores["top1"] > 90
    return path


@pytest.fixture(scope="module")
def untrained(folder, tmp_path_factory) -> Path:
    """A teacher after one epoch: still at chance (50 % on two classes), and its checkpoint says so."""
    path = _teacher(folder, tmp_path_factory.mktemp("runs") / "untrained", 1)
    assert read_metadata(path).scores["top1"] <= 75
    return path


def _edited(path: Path, out: Path, **changes) -> Path:
    """A copy of a checkpoint with its metadata changed (what a wrong record or statistics look like)."""
    tensors, meta = load_checkpoint(path)
    save_checkpoint(out, tensors, meta.replace(**changes))
    return out


def _distill(teacher: Path, folder: Path, out: Path, *extra) -> list:
    return ["distill", "--teacher", teacher, "--student", "test_efficientnet", "--data", folder, "--out", out,
            "--epochs", "1", *COMMON, *extra]


@pytest.mark.slow
def test_a_good_teacher_is_scored_printed_and_recorded(good, folder, tmp_path):
    out = tmp_path / "run"
    output = cli_ok(_distill(good, folder, out))
    assert "teacher: 100.0 % top-1 on val (its checkpoint recorded 100.0 %)" in output
    assert json.loads((out / "config.json").read_text())["teacher"]["val_top1"] == 100.0
    meta = read_metadata(out / "best.safetensors")
    assert (meta.teacher_metric, meta.teacher_score) == ("top1", 100.0)
    resumed = cli_ok(["distill", "--resume", out, "--epochs", "2"])  # not scored again, the score kept
    assert "scoring" not in resumed
    assert read_metadata(out / "last.safetensors").teacher_score == 100.0


@pytest.mark.slow
def test_a_teacher_fed_wrong_statistics_is_refused_and_out_left_alone(good, folder, tmp_path):
    # The checkpoint says it was trained on other statistics: the remap then feeds it what it never saw.
    wrong = _edited(good, tmp_path / "wrong.safetensors", mean=(-4.0,) * 3, std=(0.05,) * 3)
    line = cli_fails(_distill(wrong, folder, tmp_path / "run"), "the teacher", "points below the 100.0 %",
                     "check its normalisation", "input size (3x32x32)", "--no-teacher-check")
    assert "mean -4/-4/-4 std 0.05/0.05/0.05" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_teacher_whose_checkpoint_recorded_far_more_is_refused(untrained, folder, tmp_path):
    boasting = _edited(untrained, tmp_path / "boast.safetensors", scores={"top1": 99.0})
    cli_fails(_distill(boasting, folder, tmp_path / "run"), "points below the 99.0 % its own checkpoint recorded")


@pytest.mark.slow
def test_a_teacher_at_chance_is_refused_and_no_teacher_check_skips(untrained, folder, tmp_path):
    line = cli_fails(_distill(untrained, folder, tmp_path / "a"), "near chance", "above 75 %",
                     "its own checkpoint recorded only", "the teacher itself learnt little", "train it longer")
    assert "normalisation" not in line  # its record says it is weak: the input is not the suspect
    output = cli_ok(_distill(untrained, folder, tmp_path / "b", "--no-teacher-check"))
    assert "teacher: not checked (--no-teacher-check)" in output
    assert read_metadata(tmp_path / "b" / "best.safetensors").teacher_score is None


def test_the_score_says_why_it_is_refused():
    assert TeacherScore("top1", "top-1", 83.9, chance=1.5).problem() is None
    assert TeacherScore("top1", "top-1", 83.9, chance=1.5).line() == "teacher: 83.9 % top-1 on val"
    assert "near chance" in TeacherScore("top1", "top-1", 1.2, chance=1.5).problem()
    assert "12.0 points below" in TeacherScore("miou", "mIoU", 60.0, chance=5, recorded=72.0).problem()
    assert TeacherScore("miou", "mIoU", 62.0, chance=5, recorded=72.0).problem() is None
    # near chance now and in its own record: weak, not fed wrongly; near chance against a good record: fed wrongly
    assert TeacherScore("miou", "mIoU", 7.5, chance=9.09, recorded=7.5).never_learnt
    assert not TeacherScore("miou", "mIoU", 7.5, chance=9.09, recorded=15.0).never_learnt
    assert not TeacherScore("top1", "top-1", 1.2, chance=1.5).never_learnt


def test_a_detector_teacher_is_scored_at_the_students_size_and_put_back():
    from cwkd.tasks import get_task

    task = get_task("detection")
    teacher = task.build_model("fasterrcnn_test_resnet", num_classes=3, input_size=96)
    student = task.build_model("fasterrcnn_test_resnet", num_classes=3, input_size=64)
    before = teacher.transform.min_size, teacher.transform.max_size
    with task.as_taught(teacher, student, None) as seen:
        assert seen.transform.min_size == student.transform.min_size != before[0]
        assert seen.transform.max_size == student.transform.max_size
    assert (teacher.transform.min_size, teacher.transform.max_size) == before
    assert task.chance(3) == 1.0 and get_task("segmentation").chance(20) == 5.0
    assert get_task("classification").chance(10) == 15.0


@pytest.mark.slow
def test_a_detector_teacher_is_scored_in_box_ap_and_one_of_another_task_is_not(tmp_path):
    import numpy as np

    from cwkd.composite import Items, write_dense_dataset

    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 255, (20, 28, 28)).astype(np.uint8) for s in ("train", "val")}
    labels = {s: rng.integers(0, 3, 20) for s in ("train", "val")}
    coco = write_dense_dataset(tmp_path / "coco", Items(images, labels, ["a", "b", "c"]), canvas=64,
                               counts={"train": 4, "val": 2})
    fast = ["--epochs", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--lr", "0.005"]
    cli_ok(["train", "--model", "fasterrcnn_test_resnet", "--data", coco, "--out", tmp_path / "t", *fast, "-q"])
    teacher = tmp_path / "t" / "best.safetensors"
    # One epoch on four canvases finds nothing: box AP 0, which is near chance for a detector.
    cli_fails(["distill", "--teacher", teacher, "--student", "fasterrcnn_test_resnet", "--data", coco,
               "--out", tmp_path / "a", "--input-size", "48", *fast], "% box AP", "near chance", "above 1 %")
    output = cli_ok(["distill", "--teacher", teacher, "--student", "maskrcnn_test_resnet", "--data", coco,
                     "--out", tmp_path / "b", *fast])
    assert "teacher: not checked: it is a detection model and this run is instance (its box AP" in output


def test_the_teacher_stays_in_eval_mode_after_it_is_scored_through_the_remap():
    import torch

    from cwkd.core.distiller import Renormalize
    from cwkd.tasks import get_task
    from cwkd.tasks.classification.models import create_model

    task, teacher = get_task("classification"), create_model("test_resnet", num_classes=2).eval()
    remap = Renormalize((0.5,) * 3, (0.5,) * 3, (0.4,) * 3, (0.2,) * 3)
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]
    with task.as_taught(teacher, teacher, remap) as seen:
        task.evaluate(seen, batches, torch.device("cpu"))
    assert not teacher.training
