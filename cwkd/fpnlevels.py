"""A detector's FPN levels, found by their measured stride, paired teacher to student, and the teacher's neck run.

Levels pair by stride, never by index: a two-stage detector's FPN starts at stride 4 (P2) and a
RetinaNet's at 8 (P3), so index pairing (MMRazor's) would put stride 4 against stride 8. The stride is
measured on the batch the detector really sees: its own ``transform`` resizes and pads the images, then
the backbone + FPN runs on that padded tensor.

The teacher's backbone + FPN (not its RPN or heads) runs on the *student's* transformed, padded batch,
so both maps cover the same pixels at the same size; only the normalisation is remapped where the two
were made for different mean/std.

Example:
    >>> pairs = pair_fpn_levels(fpn_levels(teacher, images), fpn_levels(student, images))
    >>> [(p.teacher, p.student, p.stride) for p in pairs]  # doctest: +SKIP
    [('1', '0', 8), ('2', '1', 16), ('3', '2', 32)]
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cwkd.errors import PairingError
from cwkd.features import _restore_mode

#: The level a two-stage detector's FPN max-pools from P5 (torchvision's ``LastLevelMaxPool``). It adds
#: nothing to distil beyond P5 and MGD leaves it out; RetinaNet's P6/P7 are convolutions and stay.
POOLED_LEVEL = "pool"


@dataclass(frozen=True)
class FPNLevel:
    """One output of a detector's backbone + FPN: its key, measured stride and channels."""

    name: str
    stride: int
    channels: int


@dataclass(frozen=True)
class LevelPair:
    """A teacher level and a student level at the same stride."""

    teacher: str
    student: str
    stride: int
    teacher_channels: int
    student_channels: int


def fpn_levels(model: nn.Module, images: Sequence[torch.Tensor]) -> list[FPNLevel]:
    """The levels ``model.backbone`` returns on ``images`` (0-1 ``(3, H, W)`` tensors) after ``model.transform``.

    Runs in eval mode (the resize the detector uses at test time) and puts the model's modes back.
    """
    with _restore_mode(model), torch.no_grad():
        model.eval()
        batch, _ = model.transform(list(images))
        maps = model.backbone(batch.tensors)
    height, width = batch.tensors.shape[-2:]
    return [FPNLevel(name, _stride(height, width, out), out.shape[1]) for name, out in maps.items()]


def _stride(height: int, width: int, out: torch.Tensor) -> int:
    """The power of two nearest to (padded input size / map size), the larger side deciding."""
    size, feat = (height, out.shape[-2]) if height >= width else (width, out.shape[-1])
    return 2 ** round(math.log2(size / feat))


def pair_fpn_levels(teacher: Sequence[FPNLevel], student: Sequence[FPNLevel]) -> list[LevelPair]:
    """Pair teacher and student levels that share a stride, smallest stride first.

    The max-pooled ``'pool'`` level is left out; where one model has two levels at one stride
    (torchvision's MobileNetV3 FPN: two at 32), the deeper one (later in the FPN's order) is taken.
    """
    t_levels, s_levels = _by_stride(teacher), _by_stride(student)
    shared = sorted(set(t_levels) & set(s_levels))
    if not shared:
        raise PairingError(
            f"the teacher's FPN levels (strides {sorted(t_levels)}) and the student's ({sorted(s_levels)}) share no "
            "stride, so no level can be distilled; pick detectors whose FPNs overlap (both have stride 8-32)"
        )
    return [LevelPair(t_levels[s].name, s_levels[s].name, s, t_levels[s].channels, s_levels[s].channels)
            for s in shared]


def _by_stride(levels: Sequence[FPNLevel]) -> dict[int, FPNLevel]:
    found: dict[int, FPNLevel] = {}
    for level in levels:
        if level.name != POOLED_LEVEL:
            found[level.stride] = level  # a later (deeper) level at the same stride replaces an earlier one
    return found


def normalization(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std ``(3, 1, 1)`` a detector's transform normalises with."""
    transform = model.transform
    mean = torch.as_tensor(transform.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(transform.image_std, dtype=torch.float32)[:, None, None]
    return mean, std


def teacher_backbone_features(teacher: nn.Module, student: nn.Module, tensors: torch.Tensor,
                              image_sizes: Sequence[tuple[int, int]] | None = None) -> OrderedDict[str, torch.Tensor]:
    """The teacher's backbone + FPN maps on the student's transformed, padded batch ``tensors``.

    ``tensors`` is ``ImageList.tensors`` from ``student.transform``: normalised with the student's mean/std.
    Where the teacher's differ, the pixels are remapped to the teacher's and, given ``image_sizes``
    (``ImageList.image_sizes``), the padding is put back to zero as the teacher's own transform pads.
    Runs under inference mode; the maps returned are plain clones that autograd may save.
    """
    s_mean, s_std = (t.to(tensors.device) for t in normalization(student))
    t_mean, t_std = (t.to(tensors.device) for t in normalization(teacher))
    with torch.inference_mode():
        x = tensors
        if not (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std)):
            x = (x * s_std + s_mean - t_mean) / t_std
            if image_sizes is not None:
                x = x * _content_mask(x, image_sizes)
        maps = teacher.backbone(x.to(next(teacher.parameters()).dtype))
    return OrderedDict((name, out.clone()) for name, out in maps.items())


def _content_mask(x: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """1 on each image's pixels, 0 on the padding to the batch's size: ``(N, 1, H, W)``."""
    mask = torch.zeros(x.shape[0], 1, *x.shape[-2:], dtype=x.dtype, device=x.device)
    for i, (h, w) in enumerate(image_sizes):
        mask[i, :, :h, :w] = 1
    return mask
