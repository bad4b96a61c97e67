"""Checkpoint metadata: :class:`CheckpointMeta`, the one place that names its keys.

Every cwkd file carries it. A run checkpoint (``last/best.safetensors``) keeps it as one JSON object
under the header key ``cwkd``; a student file written by ``cwkd export`` (safetensors, ONNX metadata,
TorchScript's ``cwkd.json``) keeps it flat, one string per key, with lists as JSON text. Both forms are
read back through the same checks, so a damaged or hand-edited file is refused with the key it got wrong.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwkd.choices import MAX_CLASSES, MAX_IN_CHANS, MAX_INPUT_SIZE
from cwkd.errors import CheckpointError

#: Version of the checkpoint layout; a file with a larger number needs a newer cwkd.
FORMAT_VERSION = 1
#: The ``format`` marker of a run checkpoint's header, and of a student file written by ``cwkd export``.
RUN_FORMAT, STUDENT_FORMAT = "cwkd", "cwkd-student"

_REQUIRED = ("model", "num_classes", "in_chans", "input_size", "mean", "std")
_SCORE_PREFIX = "val_"  # the best metric's value: val_top1, val_miou, ...
_JSON_KEYS = ("input_size", "mean", "std", "classes")  # JSON text in the flat form: safetensors metadata is str->str
_INT_KEYS = ("num_classes", "in_chans", "epoch")
_STRING_KEYS = ("model", "interpolation", "dataset", "method", "task", "best_metric", "cwkd_version")
_STUDENT_KEYS = ("model", "num_classes", "in_chans", "input_size", "mean", "std", "classes", "interpolation",
                 "crop_pct", "dataset", "method", "epoch", "task", "best_metric", "cwkd_version")


def is_int(x: Any) -> bool:
    """Whether ``x`` is a whole number read from JSON or a pickle (``True`` is no number here)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def _list_of(kind: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(isinstance(x, kind) for x in v)


_OPTIONAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "interpolation": (_is_str, "a string"),
    "crop_pct": (_is_num, "a number"),
    "pairs": (_list_of(dict), "a list of objects"),
    "method": (_is_str, "a string"),
    "alpha": (_is_num, "a number"),
    "alpha_auto": (lambda v: isinstance(v, bool), "true or false"),
    "mgd_mask": (lambda v: v in ("channel", "pixel"), "'channel' or 'pixel'"),
    "mgd_ratio": (_is_num, "a number"),
    "cwd_tau": (_is_num, "a number"),
    "dataset": (_is_str, "a string"),
    "classes": (_list_of(str), "a list of strings"),
    "cwkd_version": (_is_str, "a string"),
    "epoch": (is_int, "an integer"),
    "step": (is_int, "an integer"),
    "task": (_is_str, "a string"),
    "best_metric": (_is_str, "a string"),
    "kind": (lambda v: v in ("student", "distill"), "'student' or 'distill'"),
    "teacher": (_is_str, "a string"),
    "teacher_metric": (_is_str, "a string"),
    "teacher_score": (_is_num, "a number"),
    "backbone_weights": (_is_str, "a string"),
}


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about its student, so it can be evaluated and exported on its own.

    ``scores`` holds the best metric's value by name (``{"top1": 71.5}``), stored as ``val_top1``.
    Optional fields are ``None`` where a file does not record them.

    Example:
        >>> meta = CheckpointMeta.from_dict({"model": "resnet18", "num_classes": 10, "in_chans": 3,
        ...     "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3})
        >>> meta.input_size, meta.task
        ((3, 32, 32), None)
    """

    model: str
    num_classes: int
    in_chans: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str | None = None
    crop_pct: float | None = None
    pairs: tuple[dict, ...] | None = None
    method: str | None = None
    alpha: float | None = None
    alpha_auto: bool | None = None  # alpha was picked by `--alpha auto`
    mgd_mask: str | None = None  # MGD's mask kind and ratio (method mgd)
    mgd_ratio: float | None = None
    cwd_tau: float | None = None  # CWD's temperature (method cwd)
    task: str | None = None
    dataset: str | None = None
    classes: tuple[str, ...] | None = None
    cwkd_version: str | None = None
    kind: str | None = None
    teacher: str | None = None
    # the teacher's score on val as distilled (cwkd.training.teachercheck), e.g. "top1"
    teacher_metric: str | None = None
    teacher_score: float | None = None
    backbone_weights: str | None = None  # where the student's backbone started: a weights file, or "pretrained"
    epoch: int | None = None
    step: int | None = None
    best_metric: str | None = None
    scores: dict[str, float] = field(default_factory=dict)

    def replace(self, **changes: Any) -> CheckpointMeta:
        """A copy with ``changes`` applied (the epoch and score of a new save)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------- the JSON object

    def to_dict(self) -> dict:
        """The JSON object a run checkpoint stores: recorded fields only, tuples as lists."""
        out: dict = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "scores":
                out.update({_SCORE_PREFIX + k: v for k, v in value.items()})
            elif value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, meta: Any) -> CheckpointMeta:
        """Check a JSON object's keys and types (:class:`CheckpointError` naming the bad key) and build the meta.

        Optional keys may be missing or ``None``; unknown keys are ignored (a later cwkd may add some).
        ``input_size[0]``, ``len(mean)`` and ``len(std)`` must all equal ``in_chans``.
        """
        _validate(meta)
        names = {f.name for f in dataclasses.fields(cls)} - {"scores"}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items() if k in names}
        scores = {k.removeprefix(_SCORE_PREFIX): float(v) for k, v in meta.items()
                  if k.startswith(_SCORE_PREFIX) and v is not None}
        return cls(**values, scores=scores)

    # ------------------------------------------------------------------------- a run checkpoint's header

    def to_header(self, path: str | Path) -> dict[str, str]:
        """The safetensors header of a run checkpoint for ``path``, checked as it will be read back.

        Metadata that a load would refuse raises :class:`CheckpointError` here, so it is never written.
        """
        try:
            text = json.dumps(self.to_dict(), default=_json_default)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint metadata for {path} is not JSON-able: {exc}") from exc
        CheckpointMeta.from_dict(json.loads(text))  # refuse now what a load would refuse later
        return {"format": RUN_FORMAT, "format_version": str(FORMAT_VERSION), "cwkd": text}

    @classmethod
    def from_header(cls, raw: Any, path: Path, not_cwkd: str) -> CheckpointMeta:
        """Read a run checkpoint's safetensors header; ``not_cwkd`` ends the message for other safetensors."""
        if not isinstance(raw, dict) or raw.get("format") != RUN_FORMAT or not isinstance(raw.get("cwkd"), str):
            raise CheckpointError(f"{path} is a safetensors file but {not_cwkd}")
        version = str(raw.get("format_version"))
        if not (version.isascii() and version.isdigit() and int(version) >= 1):
            raise CheckpointError(f"{path} has an invalid format_version {version!r}; the file is corrupt")
        if int(version) > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer cwkd (format {version}); upgrade cwkd")
        try:
            return cls.from_dict(json.loads(raw["cwkd"]))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} has unreadable cwkd metadata ({exc}); the file is corrupt") from exc
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc

    # ------------------------------------------------------------------------- a student file's flat strings

    def to_strings(self) -> dict[str, str]:
        """The flat str -> str form of a student file (JSON text for lists), with its ``format`` marker."""
        meta = self.to_dict()
        out = {"format": STUDENT_FORMAT}
        for key in (*_STUDENT_KEYS, *[k for k in meta if k.startswith(_SCORE_PREFIX)]):
            if meta.get(key) is not None:
                out[key] = json.dumps(meta[key]) if key in _JSON_KEYS else str(meta[key])
        return out

    @classmethod
    def from_strings(cls, raw: dict[str, str], path: str | Path = "student file") -> CheckpointMeta:
        """Read back what :meth:`to_strings` wrote, checked like a run checkpoint's metadata."""
        try:
            meta: dict = {k: json.loads(raw[k]) for k in _JSON_KEYS if k in raw}
            meta.update({k: int(raw[k]) for k in _INT_KEYS if k in raw})
            meta.update({k: float(raw[k]) for k in raw if k == "crop_pct" or k.startswith(_SCORE_PREFIX)})
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path} has unreadable student metadata ({exc}); export it again") from exc
        meta.update({k: raw[k] for k in _STRING_KEYS if k in raw})
        try:
            return cls.from_dict(meta)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}; export it again") from exc


def upgrade_best(best: dict) -> dict:
    """The best score a ``state.pt`` records, as ``{"metric", "value", "epoch"}``: a file written before cwkd had
    tasks keeps it as a classifier's ``val_top1``."""
    if "value" not in best and "val_top1" in best:
        return {"metric": "top1", "value": best["val_top1"], "epoch": best.get("epoch")}
    return best


def is_student_file(raw: dict[str, str]) -> bool:
    """Whether a safetensors header (or ONNX metadata) is a student file's flat metadata."""
    return raw.get("format") == STUDENT_FORMAT


def _json_default(obj: Any) -> Any:
    """JSON for the few other values cwkd records: 0-d tensors, numpy scalars, paths."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _check(meta: dict, key: str, ok: bool, expected: str) -> None:
    if not ok:
        raise CheckpointError(f"checkpoint metadata '{key}' should be {expected}, got {meta[key]!r}")


def _validate(meta: Any) -> None:
    """The checks of :meth:`CheckpointMeta.from_dict`: required keys, types, ranges, channel counts."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata should be a JSON object, got {type(meta).__name__}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint metadata lacks {missing}")
    _check(meta, "model", isinstance(meta["model"], str) and bool(meta["model"]), "a model name")
    for key, top in (("num_classes", MAX_CLASSES), ("in_chans", MAX_IN_CHANS)):
        _check(meta, key, is_int(meta[key]) and 0 < meta[key] <= top, f"an integer from 1 to {top}")
    chans, size = meta["in_chans"], meta["input_size"]
    ok = isinstance(size, list) and len(size) == 3 and all(is_int(v) and 0 < v <= MAX_INPUT_SIZE for v in size)
    _check(meta, "input_size", ok and size[0] == chans, f"[{chans}, height, width] with sizes from 1 to "
           f"{MAX_INPUT_SIZE}")
    for key in ("mean", "std"):
        v = meta[key]
        ok = isinstance(v, list) and len(v) == chans and all(_is_num(x) for x in v)
        ok = ok and (key == "mean" or all(x > 0 for x in v))
        _check(meta, key, ok, f"a list of {chans} {'numbers' if key == 'mean' else 'positive numbers'}")
    for key, (test, expected) in _OPTIONAL.items():
        if meta.get(key) is not None:
            _check(meta, key, test(meta[key]), expected)
    for key in meta:
        if key.startswith(_SCORE_PREFIX) and meta[key] is not None:
            _check(meta, key, _is_num(meta[key]), "a number")
