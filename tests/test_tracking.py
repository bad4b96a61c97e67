"""Opt-in tracking: `--log tensorboard|wandb|trackio` writes what metrics.jsonl records, and the running losses."""

from __future__ import annotations

import sys
import types

import pytest

from cwkd.errors import ConfigError
from cwkd.training.config import TrainConfig

from .helpers import cli_fails, cli_ok, read_metrics

FAST = ["--epochs", "2", "--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu"]


def _distill(folder, out, *extra) -> list:
    return ["distill", "--teacher", "test_resnet", "--allow-random-teacher", "--student", "test_efficientnet",
            "--data", folder, "--out", out, *FAST, *extra]


@pytest.mark.slow
def test_tensorboard_gets_every_epoch_metric_and_the_running_losses(folder, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    cli_ok(_distill(folder, out, "--log", "tensorboard"))
    records = read_metrics(out)
    (pair,) = [k for k in records[0] if k.startswith("train_feat/")]  # the per-pair loss, in metrics.jsonl too
    assert pair == "train_feat/blocks.4->layer4" and records[0][pair] == pytest.approx(records[0]["train_feat_loss"])
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/task_loss", "step/feat_loss", "train/loss", "train/feat/blocks.4->layer4",
            "val/top1", "val/loss", "lr", "epoch"} <= tags
    # 16 images in batches of 4: each epoch's record at its last step
    assert [e.step for e in events.Scalars("val/top1")] == [4, 8]
    assert [e.value for e in events.Scalars("val/top1")] == [r["val_top1"] for r in records]
    assert [e.step for e in events.Scalars("step/loss")] == [4, 8]  # every 10th step and each epoch's last


def test_a_missing_package_is_one_line_naming_the_extra(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an uninstalled package looks like
    cli_fails(_distill(folder, tmp_path / "run", "--log", "tensorboard"),
              "--log tensorboard needs the tensorboard package: pip install 'cwkd[tensorboard]'")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_wandb_gets_one_run_in_the_run_directory_and_nothing_without_log(folder, tmp_path, monkeypatch):
    calls: list = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda data, step: calls.append(("log", step, data)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    cli_ok(["train", "--model", "test_resnet", "--data", folder, "--out", out, *FAST, "--log", "wandb"])
    assert calls[0][0] == "init" and calls[0][1]["project"] == "cwkd" and calls[0][1]["dir"] == str(out)
    assert calls[0][1]["config"]["log"] == ("wandb",) and calls[-1] == ("finish",)
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged] == sorted(c[1] for c in logged)  # one x axis, never going back
    assert [c[2]["val/top1"] for c in logged if "val/top1" in c[2]] == [r["val_top1"] for r in read_metrics(out)]
    calls.clear()
    cli_ok(["train", "--model", "test_resnet", "--data", folder, "--out", tmp_path / "plain", *FAST])
    assert calls == [] and not (tmp_path / "plain" / "tensorboard").exists()


def test_log_names_are_checked():
    assert TrainConfig(data="x", student="test_resnet", method="none", log=["tensorboard"]).log == ("tensorboard",)
    with pytest.raises(ConfigError, match="--log mlflow: use tensorboard, wandb, trackio"):
        TrainConfig(data="x", student="test_resnet", method="none", log=["mlflow"])
