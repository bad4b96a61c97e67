"""The export formats: each one's bytes, the model loaded back from them as a user would load it, and how that
model compares with PyTorch eager (:func:`verify`) and how fast it runs (:func:`benchmark`).

:mod:`cwkd.export` runs ``cwkd export`` with these: build the bytes in memory, check them, then write them.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import safetensors.torch
import torch
from torch import nn

from cwkd.choices import ExportFormat
from cwkd.errors import ExportError
from cwkd.files.metadata import CheckpointMeta
from cwkd.tasks import get_task

#: ONNX opset of exported graphs (the TorchScript-based exporter supports up to 20; runtimes widely run 18).
ONNX_OPSET = 18


@contextlib.contextmanager
def quiet_torch_warnings() -> Iterator[None]:
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


#: Each format's bytes from ``(model, meta, example input)``; and the :data:`Runner` loaded back from them.
SERIALIZE = {ExportFormat.safetensors: _safetensors_bytes, ExportFormat.onnx: _onnx_bytes,
             ExportFormat.torchscript: _torchscript_bytes}
LOAD = {ExportFormat.safetensors: _load_safetensors, ExportFormat.onnx: _load_onnx,
        ExportFormat.torchscript: _load_torchscript}


# ----------------------------------------------------------------------------- verify and benchmark


def verify(model: nn.Module, runner: Runner, meta: CheckpointMeta, real: list[torch.Tensor] | None,
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
    with torch.inference_mode(), quiet_torch_warnings():
        for kind, batches in inputs.items():
            diffs[kind] = 0.0
            for x in batches:
                expected, found = _tensors(model(x)), _tensors(runner(x))
                if [e.shape for e in expected] != [f.shape for f in found]:
                    raise ExportError(f"the exported model's outputs on {kind} inputs have shapes "
                                      f"{_shapes(found)} where PyTorch's have {_shapes(expected)}; the file was not "
                                      "written; export without --verify to inspect it, or try another --format")
                if sig.rows_unordered:
                    found = _paired_rows(expected, found)
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


def _paired_rows(expected: tuple[torch.Tensor, ...], found: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``found``'s rows reordered so that each stands beside the ``expected`` row closest to it (largest |difference|
    over all outputs, greedily in ``expected``'s order): two runtimes may rank objects whose scores differ in the
    last bits either way round, which is no difference in what the model found."""
    rows = len(expected[0])
    if rows < 2:
        return found
    flat = [torch.cat([t.reshape(rows, -1).float() for t in side], dim=1) for side in (expected, found)]
    distance = torch.cdist(flat[0][None], flat[1][None], p=float("inf"))[0]
    order = []
    for row in range(rows):
        best = int(distance[row].argmin())
        order.append(best)
        distance[:, best] = float("inf")
    index = torch.tensor(order)
    return tuple(t[index] for t in found)


def _tensors(output: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return output if isinstance(output, tuple | list) else (output,)


def _shapes(tensors: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(str(list(t.shape)) for t in tensors)


def benchmark(model: nn.Module, runner: Runner | None, fmt: ExportFormat, meta: CheckpointMeta,
              sample: torch.Tensor | None = None) -> list[dict]:
    """Median latency of PyTorch eager and of the exported model, at batch 1 and 8 (a graph of a fixed batch: that
    one), on the CPU; on ``sample`` (a real input) where it holds that batch (a model's cost may depend on what
    it finds in the image)."""
    rows = []
    runtimes: list[tuple[str, Runner]] = [("pytorch eager", model)]
    if runner is not None:
        runtimes.append(({"onnx": "onnxruntime", "torchscript": "torchscript"}[fmt.value], runner))
    fixed = get_task(meta.task).export_io.batch
    with torch.inference_mode(), quiet_torch_warnings():
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
