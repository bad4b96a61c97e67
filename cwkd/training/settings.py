"""The typed parts of a run's settings: which teacher, the schedule, the input.

:class:`~cwkd.training.config.TrainConfig` keeps one flat field per CLI option: that is how users build it
(``TrainConfig(data=..., alpha=...)``) and how config.json stores it. These are typed, read-only views of those
fields, grouped by concern, and each checks its own values; the loss part, the method's own, is
:class:`cwkd.core.settings.LossSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cwkd.choices import Optimizer, _finite_at_least, _positive, check_sizes
from cwkd.errors import ConfigError


@dataclass(frozen=True)
class TeacherSettings:
    """Which teacher, and where its weights come from."""

    teacher: str | None = None
    teacher_weights: str | None = None
    teacher_pretrained: bool = False
    allow_random_teacher: bool = False


@dataclass(frozen=True)
class OptimSettings:
    """How long and how fast: epochs, batch, optimizer and schedule."""

    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: Optimizer = Optimizer.sgd
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    clip_grad: float | None = None

    def validate(self) -> None:
        """Refuse a schedule that cannot run."""
        _positive("--epochs", self.epochs)
        check_sizes(batch_size=self.batch_size)
        _finite_at_least("--lr", self.lr, 1e-12)
        _finite_at_least("--weight-decay", self.weight_decay, 0.0)
        _finite_at_least("--momentum", self.momentum, 0.0)
        _finite_at_least("--warmup-epochs", self.warmup_epochs, 0.0)
        if self.clip_grad is not None:
            _finite_at_least("--clip-grad", self.clip_grad, 1e-12)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"--warmup-epochs must be at most --epochs ({self.epochs}), got {self.warmup_epochs:g}")


@dataclass(frozen=True)
class InputSettings:
    """The data set and what the model is fed."""

    data: str = ""
    data_root: str | None = None
    download: bool = False
    skip_corrupt: bool = False
    input_size: int | None = None
    in_chans: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    workers: int | str = "auto"  # a number of loader processes, or auto (cwkd.data.feed.resolve_workers)

    def validate(self) -> None:
        """Refuse sizes and statistics that cannot work."""
        check_sizes(input_size=self.input_size, in_chans=self.in_chans, workers=self.workers)
        for value in self.std or ():
            _finite_at_least("--std", value, 1e-12)
        for value in self.mean or ():
            _finite_at_least("--mean", value, float("-inf"))
