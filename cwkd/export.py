"""Ship the student: ``cwkd export`` to safetensors, ONNX or TorchScript, verified and timed.

Only the student is exported: no aligners, no teacher, no cwkd wrapper. Each file is built in memory,
optionally checked against PyTorch (``verify``), and only then written, atomically; a failed export
leaves no file behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import safetensors.torch
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from cwkd.choices import ExportFormat  # defined torch-free for the CLI; re-exported here
from cwkd.data.loading import build_loaders
from cwkd.errors import CwkdError, ExportError
from cwkd.evaluation import checkpoint_data_config, read_student
from cwkd.files.checkpoint import atomic_write
from cwkd.files.metadata import CheckpointMeta
from cwkd.tasks import get_task
from cwkd.tasks.base import ExportIO

#: ONNX opset of exported graphs (the TorchScript-based exporter supports up to 20; runtimes widely run 18).
ONNX_OPSET = 18
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
    with _quiet_torch_warnings():
        payload = _SERIALIZE[fmt](student if fmt is ExportFormat.safetensors else model, meta, example)
        # Load the bytes back as a user would; a safetensors file loads into the same eager model, so
        # only verify needs it, and its speed is eager's.
        timed = fmt is not ExportFormat.safetensors
        runner = _LOAD[fmt](payload, meta) if verify or (benchmark and timed) else None
    result = ExportResult(path=path, format=fmt.value, model=meta.model, size_bytes=len(payload),
                          params=sum(p.numel() for p in model.parameters()), input_size=tuple(meta.input_size),
                          atol=atol, io=task_spec.export_io)
    real = None
    if verify:
        real = _real_inputs(student, meta, data, data_root, result.notes)
        result.max_abs_diff = _verify(model, runner, meta, real, atol)
    atomic_write(path, lambda f: f.write(payload))
    if benchmark:
        result.speed = _benchmark(model, runner if timed else None, fmt, meta, real[0] if real else None)
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
            result.max_abs_diff = _verify(student, hfexport.load_folder(tmp), meta, real, atol)
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


@contextlib.contextmanager
def _quiet_torch_warnings() -> Iterator[None]:
    """Hide PyTorch's deprecation notices for TorchScript and its ONNX exporter, and the exporter's and torchvision's
    notes while tracing (docs/deployment.md says why)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*(TorchScript|removed).*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The exporter's notes on operators it splits (verify checks the result) and torchvision's on tracing.
        warnings.filterwarnings("ignore", category=UserWarning,
                                module=r"torch\.onnx\.|torchvision\.|torch\.nn\.functional$")
        yield


# ----------------------------------------------------------------------------- the three formats


def _safetensors_bytes(model: nn.Module, meta: CheckpointMeta, example: torch.Tensor) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return safetensors.torch.save(state, metadata=meta.to_strings())


def _onnx_bytes(model: nn.Module, meta: CheckpointMeta, example: torch.Tensor) -> bytes:
    import onnx

    buffer = io.BytesIO()
    try:  # dynamo=False: the TorchScript-based exporter, which needs no onnxscript
        sig = get_task(meta.task).export_io
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[sig.input], output_names=list(sig.outputs), dynamic_axes=sig.dynamic_axes)
    except Exception as exc:  # unsupported operators and tracing failures come in many types
        raise ExportError(f"ONNX export of {meta.model} failed ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}); "
                          "try --format torchscript or safetensors") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in meta.to_strings().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _torchscript_bytes(model: nn.Module, meta: CheckpointMeta, example: torch.Tensor) -> bytes:
    try:  # traced: timm models rarely script, and a classifier's forward has no data-dependent branches
        traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as exc:
        raise ExportError(f"TorchScript tracing of {meta.model} failed ({type(exc).__name__}: {exc}); "
                          "try --format onnx or safetensors") from exc
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={"cwkd.json": json.dumps(meta.to_strings())})
    return buffer.getvalue()


#: An exported model as a function: one input tensor in, a tensor (or a tuple of them, a detector's) out.
Runner = Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]


def _load_safetensors(payload: bytes, meta: CheckpointMeta) -> Runner:
    """The exported state dict in a freshly built plain model (timm's, or cwkd.tasks.segmentation.models'),
    as a user would load it."""
    task = get_task(meta.task)
    model = task.build_model(meta.model, num_classes=meta.num_classes, in_chans=meta.in_chans,
                             input_size=meta.input_size[-1])
    model.load_state_dict(safetensors.torch.load(payload))
    return task.export_model(model.eval())


def _load_onnx(payload: bytes, meta: CheckpointMeta) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads PyTorch uses, for a fair race
    session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    sig = get_task(meta.task).export_io

    def run(x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        found = tuple(torch.from_numpy(y) for y in session.run(list(sig.outputs), {sig.input: x.numpy()}))
        return found if len(found) > 1 else found[0]
    return run


def _load_torchscript(payload: bytes, meta: CheckpointMeta) -> Runner:
    return torch.jit.load(io.BytesIO(payload), map_location="cpu").eval()


_SERIALIZE = {ExportFormat.safetensors: _safetensors_bytes, ExportFormat.onnx: _onnx_bytes,
              ExportFormat.torchscript: _torchscript_bytes}
_LOAD = {ExportFormat.safetensors: _load_safetensors, ExportFormat.onnx: _load_onnx,
         ExportFormat.torchscript: _load_torchscript}


# ----------------------------------------------------------------------------- verify and benchmark


def _verify(model: nn.Module, runner: Runner, meta: CheckpointMeta, real: list[torch.Tensor] | None,
            atol: float) -> dict[str, float]:
    """Max |exported - eager| on random inputs and ``real`` validation images, over every output.

    Random inputs are a batch of 3 (not the traced 2) or, for a graph of one image of any size, one input of
    the trained size and one a quarter shorter. Each output's limit is ``atol`` times its largest |value|
    where that is above 1: fp32 kernels of two runtimes differ in the last bits, and on logits of size 30
    those bits are 1e-4 (seen on CUDA-trained students exported next to onnxruntime 1.30); a box's corner
    at pixel 500 may differ by 5e-2 px.
    """
    sig, generator = get_task(meta.task).export_io, torch.Generator().manual_seed(0)
    inputs = {"random": [torch.randn(sig.batch or 3, *meta.input_size, generator=generator)]}
    if 2 in sig.dynamic_axes.get(sig.input, {}):  # any height: try one the trace did not see
        channels, height, width = meta.input_size
        inputs["random"].append(torch.randn(sig.batch or 3, channels, max(1, height * 3 // 4), width,
                                            generator=generator))
    if real:
        inputs["real"] = real
    diffs, bad = {}, []
    with torch.inference_mode(), _quiet_torch_warnings():
        for kind, batches in inputs.items():
            diffs[kind] = 0.0
            for x in batches:
                expected, found = _tensors(model(x)), _tensors(runner(x))
                if [e.shape for e in expected] != [f.shape for f in found]:
                    raise ExportError(f"the exported model's outputs on {kind} inputs have shapes "
                                      f"{_shapes(found)} where PyTorch's have {_shapes(expected)}; the file was not "
                                      "written; export without --verify to inspect it, or try another --format")
                for name, e, f in zip(sig.outputs, expected, found, strict=True):
                    if e.numel() == 0:
                        continue
                    diff = (f.float() - e.float()).abs().max().item()
                    limit = atol * max(1.0, e.float().abs().max().item())
                    diffs[kind] = max(diffs[kind], diff)
                    if not diff <= limit:  # "not <=" also catches NaN
                        bad.append(f"'{name}' on {kind} inputs {diff:.3g} > {limit:.3g}")
    if bad:
        raise ExportError(f"the exported model differs from PyTorch by more than {atol:g} x max(1, |output|) "
                          f"({', '.join(bad)}); the file was not written; export without --verify to inspect it, "
                          "or try another --format")
    return diffs


def _tensors(output: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return output if isinstance(output, tuple | list) else (output,)


def _shapes(tensors: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(str(list(t.shape)) for t in tensors)


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


def _benchmark(model: nn.Module, runner: Runner | None, fmt: ExportFormat, meta: CheckpointMeta,
               sample: torch.Tensor | None = None) -> list[dict]:
    """Median latency of PyTorch eager and of the exported model, at batch 1 and 8 (a graph of a fixed batch: that
    one), on the CPU; on ``sample`` (a real input) where it holds that batch (a model's cost may depend on what
    it finds in the image)."""
    rows = []
    runtimes: list[tuple[str, Runner]] = [("pytorch eager", model)]
    if runner is not None:
        runtimes.append(({"onnx": "onnxruntime", "torchscript": "torchscript"}[fmt.value], runner))
    fixed = get_task(meta.task).export_io.batch
    with torch.inference_mode(), _quiet_torch_warnings():
        for batch in (fixed,) if fixed else (1, 8):
            real = sample is not None and len(sample) >= batch
            x = sample[:batch] if real else torch.randn(batch, *meta.input_size)
            eager = None  # the first runtime of each batch size is the baseline
            for name, fn in runtimes:
                seconds = _median_seconds(fn, x)
                eager = eager or seconds
                rows.append({"runtime": name, "batch": batch, "ms": 1000 * seconds, "images_per_s": batch / seconds,
                             "speedup": eager / seconds, "input": "real" if real else "random"})
    return rows


def _median_seconds(fn: Runner, x: torch.Tensor, budget_s: float = 0.5) -> float:
    """Median of 3 to 20 timed runs after 2 warm-ups, stopping once ``budget_s`` is spent."""
    for _ in range(2):
        fn(x)
    times: list[float] = []
    spent_from = time.perf_counter()
    while len(times) < 3 or (len(times) < 20 and time.perf_counter() - spent_from < budget_s):
        started = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


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
            f"output{'s' if len(sig.outputs) > 1 else ''} {sig.shapes}, opset {ONNX_OPSET}")
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
