"""Semantic segmentation end to end: train, distill, resume, eval, export and inspect on a tiny generated VOC set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from cwkd.cli.app import app
from cwkd.composite import Items, write_dense_dataset
from cwkd.errors import ConfigError
from cwkd.inspection import propose_pairs
from cwkd.tasks import Task, get_task, infer_task
from cwkd.tasks.segmentation.models import create_segmentation_model

from .helpers import cli_ok, read_metrics

runner = CliRunner()
MODEL = "pspnet_test_resnet"  # timm's tiny ResNet body, dilated to stride 8, with a PSPNet head
FAST = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 255, (20, 28, 28)).astype(np.uint8) for s in ("train", "val")}
    labels = {s: rng.integers(0, 10, 20) for s in ("train", "val")}
    return write_dense_dataset(tmp_path_factory.mktemp("seg") / "voc", Items(images, labels, [f"c{i}" for i in
                               range(10)]), canvas=48, counts={"train": 8, "val": 4})


@pytest.fixture(scope="module")
def teacher(voc, tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "run"
    cli_ok(["train", "--model", MODEL, "--data", voc, "--out", out, *FAST])
    return out


@pytest.mark.slow
def test_train_writes_miou_and_picks_best_by_it(teacher):
    (record,) = read_metrics(teacher)
    assert {"val_loss", "val_miou", "val_pixel_acc"} <= set(record) and "val_top1" not in record
    meta = safetensors.safe_open(str(teacher / "best.safetensors"), "pt").metadata()
    saved = json.loads(meta["cwkd"])
    assert saved["task"] == "segmentation" and saved["best_metric"] == "miou"
    assert saved["val_miou"] == pytest.approx(record["val_miou"])
    assert json.loads((teacher / "config.json").read_text())["config"]["task"] == "segmentation"


@pytest.mark.slow
def test_distill_pairs_the_last_backbone_stage_resumes_and_eval_reproduces_miou(voc, teacher, tmp_path):
    out = tmp_path / "cwt"
    cli_ok(["distill", "--teacher", teacher / "best.safetensors", "--student", MODEL, "--method", "cwt", "--data", voc,
         "--out", out, *FAST, "--no-teacher-check"])  # a one-epoch teacher, at chance
    pairs = json.loads((out / "config.json").read_text())["pairs"]
    assert [(p["student"], p["teacher"]) for p in pairs] == [("backbone.layer4", "backbone.layer4")]
    cli_ok(["distill", "--resume", out, "--epochs", "2", "-q"])  # a finished run goes on to a larger --epochs
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2] and all("train_feat_loss" in r for r in records)
    best = max(records, key=lambda r: r["val_miou"])
    report = json.loads(cli_ok(["eval", out / "best.safetensors", "--workers", "0", "--json", "--per-class"]))
    assert report["miou"] == pytest.approx(best["val_miou"]) and report["task"] == "segmentation"
    assert len(report["per_class"]) == 11 and "iou" in report["per_class"][0]


@pytest.mark.slow
def test_export_safetensors_loads_in_the_plain_builder_and_torchscript_verifies(teacher, tmp_path):
    path = tmp_path / "student.safetensors"
    cli_ok(["export", teacher / "best.safetensors", "--out", path, "--verify", "--no-benchmark"])
    model = create_segmentation_model(MODEL, num_classes=11)
    model.load_state_dict(safetensors.torch.load_file(path))
    assert model.eval()(torch.zeros(1, 3, 48, 48))["out"].shape == (1, 11, 48, 48)
    output = cli_ok(["export", teacher / "best.safetensors", "--format", "torchscript", "--out", tmp_path / "m.pt",
                  "--verify", "--no-benchmark"])
    assert "real inputs" in output and ": ok" in output
    traced = torch.jit.load(str(tmp_path / "m.pt"))
    assert traced(torch.zeros(2, 3, 48, 48)).shape == (2, 11, 48, 48)  # one tensor out: the 'out' logits


@pytest.mark.slow
def test_onnx_export_of_a_pspnet_verifies(teacher, tmp_path):
    pytest.importorskip("onnxruntime")
    output = cli_ok(["export", teacher / "best.safetensors", "--format", "onnx", "--out", tmp_path / "m.onnx",
                  "--verify", "--no-benchmark"])
    assert "real inputs" in output and ": ok" in output and (tmp_path / "m.onnx").is_file()


def test_grid_pool_traces_to_the_same_averages_as_adaptive_pooling():
    from cwkd.tasks.segmentation.models import GridPool

    x = torch.randn(2, 4, 8, 11)
    for bins in (1, 2, 3, 6):
        traced = torch.jit.trace(GridPool(bins), x)  # the path the ONNX exporter takes
        assert torch.allclose(traced(x), torch.nn.functional.adaptive_avg_pool2d(x, bins), atol=1e-6)


@pytest.mark.slow
def test_a_stop_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(voc, tmp_path, monkeypatch):
    from cwkd.files.checkpoint import load_state
    from cwkd.training import signals

    from .test_reliability import _assert_same_weights, _StopAfter

    args = ["train", "--model", MODEL, "--data", voc, "--epochs", "2", "--batch-size", "2", "--workers", "0",
            "--device", "cpu", "-q"]
    cli_ok([*args, "--out", tmp_path / "whole"])
    reference = safetensors.torch.load_file(tmp_path / "whole" / "last.safetensors")
    monkeypatch.setattr(signals, "StopSignals", _StopAfter(7))  # the flag is read ~5 times an epoch of 4 steps
    stopped = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "cut"]])
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.undo()
    state = load_state(tmp_path / "cut" / "state.pt")
    assert state["epoch"] == 1 and 0 < state["step"] < 4  # stopped inside epoch 2
    cli_ok(["train", "--resume", tmp_path / "cut"])
    _assert_same_weights(tmp_path / "cut" / "last.safetensors", reference)
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [1, 2]


@pytest.mark.slow
def test_kd_weight_distils_the_pixels_logits(voc, teacher, tmp_path):
    out = tmp_path / "kd"
    cli_ok(["distill", "--teacher", teacher / "best.safetensors", "--student", MODEL, "--method", "none",
            "--data", voc, "--kd-weight", "1", "--out", out, *FAST, "--no-teacher-check"])  # a one-epoch teacher
    (record,) = read_metrics(out)
    assert record["train_kd_loss"] > 0 and "train_feat_loss" not in record


@pytest.mark.slow
@pytest.mark.parametrize("method,recorded", [("cwd", {"cwd_tau": 1.0}),
                                             ("mgd", {"mgd_mask": "pixel", "mgd_ratio": 0.75})])
def test_cwd_and_mgd_distil_and_record_their_options(voc, teacher, tmp_path, method, recorded):
    out = tmp_path / method
    cli_ok(["distill", "--teacher", teacher / "best.safetensors", "--student", MODEL, "--method", method,
            "--data", voc, "--out", out, *FAST, "--no-teacher-check"])  # a one-epoch teacher, at chance
    config = json.loads((out / "config.json").read_text())["config"]
    meta = json.loads(safetensors.safe_open(str(out / "last.safetensors"), "pt").metadata()["cwkd"])
    assert {k: config[k] for k in recorded} == recorded and {k: meta[k] for k in recorded} == recorded
    assert read_metrics(out)[0]["train_feat_loss"] > 0


def test_inspect_pairs_backbone_stages_at_reduction_8():
    report = propose_pairs("pspnet_resnet18", MODEL, input_size=64)
    (pair,) = report["pairs"]
    assert (pair["student"], pair["teacher"], pair["reduction"]) == ("backbone.layer4", "backbone.layer4", 8)
    every = propose_pairs("pspnet_resnet18", MODEL, input_size=64, pairs="all")["pairs"]
    assert all(p["student"].startswith("backbone.") for p in every)


def test_task_inference_and_mismatch():
    assert infer_task("pspnet_resnet18") is Task.segmentation
    assert infer_task("lraspp_mobilenet_v3_large") is Task.segmentation
    assert infer_task("resnet18") is Task.classification
    assert infer_task("resnet18", "segmentation") is Task.segmentation  # an explicit --task wins
    with pytest.raises(ConfigError, match="pick two models of one task"):
        infer_task("resnet18", other="pspnet_resnet50")
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("detection-ish")


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "fcn_resnet50"])
def test_torchvision_models_build_by_name_without_downloading(name):
    model = get_task("segmentation").build_model(name, num_classes=5)
    assert model.eval()(torch.zeros(1, 3, 64, 64))["out"].shape == (1, 5, 64, 64)
