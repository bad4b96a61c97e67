"""Losses: the feature L2 between aligned student and teacher maps, CWD's channel-wise divergence, and
Hinton's logit KD (per image, or per pixel).

Feature-loss reduction
----------------------
cwkd's default, ``reduction="mean"``, averages the squared error over every element (B*C*H*W),
so a useful ``alpha`` is near 1. The paper (after MGD) sums over C*H*W and divides by the
batch size, so its alpha is tiny. The two say the same thing:

    alpha_mean = alpha_sum * C * H * W      e.g. 7e-5 * 2048 * 7 * 7 = 7.02 (ResNet-50 layer4 at 224 px)

``reduction="sum"`` gives the paper's form, for users who copy its alphas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cwkd.choices import Reduction  # defined torch-free for the CLI; re-exported here


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: Reduction | str = "mean") -> torch.Tensor:
    """Squared L2 between an aligned student map and a teacher map of the same shape, in fp32.

    Example:
        >>> feature_loss(torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).item()
        1.0
    """
    diff = student.float() - teacher.float()
    if Reduction(reduction) is Reduction.mean:
        return diff.pow(2).mean()
    return diff.pow(2).sum() / student.shape[0]


def channel_divergence(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """CWD (Shu et al., ICCV 2021): each channel's map becomes a distribution over its positions (a softmax at
    temperature ``tau``); ``KL(teacher || student)`` per channel, times ``tau^2``, averaged over the N*C channels
    of the batch (summed over channels and divided by N*C, as the paper and MMRazor's ChannelWiseDivergence).

    Example:
        >>> channel_divergence(torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).item()
        0.0
    """
    log_p_s = F.log_softmax(student.float().flatten(2) / tau, dim=-1)
    log_p_t = F.log_softmax(teacher.float().flatten(2) / tau, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean() * (tau * tau)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            keep: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton's KD: ``KL(softmax(t / T) || softmax(s / T)) * T^2`` over the classes (dim 1), averaged over
    the positions: the images of ``(B, K)`` logits, or the pixels of ``(B, K, H, W)`` ones. ``keep`` (a bool
    tensor of the positions' shape) counts only the positions where it is True; none kept gives 0.

    Example:
        >>> kd_loss(torch.zeros(2, 10), torch.zeros(2, 10)).item()
        0.0
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    per_position = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    if keep is None:
        return per_position.mean() * (t * t)
    # A masked sum, not per_position[keep]: boolean indexing waits for the device to count the positions.
    keep = keep.to(per_position.dtype)
    return (per_position * keep).sum() / keep.sum().clamp(min=1) * (t * t)


def convert_alpha(alpha: float, channels: int, height: int, width: int, *, to: Reduction | str) -> float:
    """Convert alpha between the two reductions for a ``channels x height x width`` map.

    Example:
        >>> round(convert_alpha(7e-5, 2048, 7, 7, to="mean"), 2)
        7.02
    """
    elements = channels * height * width
    return alpha * elements if Reduction(to) is Reduction.mean else alpha / elements


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, *,
                  label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """A classifier's loss parts: cross-entropy in fp32, with label smoothing (the distiller's default task loss).

    Example:
        >>> cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]))["task_loss"].item()  # doctest: +ELLIPSIS
        1.098...
    """
    return {"task_loss": F.cross_entropy(outputs.float(), targets, label_smoothing=label_smoothing)}
