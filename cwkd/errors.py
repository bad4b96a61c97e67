"""Typed errors. The library raises these; only the CLI turns them into a message and exit code 1."""

from __future__ import annotations


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
