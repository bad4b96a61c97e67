"""Opt-in experiment tracking (``--log tensorboard|wandb|trackio``): what metrics.jsonl records, also sent elsewhere.

Nothing here syncs with the device: the engine hands over numbers it already has on the host (each epoch's
record, and the running loss means it reads for the progress bar every 10 steps), on rank 0 only. Every
value goes out at one x axis, the global optimizer step: the per-step running means as ``step/loss``,
``step/task_loss``, ...; each epoch's record at the epoch's last step, its metrics.jsonl keys with the first
``_`` as ``/`` (``train/loss``, ``train/feat/layer4->layer4``, ``val/<metric>``, ``lr``, ``epoch``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from cwkd.choices import Tracker
from cwkd.errors import ConfigError

#: The module each tracker needs, and the extra that installs it.
_MODULES = {Tracker.tensorboard: "torch.utils.tensorboard", Tracker.wandb: "wandb", Tracker.trackio: "trackio"}


def trackers(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """``--log`` values as a tuple of tracker names, each once; an unknown one is a ConfigError.

    Example:
        >>> trackers(["tensorboard", "tensorboard"])
        ('tensorboard',)
    """
    values = [values] if isinstance(values, str) else list(values or ())
    out: list[str] = []
    for value in values:
        try:
            name = Tracker(value).value
        except ValueError:
            raise ConfigError(f"--log {value}: use {', '.join(t.value for t in Tracker)}") from None
        if name not in out:
            out.append(name)
    return tuple(out)


def require(names: Iterable[str]) -> dict[str, ModuleType]:
    """Import each tracker's package, or say in one line which extra installs it (before anything trains)."""
    modules = {}
    for name in names:
        try:
            modules[name] = importlib.import_module(_MODULES[Tracker(name)])
        except ImportError:
            raise ConfigError(f"--log {name} needs the {name} package: pip install 'cwkd[{name}]' (or drop "
                              f"--log {name})") from None
    return modules


class Tracking:
    """The run's trackers (none by default), written from rank 0; a context manager that closes them."""

    def __init__(self, names: Iterable[str] = (), *, out: Path | None = None, config: dict | None = None,
                 enabled: bool = True) -> None:
        modules = require(names)  # every rank checks, so a missing package stops all of them alike
        self._writers = [_open(name, module, out, config or {}) for name, module in modules.items()] \
            if enabled and out is not None else []

    def __bool__(self) -> bool:
        """Whether any tracker writes (none by default, and none off rank 0)."""
        return bool(self._writers)

    def step(self, step: int, losses: dict[str, float]) -> None:
        """The running loss means of this epoch so far, at global ``step``."""
        if self._writers:
            self._write({f"step/{k}": v for k, v in losses.items()}, step)

    def epoch(self, record: dict, step: int) -> None:
        """One epoch's metrics.jsonl record, at the epoch's last global ``step``."""
        if self._writers:
            self._write({_tag(k): v for k, v in record.items() if isinstance(v, int | float)}, step)

    def _write(self, scalars: dict[str, float], step: int) -> None:
        for writer in self._writers:
            writer.write(scalars, step)

    def close(self) -> None:
        """Flush and close every tracker."""
        for writer in self._writers:
            writer.close()
        self._writers = []

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tag(key: str) -> str:
    """``train_loss`` -> ``train/loss``, ``val_<metric>`` -> ``val/<metric>``; other keys stay (``lr``, ``epoch``)."""
    for split in ("train_", "val_"):
        if key.startswith(split):
            return split[:-1] + "/" + key[len(split):]
    return key


class _TensorBoard:
    def __init__(self, module: ModuleType, out: Path) -> None:
        self.writer = module.SummaryWriter(log_dir=str(out / "tensorboard"))

    def write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class _RunLogger:
    """wandb and trackio: ``init(project, name, config)``, ``log(dict, step)``, ``finish()``."""

    def __init__(self, module: ModuleType, out: Path, config: dict, **where) -> None:
        self.module = module
        self.run = module.init(project="cwkd", name=out.name, config=config, **where)

    def write(self, scalars: dict[str, float], step: int) -> None:
        self.module.log(scalars, step=step)

    def close(self) -> None:
        self.module.finish()


def _open(name: str, module: ModuleType, out: Path, config: dict) -> _TensorBoard | _RunLogger:
    """The writer of tracker ``name``: TensorBoard and wandb files go in the run directory."""
    if name == Tracker.tensorboard.value:
        return _TensorBoard(module, out)
    return _RunLogger(module, out, config, **({"dir": str(out)} if name == Tracker.wandb.value else {}))
