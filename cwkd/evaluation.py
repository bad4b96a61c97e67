"""Measure what you trained: :func:`load_student` and ``cwkd eval``.

A cwkd checkpoint holds the student and its aligners; its metadata says which timm model it is, its
classes, input size and normalisation. Evaluation rebuilds the validation transform from that metadata
and scores with :func:`cwkd.training.engine.evaluate`, the same function that wrote ``val_top1`` to metrics.jsonl,
so the numbers agree. A student file written by ``cwkd export --format safetensors`` loads here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from cwkd.choices import (
    Precision,
    Split,  # defined torch-free for the CLI; re-exported here
    Task,
    check_sizes,
)
from cwkd.data.loading import build_loaders
from cwkd.data.spec import DataSpec
from cwkd.data.transforms import DataConfig, data_config
from cwkd.errors import CheckpointError, ConfigError, DataError
from cwkd.files.checkpoint import load_checkpoint, read_state_dict, student_state
from cwkd.files.metadata import CheckpointMeta, is_student_file
from cwkd.runtime import Dist, precision_warning, resolve_device, resolve_precision
from cwkd.tasks import get_task, infer_task, shape_of_weights


@dataclass
class EvalResult:
    """What ``cwkd eval`` measured. ``scores`` are the task's metrics in percent, as ``val_<name>`` in
    metrics.jsonl (classification: ``top1``, ``top5``; segmentation: ``miou``, ``pixel_acc``)."""

    model: str
    source: str
    data: str
    split: str
    scores: dict[str, float]
    loss: float
    images: int
    images_per_s: float
    device: str
    precision: str
    classes: list[str]
    per_class: list[dict] | None = None
    confusion: list[list[int]] | None = None
    notes: list[str] = field(default_factory=list)
    task: str = "classification"

    def __getattr__(self, name: str) -> float | None:
        """A task's metric by name: ``result.top1``, ``result.miou``, ``result.box_ap`` (None where not scored)."""
        if not name.startswith("_") and name in _metric_names():
            return self.__dict__.get("scores", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict:
        """One flat JSON object; ``per_class`` (and a classifier's ``confusion``) are added only when measured."""
        out = {**self.scores, **{k: getattr(self, k) for k in ("loss", "images", "images_per_s", "model", "source",
                                                              "data", "split", "device", "precision")}}
        if self.task != "classification":
            out["task"] = self.task
        if self.per_class is not None:
            out["per_class"] = self.per_class
            if self.confusion is not None:
                out["confusion"] = self.confusion
        return out


@functools.cache
def _metric_names() -> frozenset[str]:
    """Every metric a task scores (the names :class:`EvalResult` answers as attributes)."""
    return frozenset(m for task in Task for m in get_task(task).metrics)


# ----------------------------------------------------------------------------- reading a student


def load_student(path: str | Path) -> nn.Module:
    """Build the student of a cwkd checkpoint (or exported student file), ready for inference.

    The returned timm model is in eval mode, without aligners or teacher. Its ``pretrained_cfg``
    carries the checkpoint's input size, mean and std, so ``timm.data.resolve_data_config(model=m)``
    gives the transform it was trained with. Weights that are NaN or infinite (a diverged run) raise
    :class:`~cwkd.errors.CheckpointError` instead of giving a model that predicts garbage.

    Example:
        >>> model = cwkd.load_student("runs/cwt/best.safetensors")  # doctest: +SKIP
        >>> logits = model(images)  # doctest: +SKIP
    """
    return read_student(path)[0]


def read_student(path: str | Path, *, plain_hint: str | None = None) -> tuple[nn.Module, CheckpointMeta]:
    """The student model (eval mode) and its checkpoint metadata, from either kind of cwkd file.

    ``plain_hint`` is the advice given when ``path`` holds other weights (see :func:`load_checkpoint`).
    """
    path = Path(path)
    raw = _header_metadata(path)
    if is_student_file(raw):
        meta = CheckpointMeta.from_strings(raw, path)
        state = read_state_dict(path)
    else:
        tensors, meta = load_checkpoint(path, plain_hint=plain_hint)  # its errors say what the file is
        state = student_state(tensors)
        if not state:
            raise CheckpointError(f"{path} holds no student weights (no 'student.*' tensors); is it a cwkd run's "
                                  "last.safetensors or best.safetensors?")
    model = get_task(meta.task).build_model(meta.model, num_classes=meta.num_classes, in_chans=meta.in_chans,
                                            input_size=meta.input_size[-1])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"the student weights in {path} do not fit {meta.model} ({first}); "
                              "the file was changed or written by another cwkd") from exc
    _refuse_nonfinite(state, path)
    _set_pretrained_cfg(model, meta)
    return model.eval(), meta


def _refuse_nonfinite(state: dict[str, torch.Tensor], path: Path) -> None:
    """A diverged student (NaN/inf weights) scores and exports as garbage: say so instead."""
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path} holds non-finite student weights ({len(bad)} tensor(s), e.g. {bad[0]}); the "
                              "run that wrote it diverged: use an earlier checkpoint, or retrain with a lower --lr")


def _header_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file; empty when there is none or it is not safetensors."""
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}  # load_checkpoint reads it again and says what is wrong


def _set_pretrained_cfg(model: nn.Module, meta: CheckpointMeta) -> None:
    """Record the trained input size and normalisation where timm's data helpers look for them."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(input_size=meta.input_size, mean=meta.mean, std=meta.std, num_classes=meta.num_classes)
    if meta.interpolation is not None:
        cfg["interpolation"] = meta.interpolation
    if meta.crop_pct is not None:
        cfg["crop_pct"] = meta.crop_pct
    model.pretrained_cfg = cfg


def checkpoint_data_config(model: nn.Module, meta: CheckpointMeta) -> DataConfig:
    """The evaluation data config a run used, rebuilt from its checkpoint metadata."""
    chans, height, _ = meta.input_size
    base = data_config(model, input_size=height, in_chans=chans)
    return DataConfig(input_size=meta.input_size, mean=meta.mean, std=meta.std,
                      interpolation=meta.interpolation or base.interpolation, crop_pct=meta.crop_pct or base.crop_pct)


# ----------------------------------------------------------------------------- evaluating


def evaluate(model: nn.Module, loader, device: torch.device, precision: Precision = Precision.fp32,
             channels_last: bool = False, rank: Dist | None = None, *, task: str | None = None) -> dict:
    """The task's validation scores of ``model`` over ``loader`` (its loss, metrics and image count).

    ``task`` defaults to classification (top-1, top-5 and mean cross-entropy). Under DDP each rank
    scores its shard and the sums are added.
    """
    return get_task(task).evaluate(model, loader, device, precision, channels_last, rank)


def evaluate_checkpoint(
    source: str | Path, *, weights: str | Path | None = None, data: str | None = None, data_root: str | None = None,
    split: Split | str = Split.val, batch_size: int = 64, workers: int | str = "auto", device: str = "auto",
    precision: Precision | str = Precision.fp32, per_class: bool = False, input_size: int | None = None,
    task: str | None = None,
) -> EvalResult:
    """Score a cwkd checkpoint, or a timm model name with a ``weights`` file, on a data set split.

    For a checkpoint, the model, classes and transforms come from its metadata and ``data`` defaults to
    the data set it was trained on. ``per_class`` adds per-class accuracy and confusion-matrix counts (a
    segmentation model: per-class IoU; a detector: per-class box AP, and mask AP for instance segmentation).
    ``task`` is the checkpoint's own, or inferred from a model name.

    Example:
        >>> r = evaluate_checkpoint("runs/cwt/best.safetensors", workers=0)  # doctest: +SKIP
        >>> r.top1, r.images  # doctest: +SKIP
    """
    split, precision = Split(split), Precision(precision)
    check_sizes(batch_size=batch_size, workers=workers, input_size=input_size)  # the limits a run has
    target = resolve_device(device, precision)
    precision = resolve_precision(precision, target)
    model, meta, spec, dcfg = _prepare(source, weights, data, data_root, input_size, task)
    spec_task = get_task(meta.task)
    notes = _check_classes(meta, spec) + [w for w in [precision_warning(precision, target)] if w]
    if split is Split.train:  # score train images with the deterministic validation transform
        spec = dataclasses.replace(spec, val=spec.train)
    _, loader = build_loaders(spec, dcfg, batch_size=batch_size, workers=workers, device=target,
                              datasets=spec_task.datasets(spec, dcfg), collate=spec_task.collate)
    channels_last = target.type == "cuda"  # as the engine does
    model.to(target, memory_format=torch.channels_last) if channels_last else model.to(target)
    confusion = spec_task.per_class_counter(spec.num_classes) if per_class else None
    started = time.perf_counter()
    with confusion.recording(model) if confusion else contextlib.nullcontext():
        scores = evaluate(model, confusion.tee(loader) if confusion else loader, target, precision, channels_last,
                          task=spec_task.name)
    seconds = time.perf_counter() - started
    if not math.isfinite(scores["loss"]):
        raise CheckpointError(f"{meta.model} from {source} gives non-finite outputs (loss {scores['loss']}) on "
                              f"{spec.name}; its {spec_task.metrics[spec_task.best_metric]} "
                              f"({scores[spec_task.best_metric]:.2f}%) would be meaningless; the model "
                              "diverged: evaluate an earlier checkpoint or retrain with a lower --lr")
    return EvalResult(
        model=meta.model, source=str(source), data=spec.name, split=split.value,
        scores={k: scores[k] for k in spec_task.metrics}, loss=scores["loss"], images=scores["images"],
        images_per_s=scores["images"] / max(seconds, 1e-9), device=str(target), precision=precision.value,
        classes=list(spec.classes), notes=notes,
        per_class=confusion.per_class(spec.classes) if confusion else _score_rows(scores, spec.classes, per_class),
        confusion=confusion.counts.tolist() if confusion else None, task=spec_task.name.value,
    )


def _score_rows(scores: dict, classes: list[str], wanted: bool) -> list[dict] | None:
    """Per-class rows (percent; None for a class not scored): a segmenter's IoU, a detector's box and mask AP.

    A task gives them as ``iou`` or as ``per_class`` (score name -> one value per class); a detector's lists
    leave out the background, its class 0.
    """
    columns = scores.get("per_class") or ({"iou": scores["iou"]} if "iou" in scores else None)
    if not wanted or not columns:
        return None
    offset = len(classes) - len(next(iter(columns.values())))
    return [{"class": name, **{k: v[i] for k, v in columns.items()}} for i, name in enumerate(classes[offset:])]


def _prepare(source: str | Path, weights: str | Path | None, data: str | None, data_root: str | None,
             input_size: int | None, task: str | None = None
             ) -> tuple[nn.Module, CheckpointMeta, DataSpec, DataConfig]:
    """Model, metadata, data and data config: from a checkpoint, or from a timm name and weights."""
    if weights is None:
        if input_size is not None:
            raise ConfigError("--input-size is for a timm name with --weights; a checkpoint keeps its own size")
        model, meta = read_student(_checkpoint_path(source))
        return model, meta, _load_recorded_data(data, meta, data_root), checkpoint_data_config(model, meta)
    if data is None:
        raise DataError(f"evaluating '{source}' with --weights needs --data (a timm model records no data set)")
    spec_task = get_task(infer_task(str(source), task))
    spec = spec_task.load_data(data, root=data_root)
    size = input_size or spec_task.default_input_size(spec)  # the size `cwkd train` picks
    if spec_task.timm_models:
        model, name, num_classes, in_chans = _timm_model(str(source), weights, spec.channels)
    else:
        model = spec_task.build_model(str(source), num_classes=spec.num_classes, in_chans=spec.channels,
                                      weights=str(weights), input_size=size).eval()
        name, num_classes, in_chans = str(source), spec.num_classes, spec.channels
    dcfg = data_config(model, input_size=size, in_chans=in_chans)
    meta = CheckpointMeta(model=name, num_classes=num_classes, in_chans=in_chans, input_size=dcfg.input_size,
                          mean=dcfg.mean, std=dcfg.std, task=spec_task.name.value)
    return model, meta, spec, dcfg


def _checkpoint_path(source: str | Path) -> Path:
    """``source`` as a checkpoint path; a timm model name gets told to bring its weights."""
    path = Path(source)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path  # read_student says what is wrong with a missing or unreadable file
    name = get_task(Task.classification).resolve_name(str(source))  # an unknown name: timm's closest matches
    raise CheckpointError(f"'{source}' is a timm model name ({name}), not a checkpoint; pass its weights with "
                          "--weights FILE (an untrained model scores at chance)")


def _timm_model(name: str, weights: str | Path, data_chans: int) -> tuple[nn.Module, str, int, int]:
    """A timm model built to the shape of its weights file, with its name, classifier size and input channels."""
    num_classes, in_chans = shape_of_weights(name, read_state_dict(weights), data_chans)
    in_chans = in_chans or data_chans
    model = get_task(Task.classification).build_model(name, num_classes=num_classes, in_chans=in_chans,
                                                      weights=weights).eval()
    return model, model.cwkd_name, getattr(model, "num_classes", num_classes), in_chans


def _load_recorded_data(data: str | None, meta: CheckpointMeta, root: str | None) -> DataSpec:
    """Load ``data``, or the data set the checkpoint records, naming the fix if it has moved."""
    if data is not None:
        return get_task(meta.task).load_data(data, root=root)
    recorded = meta.dataset
    if not recorded:
        raise DataError("the checkpoint records no data set; pass --data")
    try:
        return get_task(meta.task).load_data(recorded, root=root)
    except DataError as exc:
        raise DataError(f"the checkpoint was trained on '{recorded}', which cannot be loaded here ({exc}); "
                        "pass --data (and --data-root) to point at it") from exc


def _check_classes(meta: CheckpointMeta, spec: DataSpec) -> list[str]:
    """Refuse data with another number of classes; note (but accept) other class names."""
    num_classes = meta.num_classes
    if num_classes != spec.num_classes:
        raise DataError(f"{meta.model} predicts {num_classes} classes but {spec.name} has {spec.num_classes}; "
                        "evaluate on the data set it was trained on")
    trained = list(meta.classes or [])
    if trained and list(trained) != list(spec.classes):
        return [f"class names differ from the checkpoint's ({trained[:3]}... vs {spec.classes[:3]}...); "
                "labels are matched by index"]
    return []
