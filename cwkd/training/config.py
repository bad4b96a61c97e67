"""Typed run settings. The CLI fills one of these; the engine reads nothing else.

The resolved config is saved as ``config.json`` next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cwkd.choices import (
    MAX_SEED,
    AlphaChoice,
    Method,
    MgdMask,
    Optimizer,
    Precision,
    Reduction,
    Task,
    _in_range,
)
from cwkd.core.settings import LossSettings
from cwkd.errors import ConfigError
from cwkd.training.settings import InputSettings, OptimSettings, TeacherSettings

#: Default learning rate and weight decay per optimizer.
OPTIMIZER_DEFAULTS = {Optimizer.sgd: (0.05, 5e-4), Optimizer.adamw: (1e-3, 0.05)}


#: CWD's temperature when ``--cwd-tau`` is not given: MMRazor's CWD configs (segmentation and detection) use 1.
CWD_TAU = 1.0
#: The MGD cwkd ran before it followed MGD's per-task configs: 15 % of the positions masked, on every task. A
#: config.json written then records no mask and resumes with this one (``--mgd-mask pixel --mgd-ratio 0.15``).
OLD_MGD = (MgdMask.pixel, 0.15)


def mgd_defaults(task: Task, student: str) -> tuple[MgdMask, float]:
    """MGD's mask kind and ratio for a task and student as MGD's reference configs set them (docs/method.md)."""
    from cwkd.tasks import get_task

    return get_task(task).mgd_defaults(student)


def default_lr(task: Task, optimizer: Optimizer) -> float:
    """The peak learning rate when ``--lr`` is not given: the task's own for ``optimizer``, else cwkd's.

    Example:
        >>> default_lr(Task.classification, Optimizer.sgd), default_lr(Task.detection, Optimizer.sgd)
        (0.05, 0.005)
    """
    from cwkd.tasks import get_task

    return get_task(task).default_lr.get(optimizer, OPTIMIZER_DEFAULTS[optimizer][0])


# TrainConfig keeps one flat field per CLI option: that is how users build it (`TrainConfig(data=..., alpha=...)`)
# and how config.json stores it. Its parts (cwkd.training.settings, and cwkd.core.settings for the loss) are typed,
# read-only views of those fields, grouped by concern, and each checks its own values.


def _part(kind: type, cfg: TrainConfig):
    """The ``kind`` view of ``cfg``: its fields of that name."""
    return kind(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(kind)})


@dataclass
class TrainConfig:
    """Everything one ``cwkd train`` or ``cwkd distill`` run needs."""

    data: str
    student: str
    task: Task | None = None  # None: inferred from the student's name (cwkd.tasks.infer_task)
    teacher: str | None = None
    teacher_weights: str | None = None
    teacher_pretrained: bool = False
    allow_random_teacher: bool = False
    # score the teacher on val before training, refuse a bad one (cwkd.training.teachercheck)
    teacher_check: bool = True
    student_pretrained: bool = False
    student_weights: str | None = None
    # a classifier's weights for a dense student's backbone (cwkd.tasks.bodies)
    student_backbone_weights: str | None = None
    method: Method = Method.cwt
    alpha: float | AlphaChoice = 1.0  # "auto": picked at the start of the run (cwkd.core.autoalpha), then a number
    alpha_auto: bool = False  # alpha is the number "auto" picked (set by the run; a resume keeps it)
    pairs: str = "last"
    hidden: int | None = None
    reduction: Reduction = Reduction.mean
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: Optimizer = Optimizer.sgd
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    mgd_mask: MgdMask | None = None  # None: the task's MGD default (mgd_defaults), set for --method mgd
    mgd_ratio: float | None = None
    cwd_tau: float | None = None  # None: CWD_TAU, set for --method cwd
    precision: Precision = Precision.fp32
    compile: bool = False
    input_size: int | None = None
    in_chans: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    data_root: str | None = None
    download: bool = False
    skip_corrupt: bool = False
    workers: int | str = "auto"  # a number of loader processes, or auto (cwkd.data.feed.resolve_workers)
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    skip_nonfinite: int = 0
    quiet: bool = False
    log: tuple[str, ...] = ()  # trackers besides metrics.jsonl: tensorboard, wandb, trackio (cwkd.training.tracking)
    made_by: str | None = None  # who started the run, when not a person: "cwkd demo" (cwkd.cli.demo replaces only
    # its own)

    def __post_init__(self) -> None:
        from cwkd.tasks import infer_task  # imports no torch until a name needs checking
        from cwkd.training.tracking import trackers

        self.task = infer_task(self.student, self.task, other=self.teacher)
        self.method = Method(self.method)
        if self.alpha == AlphaChoice.auto:
            self.alpha = AlphaChoice.auto.value  # a plain "auto", however it was given
        self.reduction = Reduction(self.reduction)
        self._resolve_method_options()
        self.optimizer = Optimizer(self.optimizer)
        self.precision = Precision(self.precision)
        self.mean, self.std = self.parse_stats("mean", self.mean), self.parse_stats("std", self.std)
        if isinstance(self.workers, str):  # "4" or "Auto" from a script or a hand-edited config
            self.workers = self.parse_workers(self.workers)
        self.log = trackers(self.log)
        if self.lr is None:
            self.lr = default_lr(self.task, self.optimizer)
        if self.weight_decay is None:
            self.weight_decay = OPTIMIZER_DEFAULTS[self.optimizer][1]
        self.validate()

    def _resolve_method_options(self) -> None:
        """The method's own options, where not given: MGD's mask for this task and student, CWD's temperature."""
        if self.mgd_mask is not None:
            self.mgd_mask = MgdMask(self.mgd_mask)
        if self.method is Method.mgd and (self.mgd_mask is None or self.mgd_ratio is None):
            mask, ratio = mgd_defaults(self.task, self.student)
            self.mgd_mask = self.mgd_mask or mask
            self.mgd_ratio = ratio if self.mgd_ratio is None else self.mgd_ratio
        if self.method is Method.cwd and self.cwd_tau is None:
            self.cwd_tau = CWD_TAU

    @staticmethod
    def parse_stats(key: str, value) -> tuple[float, ...] | None:
        """Per-channel ``mean``/``std`` from ``"0.5,0.5,0.5"``, a number or a list (None stays None)."""
        return _stats(f"--{key}", value)

    @staticmethod
    def parse_alpha(value: str | float) -> float | str:
        """``--alpha`` as typed: a number, or ``"auto"`` (checked by :meth:`validate`).

        Example:
            >>> TrainConfig.parse_alpha("7"), TrainConfig.parse_alpha("Auto")
            (7.0, 'auto')
        """
        if isinstance(value, str) and value.strip().lower() == AlphaChoice.auto.value:
            return AlphaChoice.auto.value
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--alpha must be a number of at least 0, or auto; got {value!r}") from None

    @staticmethod
    def parse_workers(value: str | int) -> int | str:
        """``--workers`` as typed: a whole number, or ``"auto"`` (checked by :meth:`validate`).

        Example:
            >>> TrainConfig.parse_workers("4"), TrainConfig.parse_workers("AUTO")
            (4, 'auto')
        """
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--workers must be a whole number of at least 0, or auto; got {value!r}") from None

    @property
    def uses_teacher(self) -> bool:
        """Whether the run needs a teacher (feature distillation or logit KD)."""
        return self.method is not Method.none or self.kd_weight > 0

    @property
    def method_options(self) -> dict:
        """The method's own options (MGD's mask, CWD's temperature), as :class:`~cwkd.FeatureDistiller` takes them."""
        names = {Method.mgd: ("mgd_mask", "mgd_ratio"), Method.cwd: ("cwd_tau",)}.get(self.method, ())
        return {name: getattr(self, name) for name in names}

    @property
    def teacher_part(self) -> TeacherSettings:
        """Which teacher, and where its weights come from."""
        return _part(TeacherSettings, self)

    @property
    def loss_part(self) -> LossSettings:
        """What the student learns: the method, its weights and the pairs."""
        return _part(LossSettings, self)

    @property
    def optim_part(self) -> OptimSettings:
        """How long and how fast: epochs, batch, optimizer and schedule."""
        return _part(OptimSettings, self)

    @property
    def input_part(self) -> InputSettings:
        """The data and what the model is fed."""
        return _part(InputSettings, self)

    def validate(self) -> None:
        """Refuse values that cannot work, with the option name and the fix (each part checks its own)."""
        self.loss_part.validate()
        self.optim_part.validate()
        self.input_part.validate()
        _in_range("--seed", self.seed, 0, MAX_SEED)
        if self.skip_nonfinite < 0:
            raise ConfigError(f"--skip-nonfinite must be 0 or more, got {self.skip_nonfinite}")
        if self.alpha == AlphaChoice.auto and self.method is Method.none:
            raise ConfigError("--alpha auto weighs the feature loss, and --method none has none; drop --alpha auto")
        if self.student_backbone_weights and (self.student_weights or self.student_pretrained):
            raise ConfigError("--backbone-weights (--student-backbone-weights in `cwkd distill`) starts the backbone "
                              "alone and cannot be combined with --pretrained or --weights (--student-pretrained, "
                              "--student-weights): give one of them")
        if self.uses_teacher and not self.teacher:
            raise ConfigError("distillation needs a teacher: pass --teacher NAME or a cwkd checkpoint")
        for key, method in (("mgd_mask", Method.mgd), ("mgd_ratio", Method.mgd), ("cwd_tau", Method.cwd)):
            if getattr(self, key) is not None and self.method is not method:
                raise ConfigError(f"--{key.replace('_', '-')} is an option of --method {method.value}, and this run "
                                  f"uses {self.method.value}: drop it")

    def to_dict(self) -> dict:
        """A JSON-ready dict (enums as their values)."""
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Rebuild a config saved by :meth:`to_dict`, ignoring keys this version does not know.

        Every known value is checked against its field's type first, so a hand-edited or foreign
        config is one :class:`ConfigError` naming the key, never a TypeError deep in a run.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"the config is a {type(data).__name__}, not an object of option values")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                values[f.name] = _typed(f.name, data[f.name], hints[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"the config has no '{f.name}'")
        if values.get("method") == Method.mgd.value and "mgd_mask" not in data:  # saved before MGD had options
            values["mgd_mask"], values["mgd_ratio"] = OLD_MGD[0].value, OLD_MGD[1]
        return cls(**values)

    def default_out(self, stamp: str) -> Path:
        """``runs/<timestamp>-<student>-<pid>``: the pid keeps two runs started in the same second apart."""
        return Path("runs") / f"{stamp}-{self.student.replace('/', '_')}-{os.getpid()}"


def _typed(key: str, value, hint):
    """``value`` if it fits the field type ``hint`` (an int fits float, a list fits a tuple), else ConfigError."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = typing.get_args(hint) if union else (hint,)
    for kind in kinds:
        if kind is type(None) and value is None:
            return value
        if isinstance(kind, type) and issubclass(kind, Enum) and value in [m.value for m in kind]:
            return value
        if kind in (int, float, str, bool, dict) and isinstance(value, kind) and (
                kind is bool or not isinstance(value, bool)):
            return value
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typing.get_origin(kind) is tuple and isinstance(value, list | tuple):
            return value  # parse_stats checks the items
        if typing.get_origin(kind) is list and isinstance(value, list | tuple):  # a repeatable option (--log)
            (item,) = typing.get_args(kind)
            return [_typed(key, v, item) for v in value]
    expected = " or ".join("one of " + ", ".join(m.value for m in kind)
                           if isinstance(kind, type) and issubclass(kind, Enum)
                           else _JSON_NAMES.get(typing.get_origin(kind) or kind, str(kind)) for kind in kinds)
    raise ConfigError(f"'{key}' is {json.dumps(value, default=str)}, expected {expected}")


_JSON_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", dict: "an object",
               tuple: "a list of numbers", type(None): "null"}


def _stats(flag: str, value) -> tuple[float, ...] | None:
    """Per-channel statistics from ``"0.5,0.5,0.5"``, a number or a list (None stays None)."""
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list | tuple) else [value]
    try:
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be comma-separated numbers such as 0.5,0.5,0.5; got {value!r}") from None
