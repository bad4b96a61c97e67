"""The fixed choices of cwkd's options, as ``str`` Enums, in a module that imports nothing heavy.

The CLI declares its options with these before any command runs, so ``cwkd --help`` never loads
torch. The modules that use them re-export them: ``cwkd.core.aligner.Method``, ``cwkd.core.losses.Reduction``,
``cwkd.evaluation.Split`` and ``cwkd.export.ExportFormat`` keep working.
"""

from __future__ import annotations

import math
from enum import Enum

from cwkd.errors import ConfigError


class Method(str, Enum):
    """How student features are aligned to the teacher's."""

    cwt = "cwt"        # 1x1 conv -> ReLU -> 1x1 conv (the paper's channel-wise transform)
    linear = "linear"  # one 1x1 conv (FitNets-style hint), for the ablation
    mgd = "mgd"        # masked generative distillation (Yang et al. 2022), for comparison
    cwd = "cwd"        # channel-wise distillation (Shu et al. 2021): KL of per-channel spatial softmaxes
    none = "none"      # no feature loss: plain training, or logit KD alone


class MgdMask(str, Enum):
    """What MGD masks in the aligned student map before regenerating the teacher's."""

    channel = "channel"  # whole channels, per image (MGD's classification)
    pixel = "pixel"      # whole positions, per image (MGD's detection and segmentation)


class Reduction(str, Enum):
    """How the feature L2 is reduced."""

    mean = "mean"  # mean over B*C*H*W; alpha near 1
    sum = "sum"    # sum over C*H*W, divided by the batch size (the paper's form); alpha near 1e-5


class AlphaChoice(str, Enum):
    """The word ``--alpha`` takes instead of a number."""

    auto = "auto"  # picked from the first batches' gradients (cwkd.core.autoalpha)


class Split(str, Enum):
    """Which split of the data set to score."""

    val = "val"
    train = "train"


class ExportFormat(str, Enum):
    """What ``cwkd export`` writes."""

    safetensors = "safetensors"
    onnx = "onnx"
    torchscript = "torchscript"
    hf = "hf"  # a Hugging Face model folder: what timm.create_model("hf-hub:...") loads


class Tracker(str, Enum):
    """Where ``--log`` also writes a run's metrics (each an optional extra: ``pip install 'cwkd[NAME]'``)."""

    tensorboard = "tensorboard"  # event files in RUN/tensorboard/ (torch.utils.tensorboard)
    wandb = "wandb"              # Weights & Biases
    trackio = "trackio"          # Hugging Face trackio


class Task(str, Enum):
    """What a model is trained to do; each has its module under ``cwkd/tasks/``."""

    classification = "classification"  # one label per image; top-1
    segmentation = "segmentation"      # one label per pixel; mIoU
    detection = "detection"            # boxes and classes (Faster R-CNN, RetinaNet); COCO box AP
    instance = "instance"              # boxes, classes and a mask per object (Mask R-CNN); COCO mask AP


class Precision(str, Enum):
    """Numeric precision of the forward pass (autocast); ``auto`` is resolved per device before a run."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    auto = "auto"    # the fastest of these on the device (cwkd.runtime.resolve_precision)


class Optimizer(str, Enum):
    """The optimizer."""

    sgd = "sgd"      # SGD with Nesterov momentum
    adamw = "adamw"


#: Largest sizes cwkd accepts: beyond them a run cannot allocate its tensors (or is a typo).
MAX_INPUT_SIZE = 4096  # pixels per side
MAX_IN_CHANS = 1024
MAX_HIDDEN = 65536  # aligner hidden width
MAX_CLASSES = 1_000_000
MAX_WORKERS = 256
MAX_BATCH_SIZE = 2**20
MAX_SEED = 2**63 - 1


def check_sizes(*, hidden: int | None = None, input_size: int | None = None, in_chans: int | None = None,
                batch_size: int | None = None, workers: int | str | None = None) -> None:
    """Refuse sizes that are not positive or too large to allocate; None means "the default" (not checked).

    Example:
        >>> check_sizes(input_size=60000)
        Traceback (most recent call last):
        cwkd.errors.ConfigError: --input-size must be from 1 to 4096 pixels, got 60000
    """
    for name, value, top, unit in (("--hidden", hidden, MAX_HIDDEN, " channels"),
                                   ("--input-size", input_size, MAX_INPUT_SIZE, " pixels"),
                                   ("--in-chans", in_chans, MAX_IN_CHANS, " channels")):
        if value is not None:
            _in_range(name, value, 1, top, unit)
    if batch_size is not None:
        _positive("--batch-size", batch_size)
        _in_range("--batch-size", batch_size, 1, MAX_BATCH_SIZE, " images")
    if workers is not None and workers != "auto":
        _in_range("--workers", workers, 0, MAX_WORKERS, " (or auto)")


def _in_range(name: str, value: int, low: int, high: int, unit: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be from {low} to {high}{unit}, got {value}")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive whole number, got {value}")


def _finite_at_least(name: str, value: float, low: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value):
        bound = f" of at least {low:g}" if math.isfinite(low) else ""
        raise ConfigError(f"{name} must be a finite number{bound}, got {value}")
    if value < low:
        raise ConfigError(f"{name} must be at least {low:g}, got {value:g}")
