"""What ``--resume`` reads back: the run's config (config.json) and its training state (state.pt).

``state.pt`` holds the whole training state (weights included) in one file, so resuming never mixes weights
and optimizer state from different epochs; :mod:`cwkd.training.rundir` writes it.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import torch

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


def no_best(metric: str) -> dict:
    """The best record before any epoch: ``{"metric": metric, "value": -1.0, "epoch": -1}``."""
    return {"metric": metric, "value": -1.0, "epoch": -1}


def restore(out: Path, distiller, stepper: Stepper, metric: str) -> tuple[int, int, dict]:
    """Load state.pt into the run's objects; return (epoch, step, best) to continue from.

    ``metric`` is the task's best metric. A run killed before its first epoch ended has no state.pt:
    it starts again from the beginning. The metric lines of epochs past the state are the caller's to drop
    (:func:`cwkd.training.rundir.truncate_metrics`).
    """
    path = out / "state.pt"
    if not path.exists():
        return 0, 0, no_best(metric)
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
    return epoch, step, best


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
