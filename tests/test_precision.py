"""Precision is chosen and recommended by what is fast on the machine (issue 15).

bf16 autocast on a CPU without native bf16 ran 8-30x slower than fp32. These tests force the
detection's answer both ways, so they check the same behaviour on any machine.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cwkd import runtime as precision
from cwkd.choices import Precision
from cwkd.cli.app import app
from cwkd.errors import ConfigError, TrainingError
from cwkd.runtime import autocast_dtype, fast_precisions, precision_warning, resolve_device, resolve_precision
from cwkd.training.config import TrainConfig
from cwkd.training.nonfinite import raise_nonfinite

runner = CliRunner()
COMMON = ["--epochs", "1", "--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu"]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def native(monkeypatch):
    """Make this CPU report native bf16 (True) or not (False)."""
    def force(answer: bool) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_native", lambda: answer)
    return force


@pytest.fixture
def gpu_bf16(monkeypatch):
    """Make the (pretend) CUDA GPU report native bf16 or not."""
    def force(answer: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: answer)
    return force


def test_detection_is_a_cached_bool_and_false_when_torch_cannot_tell(monkeypatch):
    precision.cpu_bf16_native.cache_clear()
    assert isinstance(precision.cpu_bf16_native(), bool)
    assert precision.cpu_bf16_native.cache_info().currsize == 1

    def unavailable():
        raise RuntimeError("no oneDNN")

    precision.cpu_bf16_native.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", unavailable)
    try:
        assert precision.cpu_bf16_native() is False
    finally:
        precision.cpu_bf16_native.cache_clear()


def test_cpu_without_native_bf16_gets_fp32_a_warning_and_fp32_advice(native):
    native(False)
    assert resolve_precision(Precision.auto, CPU) is Precision.fp32
    warning = precision_warning(Precision.bf16, CPU)
    assert warning is not None and "no native bf16" in warning and "8-30x slower" in warning
    assert warning.endswith("use --precision fp32")
    assert precision_warning(Precision.fp32, CPU) is None
    with pytest.raises(ConfigError) as err:
        resolve_device("cpu", Precision.fp16)
    assert str(err.value) == "--precision fp16 needs a CUDA GPU; on this CPU use --precision fp32"


def test_cpu_with_native_bf16_gets_bf16_and_no_warning(native):
    native(True)
    assert resolve_precision(Precision.auto, CPU) is Precision.bf16
    assert precision_warning(Precision.bf16, CPU) is None
    with pytest.raises(ConfigError, match="on this CPU use --precision bf16 or fp32$"):
        resolve_device("cpu", Precision.fp16)


def test_auto_on_gpus_new_and_old(gpu_bf16):
    gpu_bf16(True)
    assert resolve_precision(Precision.auto, CUDA) is Precision.bf16
    assert precision_warning(Precision.fp16, CUDA) is None
    gpu_bf16(False)  # pre-Ampere: fp16 with the GradScaler
    assert fast_precisions(CUDA) == (Precision.fp16, Precision.fp32)
    assert resolve_precision(Precision.auto, CUDA) is Precision.fp16
    assert "use --precision fp16 or fp32" in precision_warning(Precision.bf16, CUDA)


def test_explicit_precisions_are_kept_and_auto_has_no_dtype(native):
    native(False)
    assert resolve_precision(Precision.bf16, CPU) is Precision.bf16  # warned about, not overridden
    with pytest.raises(ValueError, match="resolve_precision"):
        autocast_dtype(Precision.auto)


@pytest.mark.parametrize("bf16_ok,advice", [(True, "use --precision bf16 or fp32 instead of fp16, "),
                                            (False, "use --precision fp32 instead of fp16, ")])
def test_nonfinite_advice_names_a_fast_precision(gpu_bf16, bf16_ok, advice):
    gpu_bf16(bf16_ok)
    cfg = TrainConfig(data="-", student="-", method="none", precision="fp16")
    with pytest.raises(TrainingError) as err:
        raise_nonfinite({"loss": torch.tensor(float("nan"))}, 0, 1, cfg, CUDA)
    assert advice in str(err.value)
    cfg = TrainConfig(data="-", student="-", method="none", precision="fp32")
    with pytest.raises(TrainingError) as err:
        raise_nonfinite({"loss": torch.tensor(float("nan"))}, 0, 1, cfg, CPU)
    assert "--precision" not in str(err.value)


@pytest.mark.slow
def test_bf16_run_without_native_bf16_warns_before_training(folder, tmp_path, native):
    native(False)
    result = runner.invoke(app, ["train", "--model", "test_resnet", "--data", str(folder), "--out",
                                 str(tmp_path / "r"), "--precision", "bf16", *COMMON])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    warning = [i for i, line in enumerate(lines) if line.startswith("warning: --precision bf16")]
    assert len(warning) == 1 and "8-30x slower" in lines[warning[0]]
    assert warning[0] < next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1"))


@pytest.mark.slow
def test_auto_saves_the_resolved_precision_and_a_resume_keeps_it(folder, tmp_path, native):
    native(True)
    out = tmp_path / "r"
    args = ["train", "--model", "test_resnet", "--data", str(folder), "--out", str(out), "--precision", "auto"]
    result = runner.invoke(app, [*args, *COMMON])
    assert result.exit_code == 0, result.output
    assert "precision bf16" in result.output and "warning" not in result.output
    assert json.loads((out / "config.json").read_text())["config"]["precision"] == "bf16"

    native(False)  # resumed on a machine without native bf16: the run keeps bf16, and says it is slow here
    result = runner.invoke(app, [*args, *COMMON[2:], "--epochs", "2", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "precision bf16" in result.output and "warning: --precision bf16" in result.output
    assert json.loads((out / "config.json").read_text())["config"]["precision"] == "bf16"
    result = runner.invoke(app, [*args[:-1], "fp16", *COMMON[2:], "--epochs", "3", "--resume", str(out)])
    assert result.exit_code == 1 and "--precision fp16 differs from the run's own bf16" in result.output

    result = runner.invoke(app, ["eval", str(out / "best.safetensors"), "--precision", "auto", "--json",
                                 "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["precision"] == "fp32"
