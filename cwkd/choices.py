"""The fixed choices of cwkd's options, as ``str`` Enums, in a module that imports nothing heavy.

The CLI declares its options with these before any command runs, so ``cwkd --help`` never loads
torch. The modules that use them re-export them: ``cwkd.aligner.Method``, ``cwkd.losses.Reduction``,
``cwkd.evaluation.Split`` and ``cwkd.export.ExportFormat`` keep working.
"""

from __future__ import annotations

from enum import Enum


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

    auto = "auto"  # picked from the first batches' gradients (cwkd.autoalpha)


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
