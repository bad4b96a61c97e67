"""What a model says about itself: the name it was built from, its input size and input channels."""

from __future__ import annotations

from torch import nn


def model_name(model: nn.Module) -> str:
    """The timm name a model was built from, or its class name for a plain module."""
    return getattr(model, "cwkd_name", None) or type(model).__name__


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) input a model expects: its timm ``pretrained_cfg`` or ``(3, 224, 224)``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    in_chans = input_channels(model) or size[0]
    return (int(in_chans), int(size[1]), int(size[2]))


def input_channels(model: nn.Module) -> int | None:
    """The input channels of the model's first convolution, if it has one.

    Why not timm's ``pretrained_cfg``: it says 3 even for a model built with ``in_chans=1``.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None
