"""Semantic-segmentation models by name: torchvision's builders, and PSPNet/DeepLabV3 heads on any timm body.

Every model returns what torchvision's segmentation models return, ``{"out": logits}`` at the input's
size, plus ``"aux"`` logits where the model has an auxiliary head, so one loss and one metric serve all.

- ``fcn_resnet50``, ``deeplabv3_resnet101``, ``lraspp_mobilenet_v3_large``, ...: torchvision's
  builders, always with ``weights=None, weights_backbone=None`` (nothing downloads unasked);
- ``pspnet_<timm name>`` and ``deeplabv3_<timm name>`` (e.g. ``pspnet_resnet18``, the paper's R18-D8
  student): a timm ``features_only`` body dilated to output stride 8 where it supports it, the last
  stage feeding the head and the one before it an auxiliary FCN head.

Either kind's backbone is ``model.backbone``; :func:`backbone_origin` says where its ImageNet weights come
from, for the segmentation task to start it from them or from a classifier's file (:mod:`cwkd.tasks.bodies`).

Example:
    >>> model = create_segmentation_model("pspnet_resnet18", num_classes=11)
    >>> model(torch.randn(1, 3, 64, 64))["out"].shape
    torch.Size([1, 11, 64, 64])
"""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation as tv_seg
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from cwkd.errors import ConfigError, ModelNotFoundError

#: torchvision's segmentation builders cwkd builds by name.
TORCHVISION_MODELS = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                      "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
#: Heads cwkd puts on a timm body: ``<head>_<timm name>``.
TIMM_HEADS = ("pspnet", "deeplabv3")


class GridPool(nn.Module):
    """Adaptive average pooling to a ``bins`` x ``bins`` grid that also exports to ONNX.

    PyTorch's ONNX exporter cannot export adaptive pooling to a grid that does not divide the map
    ("input size not accessible"). While a graph is traced for export, the same averages are taken as
    two matrix products with averaging matrices built from the (then fixed) map size; in eager mode it
    is ``F.adaptive_avg_pool2d`` itself, so training is untouched.
    """

    def __init__(self, bins: int) -> None:
        super().__init__()
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():
            return F.adaptive_avg_pool2d(x, self.bins)
        rows, cols = (_averaging(self.bins, int(n), x.dtype, x.device) for n in x.shape[-2:])
        return rows @ x @ cols.T

    def extra_repr(self) -> str:
        return f"bins={self.bins}"


def _averaging(bins: int, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(bins, size): row i averages cells floor(i*size/bins) .. ceil((i+1)*size/bins)-1, as adaptive pooling does."""
    matrix = torch.zeros(bins, size, dtype=dtype, device=device)
    for i in range(bins):
        start, end = (i * size) // bins, -((-(i + 1) * size) // bins)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class PyramidPooling(nn.Module):
    """PSPNet's head: the map pooled to 1x1, 2x2, 3x3 and 6x6 grids, upsampled, concatenated, classified."""

    def __init__(self, channels: int, num_classes: int, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        branch = max(channels // len(bins), 1)
        self.stages = nn.ModuleList(
            nn.Sequential(GridPool(b), nn.Conv2d(channels, branch, 1, bias=False),
                          nn.BatchNorm2d(branch), nn.ReLU(inplace=True)) for b in bins
        )
        mid = max(channels // 4, 64)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(channels + branch * len(bins), mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(mid, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class TimmSegmenter(nn.Module):
    """A timm ``features_only`` body, a head on its last stage and an auxiliary FCN head on the one before.

    The body is an attribute named ``backbone`` so its layers keep timm's names under ``backbone.``
    (``backbone.layer4`` for a ResNet): that is where feature discovery finds the stage to distil.
    """

    def __init__(self, head: str, body: str, num_classes: int, *, in_chans: int = 3, output_stride: int = 8,
                 aux: bool = True) -> None:
        super().__init__()
        self.backbone = _dilated_body(body, in_chans, output_stride)
        channels = self.backbone.feature_info.channels()
        self.head = PyramidPooling(channels[-1], num_classes) if head == "pspnet" else \
            DeepLabHead(channels[-1], num_classes)
        self.aux = FCNHead(channels[-2], num_classes) if aux else None
        self.num_classes = num_classes
        self.cwkd_name = f"{head}_{body}"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        before_last, last = self.backbone(x)
        result = {"out": F.interpolate(self.head(last), size=size, mode="bilinear", align_corners=False)}
        if self.aux is not None:
            result["aux"] = F.interpolate(self.aux(before_last), size=size, mode="bilinear", align_corners=False)
        return result


def _dilated_body(name: str, in_chans: int, output_stride: int) -> nn.Module:
    """The body's last two stages at ``output_stride`` (dilated), or at its own stride if it cannot dilate."""
    kwargs = dict(features_only=True, out_indices=(-2, -1), in_chans=in_chans, pretrained=False)
    try:
        return timm.create_model(name, output_stride=output_stride, **kwargs)
    except (TypeError, AssertionError, ValueError, NotImplementedError):
        return timm.create_model(name, **kwargs)  # no dilation support: the head sees stride 32


def is_segmentation_name(name: str) -> bool:
    """Whether ``name`` is a segmentation model cwkd builds (torchvision's, or ``<head>_<timm name>``)."""
    head, _, body = name.partition("_")
    return name in TORCHVISION_MODELS or (head in TIMM_HEADS and bool(body))


def backbone_origin(name: str) -> str | Callable[..., nn.Module]:
    """Where the backbone (``model.backbone``) of model ``name`` has ImageNet weights: its timm body's name, or
    the torchvision builder (whose ``weights_backbone`` default names them).

    Example:
        >>> backbone_origin("pspnet_resnet18")
        'resnet18'
    """
    return getattr(tv_seg, name) if name in TORCHVISION_MODELS else name.partition("_")[2]


def create_segmentation_model(name: str, num_classes: int, *, in_chans: int = 3, aux: bool = True) -> nn.Module:
    """A segmentation model by name, with random weights (load a checkpoint to start from trained ones)."""
    if num_classes < 1:
        raise ConfigError(f"a segmentation model needs at least one class, got {num_classes}")
    if name in TORCHVISION_MODELS:
        if in_chans != 3:
            raise ConfigError(f"{name} (torchvision) takes 3 input channels, not {in_chans}; use a "
                              f"timm-backbone model such as pspnet_resnet18, or 3-channel images")
        kwargs = {"aux_loss": aux} if not name.startswith("lraspp") else {}
        model = getattr(tv_seg, name)(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        model.cwkd_name = name
        return model
    head, _, body = name.partition("_")
    if head not in TIMM_HEADS or not body:
        raise ModelNotFoundError(
            f"unknown segmentation model '{name}'; use one of {', '.join(TORCHVISION_MODELS)}, or "
            f"pspnet_<timm name> / deeplabv3_<timm name> such as pspnet_resnet18"
        )
    if body not in timm.list_models():
        raise ModelNotFoundError(f"'{body}' in '{name}' is not a timm model; list them with "
                                 "`python -c \"import timm; print(timm.list_models('*resnet*'))\"`")
    return TimmSegmenter(head, body, num_classes, in_chans=in_chans, aux=aux)
