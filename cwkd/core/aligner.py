"""Aligners: the learnable transforms that map student features into the teacher's channel space.

Only the student side is transformed; teacher features are used as they are. Aligners exist for
training only and are dropped from the exported student.
"""

from __future__ import annotations

import torch
from torch import nn

from cwkd.choices import Method, MgdMask  # defined torch-free for the CLI; re-exported here


class ChannelWiseTransform(nn.Module):
    """``W2(ReLU(W1(x)))`` with 1x1 convolutions: per pixel, never mixing positions."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or out_channels
        self.fc1 = nn.Conv2d(in_channels, hidden, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, out_channels, kernel_size=1)
        # He init keeps the ReLU branch's variance; zero biases start the map unbiased.
        nn.init.kaiming_normal_(self.fc1.weight, mode="fan_in", nonlinearity="relu")
        nn.init.kaiming_normal_(self.fc2.weight, mode="fan_in", nonlinearity="linear")
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LinearTransform(nn.Module):
    """A single 1x1 convolution, as in FitNets' hint regressor."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_in", nonlinearity="linear")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MaskedGenerator(nn.Module):
    """MGD: align channels, mask part of the map in training, and regenerate the teacher map from the rest.

    As MGD's reference code: a 1x1 conv aligns the channels only where they differ, then in training a random
    share ``mask_ratio`` of whole channels (``mask="channel"``, MGD's classification) or of whole positions
    (``mask="pixel"``, its detection and segmentation) is zeroed, drawn anew for each image, and
    conv3x3-ReLU-conv3x3 generates the teacher's map. In eval mode nothing is masked.
    """

    def __init__(self, in_channels: int, out_channels: int, mask: MgdMask | str = MgdMask.channel,
                 mask_ratio: float = 0.15) -> None:
        super().__init__()
        self.mask = MgdMask(mask)
        self.mask_ratio = mask_ratio
        self.align = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels else nn.Identity()
        )
        self.generate = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """A 0/1 mask that broadcasts over ``x`` (B, C, H, W): 0 on a random ``mask_ratio`` share of its
        channels or positions, per image."""
        b, c, h, w = x.shape
        shape = (b, c, 1, 1) if self.mask is MgdMask.channel else (b, 1, h, w)
        return (torch.rand(shape, device=x.device) >= self.mask_ratio).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.align(x)
        if self.training and self.mask_ratio > 0:
            x = x * self.keep(x)
        return self.generate(x)


class ChannelAlign(nn.Module):
    """CWD's student side: a 1x1 conv where the channel counts differ, nothing where they agree."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.align = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                      if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.align(x)


def build_aligner(method: Method | str, in_channels: int, out_channels: int, hidden: int | None = None, *,
                  mgd_mask: MgdMask | str = MgdMask.channel, mgd_ratio: float = 0.15) -> nn.Module:
    """One aligner for one layer pair (``mgd_mask``/``mgd_ratio``: MGD's mask; its classification defaults).

    Example:
        >>> build_aligner("cwt", 1024, 2048)
        ChannelWiseTransform(...)  # doctest: +SKIP
    """
    method = Method(method)
    if method is Method.cwt:
        return ChannelWiseTransform(in_channels, out_channels, hidden)
    if method is Method.linear:
        return LinearTransform(in_channels, out_channels)
    if method is Method.mgd:
        return MaskedGenerator(in_channels, out_channels, mgd_mask, mgd_ratio)
    if method is Method.cwd:
        return ChannelAlign(in_channels, out_channels)
    raise ValueError("method 'none' has no aligner")


def aligner_macs(method: Method | str, in_channels: int, out_channels: int, height: int, width: int,
                 hidden: int | None = None) -> int:
    """Multiply-adds one aligner spends per image (weights only; ReLU and resize are free)."""
    method = Method(method)
    pixels = height * width
    if method is Method.cwt:
        hidden = hidden or out_channels
        return pixels * (in_channels * hidden + hidden * out_channels)
    if method is Method.linear:
        return pixels * in_channels * out_channels
    if method is Method.mgd:
        align = in_channels * out_channels if in_channels != out_channels else 0
        return pixels * (align + 2 * 9 * out_channels * out_channels)
    if method is Method.cwd:
        return pixels * in_channels * out_channels if in_channels != out_channels else 0
    return 0
