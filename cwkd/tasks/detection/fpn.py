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

from cwkd.core.features import LayerInfo, _restore_mode
from cwkd.core.pairing import Pair
from cwkd.errors import PairingError

#: The level a two-stage detector's FPN max-pools from P5 (torchvision's ``LastLevelMaxPool``). It adds
#: nothing to distil beyond P5 and MGD leaves it out; RetinaNet's P6/P7 are convolutions and stay.
POOLED_LEVEL = "pool"


@dataclass(frozen=True)
class FPNLevel:
    """One output of a detector's backbone + FPN: its key, measured stride and channels."""

    name: str
    stride: int
    channels: int
    size: tuple[int, int] = (0, 0)  # (height, width) on the probe batch


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
    return [FPNLevel(name, _stride(height, width, out), out.shape[1], tuple(out.shape[-2:]))
            for name, out in maps.items()]


def _probe_images(model: nn.Module, input_size: Sequence[int]) -> list[torch.Tensor]:
    """Two mid-grey images on ``model``'s device (teacher and student may sit on different ones)."""
    device = next(model.parameters()).device
    return [torch.full(tuple(input_size), 0.5, device=device) for _ in range(2)]


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


class FPNTaps:
    """The FPN levels a detector student learns from a detector teacher, and both sides' maps each step.

    Levels pair by measured stride (:func:`pair_fpn_levels`, probed at ``input_size``); a pair's layers
    are named ``P<n>`` (stride ``2**n``) on both sides. While attached, hooks keep the student's
    transformed, padded batch and its backbone + FPN maps from its own forward (with gradients);
    :meth:`pop` then runs the teacher's backbone + FPN on that same batch (:func:`teacher_backbone_features`).

    Example:
        >>> taps = FPNTaps(teacher, student, (3, 128, 128))  # doctest: +SKIP
        >>> [p.key for p in taps.pairs]  # doctest: +SKIP
        ['P3->P3', 'P4->P4', 'P5->P5']
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, input_size: Sequence[int]) -> None:
        self.teacher, self.student = teacher, student
        s_levels = fpn_levels(student, _probe_images(student, input_size))
        found = pair_fpn_levels(fpn_levels(teacher, _probe_images(teacher, input_size)), s_levels)
        sizes = {level.name: level.size for level in s_levels}
        self.pairs = [Pair(_layer(p.student, p.student_channels, p.stride, sizes[p.student], i),
                           _layer(p.teacher, p.teacher_channels, p.stride, sizes[p.student], i))
                      for i, p in enumerate(found)]
        self._keys = {_level_name(p.stride): (p.student, p.teacher) for p in found}
        self._batch = self._maps = None
        self._handles: list = []

    def attach(self) -> None:
        """Hook the student's transform and backbone (idempotent)."""
        if not self._handles:
            self._handles = [self.student.transform.register_forward_hook(self._keep_batch),
                             self.student.backbone.register_forward_hook(self._keep_maps)]

    def detach(self) -> None:
        """Remove the hooks and drop anything held."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._batch = self._maps = None

    def _keep_batch(self, _module, _inputs, output) -> None:
        self._batch = output[0]  # (ImageList, targets)

    def _keep_maps(self, _module, _inputs, output) -> None:
        self._maps = output

    def pop(self, teacher: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(student maps, teacher maps)`` of the last student forward by pair layer name; clears them."""
        batch, maps, self._batch, self._maps = self._batch, self._maps, None, None
        if maps is None:
            return {}, {}
        s_maps = {name: maps[s_key] for name, (s_key, _) in self._keys.items()}
        if not teacher:
            return s_maps, {}
        t_all = teacher_backbone_features(self.teacher, self.student, batch.tensors, batch.image_sizes)
        return s_maps, {name: t_all[t_key] for name, (_, t_key) in self._keys.items()}


def _level_name(stride: int) -> str:
    return f"P{round(math.log2(stride))}"


def _layer(key: str, channels: int, stride: int, size: tuple[int, int], order: int) -> LayerInfo:
    """An FPN level as the layer record pairs, reports and checkpoints use (named ``P<n>``)."""
    return LayerInfo(name=_level_name(stride), type=f"FPN level '{key}'", shape=(channels, *size),
                     channels=channels, height=size[0], width=size[1], reduction=stride, layout="nchw",
                     prefix_tokens=0, is_stage=True, params=0, order=order)
