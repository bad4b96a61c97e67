"""Detection and instance segmentation end to end: train, distill, resume, eval, export, inspect, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import onnxruntime as ort
import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

import cwkd.exportformats
from cwkd.choices import Optimizer
from cwkd.cli.app import app
from cwkd.composite import Items, write_dense_dataset
from cwkd.errors import ConfigError
from cwkd.export import ExportFormat, export_student
from cwkd.inspection import inspect_model, propose_pairs
from cwkd.tasks import Task, get_task, infer_task
from cwkd.tasks.detection.models import create_detection_model
from cwkd.training.config import TrainConfig
from tests.helpers import cli_fails, cli_ok, make_image_folder, read_metrics

runner = CliRunner()
STUDENT, TEACHER = "fasterrcnn_test_resnet", "maskrcnn_test_resnet"  # timm's tiny ResNet body under each head
FAST = ["--epochs", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--lr", "0.005", "-q"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """cwkd's composited COCO layout: 6 train and 3 val canvases of 64 px, 3 classes, a box and mask per item."""
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 255, (20, 28, 28)).astype(np.uint8) for s in ("train", "val")}
    labels = {s: rng.integers(0, 3, 20) for s in ("train", "val")}
    return write_dense_dataset(tmp_path_factory.mktemp("det") / "coco", Items(images, labels, ["a", "b", "c"]),
                               canvas=64, counts={"train": 6, "val": 3})


@pytest.fixture(scope="module")
def teacher(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "run"
    cli_ok(["train", "--model", TEACHER, "--data", coco, "--out", out, *FAST])
    return out


def test_task_inference_from_detector_names():
    assert infer_task("fasterrcnn_resnet18") is Task.detection
    assert infer_task("retinanet_resnet50_fpn") is Task.detection
    assert infer_task("maskrcnn_resnet18") is Task.instance
    assert infer_task("fasterrcnn_resnet18", other="maskrcnn_resnet50") is Task.detection  # a Mask R-CNN may teach
    with pytest.raises(ConfigError, match="is a detection model but the student resnet18 is a classification"):
        infer_task("resnet18", other="fasterrcnn_resnet50_fpn")


def test_a_detection_teacher_for_a_classifier_is_one_clear_error(coco, tmp_path):
    cli_fails(["distill", "--teacher", "fasterrcnn_resnet50_fpn", "--student", "resnet18", "--data", coco,
               "--out", tmp_path / "x", *FAST], "is a detection model but the student resnet18 is a classification")


@pytest.mark.parametrize("name, task, needle", [
    ("fasterrcnn_test_resnet", "classification", "'fasterrcnn_test_resnet' is a detection model but this run is "
                                                 "classification; pass --task detection"),
    ("pspnet_test_resnet", "detection", "'pspnet_test_resnet' is a segmentation model but this run is detection; "
                                        "pass --task segmentation"),
    ("maskrcnn_test_resnet", "segmentation", "is an instance model but this run is segmentation; pass --task instance"),
    ("test_resnet", "detection", "'test_resnet' is a classification model but this run is detection"),
])
def test_a_model_of_another_task_names_its_task_not_a_close_timm_name(name, task, needle):
    """`--model fasterrcnn_test_resnet --task classification` said "unknown model ...; did you mean test_resnet?"."""
    from cwkd.training.build import check_model_task

    with pytest.raises(ConfigError, match=needle):
        check_model_task(name, Task(task))
    check_model_task(name, infer_task(name))
    check_model_task("test_resnett", Task(task))  # unknown to every task: the task's own lookup says so
    check_model_task("maskrcnn_test_resnet", Task.detection, teacher=True)  # a Mask R-CNN may teach a detector


def test_a_detector_under_task_classification_is_one_clean_line(tmp_path):
    cli_fails(["train", "--model", STUDENT, "--task", "classification", "--data", "fashion-mnist-mini", "--out",
               tmp_path / "r", *FAST], "is a detection model but this run is classification; pass --task detection")
    cli_fails(["distill", "--teacher", STUDENT, "--student", "test_resnet", "--task", "classification",
               "--allow-random-teacher", "--data", "fashion-mnist-mini", "--out", tmp_path / "d", *FAST],
              "the teacher 'fasterrcnn_test_resnet' is a detection model but this run is classification")


def test_inspect_pairs_fpn_levels_by_stride_not_by_index():
    report = propose_pairs(TEACHER, "retinanet_test_resnet", input_size=64)
    # the two-stage teacher's FPN starts at stride 4 ('0'), RetinaNet's at 8 ('0'): index pairing would be wrong
    assert [(p["student"], p["teacher"], p["reduction"]) for p in report["pairs"]] == [
        ("P3", "P3", 8), ("P4", "P4", 16), ("P5", "P5", 32)]
    assert all(p["aligner_params"] > 0 for p in report["pairs"])
    layers, _ = inspect_model(TEACHER, input_size=64)  # one detector: its FPN levels, the max-pooled one left out
    assert [(layer.name, layer.reduction) for layer in layers] == [("P2", 4), ("P3", 8), ("P4", 16), ("P5", 32)]
    output = cli_ok(["inspect", "--teacher", TEACHER, "--student", STUDENT, "--input-size", "64"])
    assert "P2" in output and "P5" in output and "pool" not in output


def test_explicit_pairs_are_refused_for_detectors():
    with pytest.raises(ConfigError, match="detectors pair their FPN levels by stride"):
        propose_pairs(TEACHER, STUDENT, input_size=64, pairs="P3:P3")


def test_input_size_sets_the_detector_resize():
    model = get_task("detection").build_model(STUDENT, num_classes=4, input_size=96)
    assert model.transform.min_size == (96,) and model.transform.max_size == 160
    with pytest.raises(ConfigError, match="--task instance"):
        get_task("detection").build_model(TEACHER, num_classes=4, new_head=True)


def test_missing_pycocotools_names_the_extra_before_training(coco, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    cli_fails(["train", "--model", STUDENT, "--data", coco, "--out", tmp_path / "x", *FAST],
              "pip install 'cwkd[detection]'")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_instance_training_scores_mask_ap_and_picks_best_by_it(teacher):
    (record,) = read_metrics(teacher)
    assert {"val_loss", "val_mask_ap", "val_box_ap", "train_loss_mask", "train_loss_classifier"} <= set(record)
    saved = json.loads(safetensors.safe_open(str(teacher / "best.safetensors"), "pt").metadata()["cwkd"])
    assert saved["task"] == "instance" and saved["best_metric"] == "mask_ap"


def test_a_detector_trains_under_glibcs_own_memory_policy(coco, tmp_path, monkeypatch):
    import cwkd.training.engine

    kept = []
    monkeypatch.setattr(cwkd.training.engine, "reuse_freed_memory",
                        lambda device: kept.append(device) or nullcontext(True))
    cli_ok(["train", "--model", STUDENT, "--data", coco, "--out", tmp_path / "det", "--input-size", "64", *FAST])
    assert kept == []  # a detector's step sizes vary: kept freed memory fragments the heap
    folder = make_image_folder(tmp_path / "images")
    cli_ok(["train", "--model", "test_resnet", "--data", folder, "--out", tmp_path / "cls", "--input-size", "32",
            *FAST])
    assert [d.type for d in kept] == ["cpu"]


def test_detectors_default_to_their_own_learning_rate_and_classifiers_keep_cwkds():
    assert TrainConfig(data="x", student=STUDENT, method="none").lr == get_task("detection").default_lr[Optimizer.sgd]
    assert TrainConfig(data="x", student=TEACHER, method="none", optimizer="adamw").lr == 1e-4
    assert TrainConfig(data="x", student=STUDENT, method="none", lr=0.03).lr == 0.03  # a given --lr wins
    assert TrainConfig(data="x", student="resnet18", method="none").lr == 0.05
    assert TrainConfig(data="x", student="pspnet_resnet18", method="none").lr == 0.05


@pytest.mark.slow
def test_a_detection_run_without_lr_trains_at_the_task_default_and_resumes_with_it(coco, tmp_path):
    out = tmp_path / "run"
    cli_ok(["train", "--model", STUDENT, "--data", coco, "--out", out, *FAST[:FAST.index("--lr")], "-q"])
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == get_task("detection").default_lr[
        Optimizer.sgd]
    cli_ok(["train", "--resume", out, "--epochs", "2"])
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2] and all(np.isfinite(r["train_loss"]) for r in records)
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == get_task("detection").default_lr[
        Optimizer.sgd]


@pytest.mark.slow
def test_eval_per_class_gives_each_class_box_and_mask_ap(coco, teacher):
    report = json.loads(cli_ok(["eval", teacher / "best.safetensors", "--data", coco, "--workers", "0", "--per-class",
                             "--json"]))
    assert [row["class"] for row in report["per_class"]] == ["a", "b", "c"]  # the background has no row
    scored = [row for row in report["per_class"] if row["box_ap"] is not None]
    assert scored and all(set(row) == {"class", "box_ap", "mask_ap"} for row in report["per_class"])
    for kind in ("box_ap", "mask_ap"):  # COCO's AP is the mean over the classes the split has
        assert np.mean([row[kind] for row in scored]) == pytest.approx(report[kind], abs=1e-3)
    table = cli_ok(["eval", teacher / "best.safetensors", "--data", coco, "--workers", "0", "--per-class"])
    assert "per-class box AP, mask AP" in table


@pytest.mark.slow
def test_distill_from_a_mask_rcnn_teacher_then_eval_and_export(coco, teacher, tmp_path):
    out = tmp_path / "cwt"
    cli_ok(["distill", "--teacher", teacher / "best.safetensors", "--student", STUDENT, "--data", coco,
         "--out", out, "--input-size", "64", *FAST, "--no-teacher-check"])  # a one-epoch teacher: AP 0
    pairs = json.loads((out / "config.json").read_text())["pairs"]
    assert [(p["student"], p["reduction"]) for p in pairs] == [("P2", 4), ("P3", 8), ("P4", 16), ("P5", 32)]
    (record,) = read_metrics(out)
    assert record["train_feat_loss"] > 0 and "train_loss_box_reg" in record and "val_mask_ap" not in record
    report = json.loads(cli_ok(["eval", out / "best.safetensors", "--data", coco, "--workers", "0", "--json"]))
    assert report["task"] == "detection" and report["box_ap"] == pytest.approx(record["val_box_ap"])
    assert all(np.isfinite(report[k]) for k in ("box_ap", "box_ap50", "loss"))
    path = tmp_path / "student.safetensors"
    cli_ok(["export", out / "best.safetensors", "--out", path, "--no-benchmark"])
    model = create_detection_model(STUDENT, num_classes=4, input_size=64)
    model.load_state_dict(safetensors.torch.load_file(path))
    (found,) = model.eval()(list(torch.rand(1, 3, 64, 64)))
    assert set(found) == {"boxes", "labels", "scores"}
    onnx_path = tmp_path / "student.onnx"
    said = cli_ok(["export", out / "best.safetensors", "--format", "onnx", "--verify", "--out", onnx_path])
    assert "outputs 'boxes' [N, 4]" in said and "'labels' [N] int64, 'scores' [N], opset" in said
    assert "real inputs" in said and ": ok" in said and "real val images" in said and "UserWarning" not in said
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    image = torch.rand(1, 3, 48, 80)  # another size than trained: the graph resizes it
    boxes, labels, scores = session.run(None, {"images": image.numpy()})
    with torch.inference_mode():
        (found,) = model(list(image))
    assert [o.name for o in session.get_outputs()] == ["boxes", "labels", "scores"]
    assert boxes.shape == tuple(found["boxes"].shape) and boxes.shape[1:] == (4,)
    np.testing.assert_allclose(boxes, found["boxes"].numpy(), atol=1e-3)
    np.testing.assert_array_equal(labels, found["labels"].numpy())
    cli_fails(["export", out / "best.safetensors", "--format", "torchscript", "--out", tmp_path / "m.pt"],
              "torchscript export is not supported for detection models", "--format onnx")


@pytest.mark.slow
def test_instance_onnx_export_returns_masks_and_is_verified_on_real_images(teacher, tmp_path):
    path = tmp_path / "teacher.onnx"
    result = export_student(teacher / "best.safetensors", format="onnx", out=path, verify=True, benchmark=False)
    assert result.io.outputs == ("boxes", "labels", "scores", "masks")
    assert set(result.max_abs_diff) == {"random", "real"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, labels, scores, masks = session.run(None, {"images": np.random.rand(1, 3, 40, 56).astype(np.float32)})
    assert masks.shape == (len(boxes), 1, 40, 56) and labels.dtype == np.int64 and len(scores) == len(boxes)


def test_verify_refuses_another_number_of_detections_and_writes_nothing(teacher, tmp_path, monkeypatch):
    load = cwkd.exportformats.LOAD[ExportFormat.safetensors]
    def one_more(payload, meta):  # a runtime that finds one detection more than PyTorch
        run = load(payload, meta)
        return lambda x: tuple(torch.cat([t, t.new_zeros(1, *t.shape[1:])]) for t in run(x))

    monkeypatch.setitem(cwkd.exportformats.LOAD, ExportFormat.safetensors, one_more)
    path = tmp_path / "student.safetensors"
    said = cli_fails(["export", teacher / "best.safetensors", "--verify", "--out", path, "--no-benchmark"],
                     "outputs on random inputs have shapes [", "where PyTorch's have [", "the file was not written")
    found, expected = (int(part.split("[", 1)[1].split(",")[0]) for part in said.split("where"))
    assert found == expected + 1
    assert not path.exists()


@pytest.mark.slow
def test_a_stop_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(coco, tmp_path, monkeypatch):
    from cwkd.files.checkpoint import load_state
    from cwkd.training import signals

    from .test_reliability import _assert_same_weights, _StopAfter

    args = ["train", "--model", STUDENT, "--data", coco, *FAST[:-1], "--epochs", "2", "-q"]
    cli_ok([*args, "--out", tmp_path / "whole"])
    reference = safetensors.torch.load_file(tmp_path / "whole" / "last.safetensors")
    monkeypatch.setattr(signals, "StopSignals", _StopAfter(6))
    stopped = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "cut"]])
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.undo()
    state = load_state(tmp_path / "cut" / "state.pt")
    assert state["epoch"] == 1 and 0 < state["step"] < 3  # stopped inside epoch 2
    cli_ok(["train", "--resume", tmp_path / "cut"])
    _assert_same_weights(tmp_path / "cut" / "last.safetensors", reference)
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [1, 2]


DDP_SCRIPT = """
import sys
import torch.distributed as dist
from safetensors.torch import save_file
from cwkd.training.config import TrainConfig
from cwkd.training.engine import run
cfg = TrainConfig(data=sys.argv[1], student="fasterrcnn_test_resnet", teacher=sys.argv[2], epochs=1, batch_size=2,
                  lr=0.005, workers=0, device="cpu", out=sys.argv[3], quiet=True, teacher_check=False)
result = run(cfg)
params = {k: v.detach().contiguous() for k, v in result.student.named_parameters()}
save_file(params, f"{sys.argv[3]}/rank{dist.get_rank()}.st")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_gloo_ddp_distills_a_detector(coco, teacher, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29527", str(script), str(coco), str(teacher / "best.safetensors"),
                           str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = safetensors.torch.load_file(out / "rank0.st"), safetensors.torch.load_file(out / "rank1.st")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    (record,) = read_metrics(out)
    assert np.isfinite(record["val_box_ap"]) and record["train_feat_loss"] > 0


def test_taps_give_both_sides_maps_of_one_padded_batch_and_clear():
    from cwkd.tasks.detection.fpn import FPNTaps

    task = get_task("detection")
    teacher = task.build_model(TEACHER, num_classes=4, input_size=64).eval()
    student = task.build_model("retinanet_test_resnet", num_classes=4, input_size=64).train()
    taps = FPNTaps(teacher, student, (3, 64, 64))
    taps.attach()
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    student(list(torch.rand(2, 3, 64, 80)), targets)  # not the probe size: the maps follow the batch
    s_maps, t_maps = taps.pop()
    assert list(s_maps) == list(t_maps) == ["P3", "P4", "P5"]
    assert all(s_maps[k].shape == t_maps[k].shape for k in s_maps)
    assert all(s_maps[k].requires_grad and not t_maps[k].requires_grad for k in s_maps)
    assert taps.pop() == ({}, {})  # nothing outlives the step
    taps.detach()
    student(list(torch.rand(2, 3, 64, 64)), targets)
    assert taps.pop() == ({}, {})


@pytest.mark.slow
@pytest.mark.parametrize("student,method,recorded", [
    (STUDENT, "cwd", {"cwd_tau": 1.0}),
    ("retinanet_test_resnet", "mgd", {"mgd_mask": "pixel", "mgd_ratio": 0.65}),  # MGD's RetinaNet config
])
def test_cwd_and_mgd_distil_fpn_levels_and_record_their_options(coco, teacher, tmp_path, student, method, recorded):
    out = tmp_path / method
    cli_ok(["distill", "--teacher", teacher / "best.safetensors", "--student", student, "--method", method,
            "--data", coco, "--out", out, "--input-size", "64", *FAST])
    config = json.loads((out / "config.json").read_text())["config"]
    assert {k: config[k] for k in recorded} == recorded
    (record,) = read_metrics(out)
    assert record["train_feat_loss"] > 0 and all(np.isfinite(v) for v in record.values() if isinstance(v, float))


def test_kd_weight_stays_refused_for_detectors(coco, tmp_path):
    cli_fails(["distill", "--teacher", TEACHER, "--allow-random-teacher", "--student", STUDENT, "--data", coco,
               "--kd-weight", "1", "--out", tmp_path / "kd", *FAST], "logit KD needs class logits")
