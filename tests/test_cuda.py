"""The CUDA path: fp16 + GradScaler, bf16, channels_last, ``--compile``, exact resume and export.

Every test here is marked ``cuda`` and skips without a CUDA GPU. ``CWKD_TEST_DEVICE=cpu`` runs them on
the CPU instead, with bf16 where the GPU uses fp16 and torch.compile's ``aot_eager`` backend instead of
inductor (dynamo still traces the hooks; no C++ build on a small CPU). That is how
``benchmarks/gpu_check.py --dry-run`` proves these tests work before device time is spent on them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from cwkd.choices import Precision
from cwkd.cli.app import app
from cwkd.core.distiller import FeatureDistiller
from cwkd.files.checkpoint import load_state
from cwkd.runtime import autocast_dtype
from cwkd.tasks.classification.models import create_model
from cwkd.training import signals
from cwkd.training.config import TrainConfig
from cwkd.training.engine import run

from .helpers import read_metrics
from .test_reliability import _assert_same_weights, _StopAfter

#: Which device the ``cuda`` tests use: ``cuda`` (the default), ``cuda:N`` or ``cpu`` for a dry run.
DEVICE_ENV = "CWKD_TEST_DEVICE"
# cuBLAS is deterministic only with a fixed workspace; it must be set before the first cuBLAS call.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = pytest.mark.cuda
runner = CliRunner()
STEPS = 4  # steps an epoch: 16 training images of the conftest folder at batch 4


@pytest.fixture(scope="module", params=[os.environ.get(DEVICE_ENV, "cuda")])
def device(request) -> torch.device:
    """The device under test; without CUDA (and without CWKD_TEST_DEVICE=cpu) every test skips."""
    if request.param.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA GPU; {DEVICE_ENV}=cpu runs these tests on the CPU")
    return torch.device(request.param)


@pytest.fixture(scope="module")
def half(device) -> Precision:
    """fp16 on CUDA (the GradScaler path); bf16 on the CPU, where cwkd refuses fp16."""
    return Precision.fp16 if device.type == "cuda" else Precision.bf16


@pytest.fixture
def deterministic():
    """Deterministic kernels (cuDNN, cuBLAS) for bit-equal weights; put back afterwards."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


@pytest.fixture
def compile_here(device, monkeypatch):
    """On the CPU, make ``nn.Module.compile`` use the ``aot_eager`` backend (no inductor C++ build)."""
    if device.type == "cpu":
        original = nn.Module.compile

        def compile_aot_eager(self, *args, **kwargs):
            return original(self, *args, **{"backend": "aot_eager", **kwargs})

        monkeypatch.setattr(nn.Module, "compile", compile_aot_eager)


def _config(folder: Path, device: torch.device, out: Path, precision: Precision, **extra) -> TrainConfig:
    """A tiny distillation run on ``device``: random test_resnet teacher, test_efficientnet student."""
    options = dict(data=str(folder), student="test_efficientnet", teacher="test_resnet", allow_random_teacher=True,
                   epochs=1, batch_size=4, lr=1e-3, input_size=32, workers=0, device=str(device), precision=precision,
                   kd_weight=0.5, out=str(out), quiet=True)  # lr 1e-3: larger ones blow up the tiny BN statistics
    return TrainConfig(**{**options, **extra})


def _distiller(device: torch.device) -> FeatureDistiller:
    """A fresh test_resnet -> test_efficientnet distiller, the same each call (seeded)."""
    torch.manual_seed(0)
    teacher = create_model("test_resnet", num_classes=2)
    student = create_model("test_efficientnet", num_classes=2)
    return FeatureDistiller(teacher, student, input_size=32, kd_weight=0.5).to(device)


def _batch(device: torch.device, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 32, 32, device=device), torch.arange(n, device=device) % 2


# ----------------------------------------------------------------------------- mixed precision


def test_grad_scaler_steps_move_the_scale_sanely(device, half):
    distiller = _distiller(device).train()
    before = [p.detach().clone() for p in distiller.parameters()]
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9)
    # growth_interval=1: the scale doubles after every good step and halves after an overflow.
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16, growth_interval=1)
    scales, losses = [scaler.get_scale()], []
    for _ in range(24):  # random weights: the first steps may all overflow fp16 and halve the scale
        images, targets = _batch(device)
        with torch.autocast(device.type, dtype=autocast_dtype(half)):
            loss = distiller(images, targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    assert all(math.isfinite(v) for v in losses), losses
    moves = [after / prior for prior, after in zip(scales, scales[1:], strict=False)]
    assert all(m in (0.5, 2.0) for m in moves), scales  # fp16 overflows halve it, good steps double it
    assert 2.0 in moves and 2.0**-8 <= scales[-1] <= 2.0**40, f"no step got through: scales {scales}"
    changed = [not torch.equal(a, b) for a, b in zip(before, distiller.parameters(), strict=True)]
    assert any(changed), "no optimizer step reached the weights"


@pytest.mark.parametrize("precision", [Precision.fp16, Precision.bf16], ids=["fp16", "bf16"])
def test_engine_trains_with_autocast_and_channels_last(device, precision, folder, tmp_path):
    if precision is Precision.fp16 and device.type != "cuda":
        pytest.skip("fp16 needs CUDA; the CPU dry run covers bf16")
    result = run(_config(folder, device, tmp_path / "run", precision, epochs=2))
    records = read_metrics(tmp_path / "run")
    assert len(records) == 2
    for record in records:
        for key in ("train_loss", "train_task_loss", "train_feat_loss", "train_kd_loss", "val_loss"):
            assert math.isfinite(record[key]), (key, record)
        assert record["train_feat_loss"] > 0, record
    conv = next(m for m in result.student.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.device.type == device.type
    # The engine trains in channels_last on CUDA only (it is the fast layout for tensor cores).
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is (device.type == "cuda")
    scaler = load_state(tmp_path / "run" / "state.pt")["scaler"]
    if precision is Precision.fp16:  # a live GradScaler: a power of two at most its initial 2**16
        assert 1 <= scaler["scale"] <= 2.0**16 and math.log2(scaler["scale"]).is_integer(), scaler
    else:
        assert scaler == {}, scaler  # disabled outside fp16
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "run" / "best.safetensors"), "--device", str(device),
                                    "--precision", precision.value, "--batch-size", "4", "--workers", "0", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    scores = json.loads(evaluated.output)
    best = max(r["val_top1"] for r in records)
    assert scores["top1"] == pytest.approx(best, abs=100 / scores["images"] + 1e-6)  # at most one image apart


def test_channels_last_matches_contiguous(device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare layouts, not TF32 rounding
    dense = _distiller(device).train()
    last = _distiller(device).train().to(memory_format=torch.channels_last)  # built alike: a deepcopy's hooks
    # would still write into the original's buffers
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in last.parameters() if p.ndim == 4)
    images, targets = _batch(device)
    out_dense = dense(images, targets)
    out_last = last(images.contiguous(memory_format=torch.channels_last), targets)
    for key in ("loss", "feat_loss", "kd_loss"):
        torch.testing.assert_close(out_last[key], out_dense[key], rtol=1e-3, atol=1e-4)
    out_dense["loss"].backward()
    out_last["loss"].backward()
    # cuDNN picks other kernels per layout, which sum in another order: the error of each gradient is measured
    # against the whole gradient's size (a near-zero BatchNorm bias gradient is all rounding noise)
    total = torch.cat([p.grad.flatten() for p in dense.parameters()]).norm().item()
    for (name, a), b in zip(dense.named_parameters(), last.parameters(), strict=True):
        error = (b.grad - a.grad).norm().item()
        assert error <= 1e-3 * total, (name, error, total)


# ----------------------------------------------------------------------------- resume and export


def test_stop_mid_epoch_and_resume_equals_an_uninterrupted_run(device, half, deterministic, folder, tmp_path,
                                                                monkeypatch):
    args = ["distill", "--teacher", "test_resnet", "--allow-random-teacher", "--student", "test_efficientnet",
            "--data", str(folder), "--epochs", "2", "--batch-size", "4", "--input-size", "32", "--workers", "0",
            "--device", str(device), "--precision", half.value]
    reference = runner.invoke(app, [*args, "--out", str(tmp_path / "ref")])
    assert reference.exit_code == 0, reference.output
    out = tmp_path / "run"
    monkeypatch.setattr(signals, "StopSignals", _StopAfter(STEPS + 4))  # the flag is read STEPS + 2 times an epoch
    stopped = runner.invoke(app, [*args, "--out", str(out)])
    assert stopped.exit_code == 130, stopped.output
    state = load_state(out / "state.pt")
    assert state["epoch"] == 1 and 0 < state["step"] < STEPS, state["step"]  # inside epoch 2
    monkeypatch.undo()
    resumed = runner.invoke(app, ["distill", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert f"at epoch 2, step {state['step']}" in resumed.output
    _assert_same_weights(out / "last.safetensors", load_file(tmp_path / "ref" / "last.safetensors"))


@pytest.fixture(scope="module")
def device_checkpoint(device, half, folder, tmp_path_factory) -> Path:
    """best.safetensors of a run trained on ``device`` in half precision."""
    out = tmp_path_factory.mktemp("device_run") / "run"
    run(_config(folder, device, out, half))
    return out / "best.safetensors"


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_export_of_a_device_trained_checkpoint_verifies(device_checkpoint, fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="onnx export needs the export extra (onnx, onnxruntime)")
        pytest.importorskip("onnxruntime", reason="onnx export needs the export extra (onnx, onnxruntime)")
    out = tmp_path / f"student.{fmt}"
    result = runner.invoke(app, ["export", str(device_checkpoint), "--format", fmt, "--out", str(out), "--verify",
                                 "--no-benchmark"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.stat().st_size > 0


# ----------------------------------------------------------------------------- torch.compile (last: it is the slowest)


def test_compile_keeps_the_feature_hooks_firing(device, compile_here, folder, tmp_path):
    distiller = _distiller(device).train()
    images, targets = _batch(device)
    eager = distiller(images, targets)
    distiller.student.compile()  # as the engine does: in place, so the hooked modules stay the same objects
    distiller.teacher.compile()
    compiled = distiller(images, targets)
    assert compiled["feat_loss"] > 0
    torch.testing.assert_close(compiled["feat_loss"], eager["feat_loss"], rtol=1e-3, atol=1e-5)
    compiled["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.aligners.parameters())

    run(_config(folder, device, tmp_path / "run", Precision.bf16, compile=True))
    (record,) = read_metrics(tmp_path / "run")
    assert math.isfinite(record["train_loss"]) and record["train_feat_loss"] > 0, record


# ----------------------------------------------------------------------------- detectors


def test_fpn_taps_probe_detectors_already_on_the_device(device):
    """Teacher and student moved to the device before the taps are built: the probe batch follows them."""
    from cwkd.tasks import get_task
    from cwkd.tasks.detection.fpn import FPNTaps

    task = get_task("detection")
    teacher = task.build_model("maskrcnn_test_resnet", num_classes=4, input_size=64).eval().to(device)
    student = task.build_model("fasterrcnn_test_resnet", num_classes=4, input_size=64).train().to(device)
    taps = FPNTaps(teacher, student, (3, 64, 64))
    taps.attach()
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]], device=device),
                "labels": torch.tensor([1], device=device)}] * 2
    student(list(torch.rand(2, 3, 64, 64, device=device)), targets)
    s_maps, t_maps = taps.pop()
    assert list(s_maps) == list(t_maps) == ["P2", "P3", "P4", "P5"]
    assert all(m.device.type == device.type for m in [*s_maps.values(), *t_maps.values()])


def test_uint8_batches_are_normalised_on_the_device_as_on_the_host(device, folder):
    """The loader copies uint8 pixels (pinned on CUDA) and normalises them on the device, in channels_last there:
    the model's input equals the CPU float path's."""
    from cwkd.data.loading import build_loaders
    from cwkd.data.transforms import data_config
    from cwkd.tasks.classification.data import load_data

    spec = load_data(str(folder))
    dcfg = data_config(create_model("test_resnet"), input_size=32)
    loaders = [build_loaders(spec, dcfg, batch_size=4, workers=1, device=where, seed=0)[0] for where in (device, "cpu")]
    assert loaders[0].pin_memory is (device.type == "cuda")
    (on_device, labels), (on_cpu, _) = (next(iter(loader)) for loader in loaders)
    assert on_device.device == device and on_device.dtype == torch.float32
    if device.type == "cuda":
        assert on_device.is_contiguous(memory_format=torch.channels_last) and labels.is_pinned()
    torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=0, atol=1e-6)
