"""`cwkd export`: each format through the CLI, loaded back the way a user would, with no aligners left."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import cwkd
import cwkd.exportformats
from cwkd.cli.app import app
from cwkd.errors import ExportError
from cwkd.export import export_student

from .helpers import make_image_folder

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
# A low --lr: four steps at the default rate leave BatchNorm statistics so far off that the logits reach 1e4,
# where fp32 rounding alone exceeds the 1e-4 verify tolerance.
COMMON = ["--epochs", "1", "--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu",
          "--lr", "0.001"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """best.safetensors of a one-epoch distillation run (student + aligners)."""
    folder = make_image_folder(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs") / "cwt"
    result = runner.invoke(app, ["distill", "--teacher", "test_resnet", "--allow-random-teacher", "--student",
                                 "test_efficientnet", "--data", str(folder), "--out", str(out), *COMMON])
    assert result.exit_code == 0, result.output
    return out / "best.safetensors"


@pytest.fixture
def ckpt(trained, tmp_path) -> Path:
    """A private copy, so default output paths next to it do not collide between tests."""
    return Path(shutil.copy(trained, tmp_path / "best.safetensors"))


def _export(ckpt: Path, *args: str) -> str:
    result = runner.invoke(app, ["export", str(ckpt), *args])
    assert result.exit_code == 0, result.output
    return result.output


def _reference(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return cwkd.load_student(ckpt)(x)


def _doc_blocks(heading: str) -> list[str]:
    section = DOCS.read_text().split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]
    return [part.split("```", 1)[0] for part in section.split("```python\n")[1:]]


def test_safetensors_loads_in_plain_timm_as_the_docs_say(ckpt, tmp_path, monkeypatch):
    output = _export(ckpt, "--format", "safetensors", "--out", str(tmp_path / "student.safetensors"),
                     "--verify", "--no-benchmark")
    assert "parameters" in output and "MiB" in output and "verify" in output
    with safe_open(str(tmp_path / "student.safetensors"), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and not any(k.startswith(("aligners.", "student.", "teacher.")) for k in keys)
    assert meta["format"] == "cwkd-student" and meta["model"] == "test_efficientnet"
    assert json.loads(meta["classes"]) == ["cat", "dog"] and json.loads(meta["input_size"]) == [3, 32, 32]
    for key in ("num_classes", "in_chans", "mean", "std"):
        assert key in meta

    x = torch.randn(4, 3, 32, 32)
    expected = _reference(ckpt, x)
    blocks = _doc_blocks("safetensors: load it with plain timm")
    assert len(blocks) == 2 and not any("cwkd" in block for block in blocks)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:  # each documented way, run as written
        exec(block, namespace)
        with torch.no_grad():
            assert torch.equal(namespace["model"].eval()(x), expected)


def test_onnx_export_passes_verify_under_onnxruntime(ckpt):
    output = _export(ckpt, "--format", "onnx", "--verify", "--no-benchmark")
    assert "random inputs" in output and "real inputs" in output and ": ok" in output
    path = ckpt.with_name("best.onnx")  # the default: next to the checkpoint
    proto = onnx.load(str(path))
    assert not any("aligner" in t.name for t in proto.graph.initializer)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert {p.key: p.value for p in proto.metadata_props}["model"] == "test_efficientnet"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = torch.randn(5, 3, 32, 32)  # a batch size the export never saw
    logits = session.run(["logits"], {"input": x.numpy()})[0]
    assert logits.shape == (5, 2)
    assert (torch.from_numpy(logits) - _reference(ckpt, x)).abs().max() < 1e-4


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_torchscript_export_verifies_and_keeps_its_metadata(ckpt, tmp_path):
    path = tmp_path / "student.pt"
    output = _export(ckpt, "--format", "torchscript", "--out", str(path), "--verify", "--no-benchmark")
    assert ": ok" in output
    extra = {"cwkd.json": ""}
    model = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["cwkd.json"])["model"] == "test_efficientnet"
    assert not any("aligner" in k for k in model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - _reference(ckpt, x)).abs().max() < 1e-4


def test_export_prints_a_speed_table(ckpt):
    output = _export(ckpt, "--format", "torchscript")
    assert "inference speed" in output and "pytorch eager" in output and "torchscript" in output


def test_an_existing_file_is_kept_unless_overwrite(ckpt):
    _export(ckpt, "--no-benchmark")
    target = ckpt.with_name("best.student.safetensors")
    before = target.read_bytes()
    result = runner.invoke(app, ["export", str(ckpt), "--no-benchmark"])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert target.read_bytes() == before
    _export(ckpt, "--no-benchmark", "--overwrite")
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(ckpt), "--overwrite", "--no-benchmark"])
    assert result.exit_code == 1 and "checkpoint itself" in result.output


def test_a_failed_verify_writes_nothing(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "strict.onnx"
    wrong = lambda payload, meta: lambda x: torch.full((x.shape[0], 2), 1e3)  # noqa: E731 - an export that is off
    monkeypatch.setitem(cwkd.exportformats.LOAD, cwkd.export.ExportFormat.onnx, wrong)
    with pytest.raises(ExportError, match="not written"):
        export_student(ckpt, format="onnx", out=out, verify=True, benchmark=False)
    assert list(tmp_path.iterdir()) == [ckpt]  # neither the file nor a temporary left behind


def test_missing_onnx_extra_says_how_to_install(ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    result = runner.invoke(app, ["export", str(ckpt), "--format", "onnx"])
    assert result.exit_code == 1
    assert "pip install 'cwkd[export]'" in result.output and "Traceback" not in result.output


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_export_from_python_and_unknown_format(ckpt):
    result = cwkd.export_student(ckpt, format="torchscript", benchmark=False)
    assert result.path.is_file() and result.params > 0 and result.size_bytes == result.path.stat().st_size
    buffer = io.BytesIO(result.path.read_bytes())
    assert torch.jit.load(buffer)(torch.randn(1, 3, 32, 32)).shape == (1, 2)
    bad = runner.invoke(app, ["export", str(ckpt), "--format", "tflite"])
    assert bad.exit_code != 0 and "tflite" in bad.output


class _Scaled(torch.nn.Module):
    """Logits of size ``scale`` (a CUDA-trained student's reach about 30)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x.flatten(1)[:, :10] * 0 + self.scale


@pytest.mark.parametrize(("scale", "off", "passes"), [(1.0, 5e-5, True), (1.0, 2e-4, False), (30.0, 2e-4, True),
                                                      (30.0, 4e-3, False), (0.01, 2e-4, False)])
def test_verify_limit_scales_with_the_logits(scale, off, passes):
    from cwkd.exportformats import verify

    model = _Scaled(scale)
    meta = SimpleNamespace(input_size=(1, 8, 8), task=None)
    run = lambda x: model(x) + off  # noqa: E731 - an exported runtime that differs by ``off``
    if passes:
        assert verify(model, run, meta, None, atol=1e-4)["random"] == pytest.approx(off, rel=1e-2)
    else:
        with pytest.raises(ExportError, match=r"more than 0.0001 x max\(1, \|output\|\)"):
            verify(model, run, meta, None, atol=1e-4)


def test_verify_pairs_a_detectors_rows_that_two_runtimes_rank_either_way_round():
    """Near-equal scores may come out in either order from two runtimes: the same detections, not a difference
    (an untrained Mask R-CNN's 100 detections at ~0.2 failed verify on such a swap). A changed box still fails."""
    from cwkd.choices import Task

    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 9, 9]])
    labels, scores = torch.tensor([1, 2, 1]), torch.tensor([0.2100001, 0.2100000, 0.1])
    masks = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eager = (boxes, labels, scores, masks)
    swapped = tuple(t[torch.tensor([1, 0, 2])] for t in eager)
    meta = SimpleNamespace(task=Task.instance, input_size=(3, 16, 16))  # boxes, labels, scores, masks
    diffs = cwkd.exportformats.verify(lambda x: eager, lambda x: swapped, meta, None, atol=1e-4)
    assert diffs["random"] == 0.0
    moved = (swapped[0] + torch.tensor([[0.0, 0, 0, 0], [0, 0, 3, 0], [0, 0, 0, 0]]), *swapped[1:])
    with pytest.raises(ExportError, match="'boxes' on random inputs 3 >"):
        cwkd.exportformats.verify(lambda x: eager, lambda x: moved, meta, None, atol=1e-4)
