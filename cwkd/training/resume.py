"""What ``--resume`` reads back: the run's config (config.json) and its training state (state.pt).

``state.pt`` holds the whole training state (weights included) in one file, so resuming never mixes weights
and optimizer state from different epochs: :func:`state_record` is its layout, :class:`TrainState` the part
that changes as a run goes, and :mod:`cwkd.training.rundir` writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from cwkd.errors import CheckpointError, ConfigError
from cwkd.files.checkpoint import load_state
from cwkd.files.metadata import is_int, upgrade_best
from cwkd.files.weights import load_state_checked
from cwkd.training import runinputs
from cwkd.training.config import TrainConfig
from cwkd.training.optim import Stepper

#: Layout version of state.pt; a file with a larger number needs a newer cwkd.
STATE_VERSION = 1

#: Options a resumed run may change: how it runs, not what it trains.
RESUMABLE = ("epochs", "workers", "device", "quiet", "skip_corrupt", "skip_nonfinite", "data_root", "download",
             "teacher_check", "log")


def load_config(out: str | Path, *, options: dict | None = None) -> TrainConfig:
    """The config a run was started with, for ``--resume``.

    ``options`` are the ones given on the resuming command line: those in :data:`RESUMABLE` replace the
    saved values (``epochs`` may raise the total); a new place for a moved data folder, teacher or
    weights file is taken when the file's content is unchanged (:func:`cwkd.training.runinputs.locate`); any
    other option must equal the saved value, so a retyped command line resumes, and a changed one is
    refused instead of being silently ignored.
    """
    path = Path(out) / "config.json"
    record = _read_record(path, out)
    try:
        cfg = TrainConfig.from_dict(record["config"])
    except ConfigError as exc:
        raise ConfigError(f"--resume {out}: {path} holds a config this cwkd cannot use ({exc}); it was edited "
                          "or written by another cwkd version: restore it, or start a new run with --out") from exc
    entries = record.get("inputs") if isinstance(record.get("inputs"), dict) else {}
    moved = {}
    for key, value in (options or {}).items():
        if key in RESUMABLE:
            setattr(cfg, key, value)
        elif runinputs.movable(key, entries):
            moved[key] = value
        elif key == "alpha" and value == "auto" and cfg.alpha_auto:
            continue  # the number this run's `--alpha auto` picked at its start
        elif not _same(key, value, getattr(cfg, key, None)):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"--resume {out}: {flag} {_plain(value)} differs from the run's own "
                f"{_plain(getattr(cfg, key, None))}; a resumed run keeps its config (only "
                f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may change): drop the option, or "
                "start a new run with --out"
            )
    runinputs.locate(cfg, entries, moved, out)
    cfg.out, cfg.overwrite = str(out), False
    cfg.validate()
    return cfg


def _read_record(path: Path, out: str | Path) -> dict:
    """config.json as a dict holding a "config" dict, or a ConfigError saying what is wrong with it."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {out}: cannot read {path} ({exc}); is this a cwkd run directory?") from exc
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"--resume {out}: {path} is not a cwkd run config (it has no \"config\" object); "
                          "restore it, or start a new run with --out")
    return record


def _plain(value):
    return value.value if isinstance(value, Enum) else list(value) if isinstance(value, tuple) else value


def _same(key: str, given, saved) -> bool:
    """Whether a resuming command's option says what the saved config says."""
    given = _plain(TrainConfig.parse_stats(key, given) if key in ("mean", "std") else given)
    saved = _plain(saved)
    if given == saved or key == "precision" and given == "auto":  # auto was resolved when the run began
        return True
    if key in (*runinputs.INPUT_KEYS, "out") and given and saved:
        return Path(str(given)).resolve() == Path(str(saved)).resolve()
    return False


@dataclass
class TrainState:
    """Where a run is: what changes as it trains, and what state.pt saves beside the weights and optimizer.

    ``epoch`` is the epoch to train next (from 0) and ``step`` the steps of it already done (a run stopped
    mid-epoch goes on from there); ``best`` is the best epoch so far, ``{"metric", "value", "epoch"}`` (its
    epoch from 0, -1 before any); ``last`` is the last finished epoch's metrics record (empty before one);
    ``pending`` the train record of an epoch whose steps all ran but whose validation could not read its data
    (resumed, it is validated without training again; empty otherwise).
    """

    best: dict
    epoch: int = 0
    step: int = 0
    last: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)

    @classmethod
    def start(cls, metric: str) -> TrainState:
        """A run before its first step, whose best epoch will be the one with the highest ``val_<metric>``."""
        return cls(best={"metric": metric, "value": -1.0, "epoch": -1})

    def end_epoch(self, record: dict) -> None:
        """Epoch ``record["epoch"]`` (from 1) finished: the next starts at step 0, and a higher score is the best."""
        metric = self.best["metric"]
        if record[f"val_{metric}"] > self.best["value"]:
            self.best = {"metric": metric, "value": record[f"val_{metric}"], "epoch": record["epoch"] - 1}
        self.epoch, self.step, self.last, self.pending = record["epoch"], 0, record, {}

    @property
    def last_is_best(self) -> bool:
        """Whether the last finished epoch is the best so far (it is saved as best.safetensors too)."""
        return bool(self.last) and self.best["epoch"] == self.last["epoch"] - 1


def state_record(distiller: nn.Module, stepper: Stepper, state: TrainState) -> dict:
    """What state.pt holds: the weights, the optimizer's, schedule's and scaler's state, and ``state``."""
    return {
        "model": distiller.state_dict(), "optimizer": stepper.optimizer.state_dict(),
        "scheduler": stepper.scheduler.state_dict(), "scaler": stepper.scaler.state_dict(),
        "epoch": state.epoch, "step": state.step, "best": state.best, "pending": state.pending,
        "format_version": STATE_VERSION,
    }


def restore(out: Path, distiller: nn.Module, stepper: Stepper, metric: str) -> TrainState:
    """Load state.pt into the run's objects; return the state to continue from.

    ``metric`` is the task's best metric. A run killed before its first epoch ended has no state.pt:
    it starts again from the beginning. The metric lines of epochs past the state are the caller's to drop
    (:meth:`cwkd.training.rundir.RunDir.truncate_metrics`).
    """
    path = out / "state.pt"
    if not path.exists():
        return TrainState.start(metric)
    state = load_state(path)
    epoch, step, best = _check_state(state, path)
    load_state_checked(distiller, state["model"], f"the weights in {path}",
                       hint="it was saved by another run; start a new run")
    try:
        stepper.optimizer.load_state_dict(state["optimizer"])
        stepper.scheduler.load_state_dict(state["scheduler"])
        stepper.scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} does not match this run ({detail}); start a new run") from exc
    pending = state.get("pending")
    return TrainState(best=best, epoch=epoch, step=step, pending=pending if isinstance(pending, dict) else {})


def _check_state(state: dict, path: Path) -> tuple[int, int, dict]:
    """Validate state.pt's layout before any of it is used; return its (epoch, step, best)."""
    version = state.get("format_version")
    if not is_int(version) or version < 1:
        raise CheckpointError(f"{path} is not cwkd training state (format_version {version!r}); start a new run")
    if version > STATE_VERSION:
        raise CheckpointError(f"{path} was written by a newer cwkd (state format {version}); upgrade cwkd")
    missing = [k for k in ("model", "optimizer", "scheduler", "scaler", "best") if not isinstance(state.get(k), dict)]
    epoch, step, best = state.get("epoch"), state.get("step"), state.get("best", {})
    ok = not missing and is_int(epoch) and epoch >= 0 and is_int(step) and step >= 0
    best = upgrade_best(best)
    ok = ok and isinstance(best.get("metric"), str) and isinstance(best.get("value"), int | float)
    ok = ok and is_int(best.get("epoch"))
    ok = ok and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items())
    if not ok:
        raise CheckpointError(f"{path} is damaged: its epoch, step, best or state dicts are missing or of the "
                              "wrong type; start a new run")
    return epoch, step, {"metric": best["metric"], "value": float(best["value"]), "epoch": best["epoch"]}
