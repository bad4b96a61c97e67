"""Typed errors. The library raises these; only the CLI turns them into a message and exit code 1."""

from __future__ import annotations

import signal
from pathlib import Path


class CwkdError(Exception):
    """Base class for every user-facing cwkd error. The message says what is wrong and how to fix it."""


class ModelNotFoundError(CwkdError):
    """A model name that neither timm nor cwkd's aliases know."""


class LayerError(CwkdError):
    """A layer name, or a layer pairing, that cannot be used."""


class PairingError(CwkdError):
    """No usable teacher/student layer pair could be formed."""


class DataError(CwkdError):
    """A data set that is missing, empty or malformed."""


class DataSetWarning(UserWarning):
    """A warning about the data set itself, the same on every process of a distributed run: rank 0 alone shows
    it (:func:`cwkd.runtime.main_rank_warnings`)."""


class CheckpointError(CwkdError):
    """A weights or checkpoint file that cannot be read safely."""


class ConfigError(CwkdError):
    """An option value that cannot work (fp16 on CPU, a negative alpha, ...)."""


class TrainingError(CwkdError):
    """Training had to stop (a non-finite loss, for example)."""


class NonfiniteLoss(TrainingError):
    """A step's loss went NaN or inf (past ``--skip-nonfinite``)."""


class ExportError(CwkdError):
    """An export that failed or did not verify."""


class RunInterrupted(Exception):
    """SIGINT/SIGTERM/SIGHUP stopped the run at a step boundary after saving; ``exit_code`` is 128 + signal.

    Not a :class:`CwkdError`: it is no error, and the CLI exits with ``exit_code``, not 1. It lives here, away
    from torch, so the CLI can catch it before torch has loaded (a Ctrl-C while torch imports).
    """

    def __init__(self, out: Path, signal_number: int) -> None:
        self.out, self.exit_code = out, 128 + signal_number
        name = signal.Signals(signal_number).name
        super().__init__(f"stopped by {name}; saved {out / 'last.safetensors'} and {out / 'state.pt'}; "
                         f"continue with --resume {out}")
