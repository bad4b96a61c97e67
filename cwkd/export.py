"""Ship the student: ``cwkd export`` to safetensors, ONNX or TorchScript, verified and timed.

Only the student is exported: no aligners, no teacher, no cwkd wrapper. Each file is built in memory,
optionally checked against PyTorch (``verify``), and only then written, atomically; a failed export
leaves no file behind.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from cwkd import exportformats
from cwkd.choices import ExportFormat  # defined torch-free for the CLI; re-exported here
from cwkd.data.loading import build_loaders
from cwkd.errors import CwkdError, ExportError
from cwkd.evaluation import checkpoint_data_config, read_student
from cwkd.files.checkpoint import atomic_write
from cwkd.files.metadata import CheckpointMeta
from cwkd.tasks import get_task
from cwkd.tasks.base import ExportIO

#: Largest max-abs difference from PyTorch fp32 outputs that ``verify`` accepts (times the output's scale, if over 1).
ATOL = 1e-4
_INSTALL = "onnx export needs the export extra: pip install 'cwkd[export]'"


#: Default file name next to the checkpoint: ``best.safetensors`` -> ``best.onnx`` and so on.
SUFFIXES = {ExportFormat.safetensors: ".student.safetensors", ExportFormat.onnx: ".onnx",
            ExportFormat.torchscript: ".torchscript.pt", ExportFormat.hf: "-hf"}


@dataclass
class ExportResult:
    """What was written, how close it is to PyTorch, and how fast it runs here."""

    path: Path
    format: str
    model: str
    size_bytes: int
    params: int
    input_size: tuple[int, int, int]
    atol: float = ATOL
    max_abs_diff: dict[str, float] | None = None  # "random" / "real" inputs -> max |exported - eager|
    speed: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    io: ExportIO = field(default_factory=lambda: get_task(None).export_io)  # the graph's input and outputs
    pushed: str | None = None  # --push-to-hub: where the folder went


def export_student(
    checkpoint: str | Path, *, format: ExportFormat | str = ExportFormat.safetensors, out: str | Path | None = None,
    overwrite: bool = False, verify: bool = False, benchmark: bool = True, data: str | None = None,
    data_root: str | None = None, atol: float = ATOL, task: str | None = None, push_to_hub: str | None = None,
) -> ExportResult:
    """Export the student of a cwkd checkpoint; with ``verify``, fail unless it matches PyTorch to ``atol``.

    ``data`` (default: the data set the checkpoint records) supplies the real images ``verify`` uses.
    ``benchmark`` times the exported model against PyTorch eager at batch 1 and 8 (a graph of one image, as a
    detector's: 1) on this machine, on real images where ``verify`` loaded some.
    ``task``, when given, must be the checkpoint's own (a check, as the checkpoint records its task).
    ``format="hf"`` writes a Hugging Face model folder (:mod:`cwkd.hfexport`); ``push_to_hub`` uploads it.

    Example:
        >>> r = export_student("runs/cwt/best.safetensors", format="onnx", verify=True)  # doctest: +SKIP
        >>> r.path, r.max_abs_diff  # doctest: +SKIP
    """
    fmt = ExportFormat(format)
    if not (math.isfinite(atol) and atol >= 0):
        raise ExportError(f"--atol must be a finite number of at least 0, got {atol}")
    if fmt is ExportFormat.onnx:
        _require_onnx()
    student, meta = read_student(checkpoint, plain_hint="export starts from a checkpoint of `cwkd train` or "
                                                      "`cwkd distill` (a run's best.safetensors)")
    task_spec = get_task(meta.task)
    if task is not None and get_task(task).name is not task_spec.name:
        raise ExportError(f"--task {get_task(task).name.value}: {checkpoint} holds a "
                          f"{task_spec.name.value} model; drop --task")
    if fmt is ExportFormat.hf and not task_spec.timm_models:  # a format its models cannot take is refused
        raise ExportError(f"--format hf writes what timm.create_model loads, and {task_spec.name.value} models are "
                          "not timm models; use --format safetensors (cwkd eval and cwkd.load_student read it) "
                          "or --format onnx")
    if fmt in task_spec.refused_exports:
        raise ExportError(f"{fmt.value} export is not supported for {task_spec.name.value} models; "
                          f"{task_spec.refused_exports[fmt]}")
    if push_to_hub and fmt is not ExportFormat.hf:
        raise ExportError("--push-to-hub uploads a Hugging Face folder; add --format hf")
    if fmt is ExportFormat.hf:
        return _export_hf(student, meta, Path(checkpoint), out, overwrite, verify, atol, (data, data_root),
                          push_to_hub)
    model = task_spec.export_model(student)  # one tensor in, tensors out
    path = _output_path(Path(checkpoint), fmt, out, overwrite)
    example = torch.randn(task_spec.export_io.batch or 2, *meta.input_size)
    with exportformats.quiet_torch_warnings():
        payload = exportformats.SERIALIZE[fmt](student if fmt is ExportFormat.safetensors else model, meta, example)
        # Load the bytes back as a user would; a safetensors file loads into the same eager model, so
        # only verify needs it, and its speed is eager's.
        timed = fmt is not ExportFormat.safetensors
        runner = exportformats.LOAD[fmt](payload, meta) if verify or (benchmark and timed) else None
    result = ExportResult(path=path, format=fmt.value, model=meta.model, size_bytes=len(payload),
                          params=sum(p.numel() for p in model.parameters()), input_size=tuple(meta.input_size),
                          atol=atol, io=task_spec.export_io)
    real = None
    if verify:
        real = _real_inputs(student, meta, data, data_root, result.notes)
        result.max_abs_diff = exportformats.verify(model, runner, meta, real, atol)
    atomic_write(path, lambda f: f.write(payload))
    if benchmark:
        result.speed = exportformats.benchmark(model, runner if timed else None, fmt, meta, real[0] if real else None)
    return result


def _export_hf(student: nn.Module, meta: CheckpointMeta, checkpoint: Path, out: str | Path | None,
               overwrite: bool, verify: bool, atol: float, data: tuple, repo: str | None) -> ExportResult:
    """The Hugging Face folder: written aside, loaded back through timm and checked with ``verify``, then moved in."""
    from cwkd import hfexport

    path = hfexport.folder_for(checkpoint, out, overwrite)
    tmp = hfexport.write_folder(student, meta, path)
    try:
        result = ExportResult(path=path, format=ExportFormat.hf.value, model=meta.model,
                              size_bytes=sum(f.stat().st_size for f in tmp.iterdir()),
                              params=sum(p.numel() for p in student.parameters()), input_size=tuple(meta.input_size),
                              atol=atol)
        if verify:
            real = _real_inputs(student, meta, *data, result.notes)
            result.max_abs_diff = exportformats.verify(student, hfexport.load_folder(tmp), meta, real, atol)
        hfexport.publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if repo:
        result.pushed = hfexport.push(path, repo)
    return result


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ExportError(_INSTALL) from exc


def _output_path(checkpoint: Path, fmt: ExportFormat, out: str | Path | None, overwrite: bool) -> Path:
    path = Path(out) if out is not None else checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])
    if path.exists() and path.resolve() == checkpoint.resolve():
        raise ExportError(f"--out {path} is the checkpoint itself; choose another --out")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; pass --overwrite to replace it, or choose another --out")
    if path.is_dir():
        raise ExportError(f"--out {path} is a directory; give a file name such as {path / 'student.onnx'}")
    return path


def _real_inputs(model: nn.Module, meta: CheckpointMeta, data: str | None, data_root: str | None,
                 notes: list[str], count: int = 8) -> list[torch.Tensor] | None:
    """Up to ``count`` validation images, transformed as in training, as graph inputs: one batch, or one input
    per image where the loader gives a list of them (images of any size); None (with a note) if there is no data."""
    name = data or meta.dataset
    if not name:
        notes.append("no data set recorded: verified on random inputs only (pass --data for real images)")
        return None
    try:
        task = get_task(meta.task)
        spec = task.load_data(name, root=data_root)
        dcfg = checkpoint_data_config(model, meta)
        _, loader = build_loaders(spec, dcfg, batch_size=count, workers=0, datasets=task.datasets(spec, dcfg),
                                  collate=task.collate)
        images = next(iter(loader))[0]
    except (CwkdError, StopIteration) as exc:
        notes.append(f"could not load data '{name}' ({str(exc).splitlines()[0] if str(exc) else 'empty'}): "
                     "verified on random inputs only; pass --data to use real images")
        return None
    return [images] if torch.is_tensor(images) else [image[None] for image in images]


# ----------------------------------------------------------------------------- printing


def print_export(result: ExportResult, console: Console | None = None) -> None:
    """File, size and parameters; the verify differences; the speed table."""
    console = console or Console(highlight=False, soft_wrap=True)
    say = partial(console.print, markup=False)  # paths and shapes hold [ ] that rich would read as markup
    say(f"wrote {result.path} ({result.format}, {result.size_bytes / 2**20:.2f} MiB, {result.params:,} parameters, "
        f"{result.model}, input {'x'.join(map(str, result.input_size))})")
    if result.format == ExportFormat.onnx.value:
        sig = result.io
        say(f"onnx: input '{sig.input}' {sig.input_shape(result.input_size)} float32 ({sig.values}), "
            f"output{'s' if len(sig.outputs) > 1 else ''} {sig.shapes}, opset {exportformats.ONNX_OPSET}")
    if result.format == ExportFormat.hf.value:
        pushed = f"; uploaded: {result.pushed}" if result.pushed else ""
        say(f"hf: model.safetensors, config.json and README.md; load it with timm.create_model(\"local-dir:"
            f"{result.path}\", pretrained=True), or from the Hub with \"hf-hub:USER/REPO\"{pushed}")
    for note in result.notes:
        say(f"note: {note}", style="yellow")
    if result.max_abs_diff is not None:
        diffs = ", ".join(f"{k} inputs {v:.2e}" for k, v in result.max_abs_diff.items())
        say(f"verify: max |exported - pytorch| {diffs} (limit {result.atol:g} x max(1, |output|)): ok")
    if result.speed:
        real = all(row.get("input") == "real" for row in result.speed)
        threads = torch.get_num_threads()
        table = Table(title=f"inference speed on this machine (CPU, fp32, {threads} thread{'s' * (threads != 1)}, "
                            f"median, {'real val images' if real else 'random inputs'})")
        for column in ("runtime", "batch", "ms / batch", "images/s", "vs eager"):
            table.add_column(column, justify="left" if column == "runtime" else "right")
        for row in result.speed:
            table.add_row(row["runtime"], str(row["batch"]), f"{row['ms']:.2f}", f"{row['images_per_s']:.0f}",
                          f"{row['speedup']:.2f}x")
        console.print(table)
