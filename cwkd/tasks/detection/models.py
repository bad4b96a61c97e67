"""Detection and instance-segmentation models by name: torchvision's builders, and the same heads on any timm body.

- ``fasterrcnn_resnet50_fpn``, ``retinanet_resnet50_fpn_v2``, ``maskrcnn_resnet50_fpn``, ...: torchvision's
  builders, always with ``weights=None, weights_backbone=None`` (nothing downloads unasked; the task can start
  the body, ``model.backbone.body``, from ImageNet's or a classifier's weights: :func:`backbone_origin`);
- ``fasterrcnn_<timm name>``, ``retinanet_<timm name>``, ``maskrcnn_<timm name>`` (e.g. ``fasterrcnn_resnet18``,
  ``maskrcnn_resnet50``): a timm ``features_only`` body feeding torchvision's ``FeaturePyramidNetwork``
  (256 channels), then torchvision's ``FasterRCNN`` / ``RetinaNet`` / ``MaskRCNN``. R-CNNs take the body's
  last 4 stages (strides 4-32) as levels ``'0'..'3'`` plus a max-pooled ``'pool'`` (64), as torchvision's
  ``resnet_fpn_backbone`` does; RetinaNet its last 3 (8-32) as ``'0'..'2'`` plus ``'p6'``, ``'p7'`` made from P5.

Classes: every model gets ``num_classes = K + 1`` for a data set of K classes, labels ``1..K``, 0 being
background. The R-CNNs need that slot; torchvision's RetinaNet has no background class (a sigmoid per
class) but uses the same convention for COCO (``num_classes=91``, labels are category ids), so label 0 is
simply a class no box ever has, and teacher and student of any kind share one label space.

Every model is a torchvision detector: ``model(images)`` takes a list of 0-1 ``(3, H, W)`` tensors and
returns a loss dict in train mode (``model(images, targets)``) and one detection dict per image in eval
mode. ``input_size`` sets the detector's own resize (``min_size=N``, ``max_size`` ``N * 1333 // 800``,
torchvision's ratio), so CPU runs at 96-192 px are practical.

Example:
    >>> model = create_detection_model("fasterrcnn_test_resnet", num_classes=11, input_size=96)
    >>> model.eval()(list(torch.rand(2, 3, 96, 96)))[0].keys()
    dict_keys(['boxes', 'labels', 'scores'])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import timm
import torch
from torch import nn
from torchvision.models import detection as tv_det
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from cwkd.errors import ConfigError, ModelNotFoundError

#: torchvision's detection builders cwkd builds by name.
TORCHVISION_DETECTORS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
                         "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")
#: torchvision's instance-segmentation builders cwkd builds by name.
TORCHVISION_INSTANCE = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")
#: The two tasks a detector does (the values of the task layer's ``Task`` enum, once it has them).
DETECTION, INSTANCE = "detection", "instance"
#: Heads cwkd puts on a timm body: ``<head>_<timm name>``, and the task each one does.
TIMM_HEADS = {"fasterrcnn": DETECTION, "retinanet": DETECTION, "maskrcnn": INSTANCE}
#: Channels of every FPN level (torchvision's choice).
FPN_CHANNELS = 256
#: torchvision's default ``max_size / min_size`` (1333 / 800), kept when ``input_size`` sets the resize.
_MAX_OVER_MIN = 1333 / 800
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: At most this ``input_size``, an R-CNN keeps fewer proposals and samples fewer ROIs (:func:`_small_input`).
SMALL_INPUT = 320


class TimmFPNBackbone(nn.Module):
    """A timm ``features_only`` body and an FPN, in the shape torchvision's detectors want.

    ``forward`` returns an ``OrderedDict`` of 256-channel maps, ``'0'..'3'`` and ``'pool'`` (R-CNN) or
    ``'0'..'2'``, ``'p6'`` and ``'p7'`` (RetinaNet); ``out_channels`` is 256. The body and the FPN are
    attributes ``body`` and ``fpn`` as in torchvision's ``BackboneWithFPN``, so layer names read alike.
    """

    def __init__(self, name: str, *, levels: int, extra: str) -> None:
        super().__init__()
        self.body = _features_body(name, levels)
        in_channels = self.body.feature_info.channels()
        top = LastLevelMaxPool() if extra == "pool" else LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS)
        self.fpn = FeaturePyramidNetwork(in_channels, FPN_CHANNELS, extra_blocks=top)
        self.out_channels = FPN_CHANNELS

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def _features_body(name: str, levels: int) -> nn.Module:
    """The last ``levels`` stages of timm's ``name``, or all of them when it has fewer (test bodies may)."""
    try:
        return timm.create_model(name, features_only=True, pretrained=False,
                                 out_indices=tuple(range(-levels, 0)))
    except (IndexError, AssertionError, ValueError):
        return timm.create_model(name, features_only=True, pretrained=False)


def detection_task(name: str) -> str | None:
    """``"detection"`` or ``"instance"`` (masks too) for a detector name cwkd builds, else ``None``.

    Example:
        >>> detection_task("maskrcnn_resnet18"), detection_task("fasterrcnn_resnet18"), detection_task("resnet18")
        ('instance', 'detection', None)
    """
    if name in TORCHVISION_DETECTORS:
        return DETECTION
    if name in TORCHVISION_INSTANCE:
        return INSTANCE
    head, _, body = name.partition("_")
    return TIMM_HEADS.get(head) if body else None


def list_detection_models(task: str | None = None) -> list[str]:
    """torchvision's detector names cwkd builds (of ``task`` when given), then the timm-body patterns."""
    names = [n for n in (*TORCHVISION_DETECTORS, *TORCHVISION_INSTANCE) if task in (None, detection_task(n))]
    return names + [f"{head}_<timm name>" for head, t in TIMM_HEADS.items() if task in (None, t)]


def backbone_origin(name: str) -> str | Callable[..., nn.Module]:
    """Where the body (``model.backbone.body``) of detector ``name`` has ImageNet weights: its timm body's name,
    or the torchvision builder (whose ``weights_backbone`` default names them).

    Example:
        >>> backbone_origin("maskrcnn_resnet50")
        'resnet50'
    """
    if name in TORCHVISION_DETECTORS or name in TORCHVISION_INSTANCE:
        return getattr(tv_det, name)
    return name.partition("_")[2]


def create_detection_model(name: str, num_classes: int, *, input_size: int | None = None,
                           in_chans: int = 3) -> nn.Module:
    """A detector by name with random weights, for ``num_classes`` including background (data classes + 1).

    ``input_size`` sets the resize (``min_size`` N, ``max_size`` N x 1333/800); ``None`` keeps the
    builder's own (800/1333, or 320/640 for the ``_320_`` MobileNet).
    """
    if num_classes < 2:
        raise ConfigError(f"a detector needs background plus at least one class (num_classes >= 2), got "
                          f"{num_classes}")
    if in_chans != 3:
        raise ConfigError(f"detectors take 3-channel images, not {in_chans}; convert the images to RGB")
    if input_size is not None and input_size < 32:
        raise ConfigError(f"--input-size {input_size} is too small for a detector; use 32 or more (e.g. 128)")
    size = {} if input_size is None else {"min_size": input_size,
                                          "max_size": max(input_size, round(input_size * _MAX_OVER_MIN))}
    if input_size is not None and not name.startswith("retinanet"):
        size.update(_small_input(input_size))
    if name in TORCHVISION_DETECTORS or name in TORCHVISION_INSTANCE:
        model = getattr(tv_det, name)(weights=None, weights_backbone=None, num_classes=num_classes, **size)
    else:
        model = _timm_detector(name, num_classes, size)
    model.cwkd_name = name
    return model


def _small_input(input_size: int) -> dict[str, int]:
    """R-CNN proposal and ROI-sampling counts for small images (none above :data:`SMALL_INPUT`).

    torchvision's defaults are made for 800 px images: 2000 proposals per image and 512 sampled ROIs per
    image through the box head. At 128 px they make a CPU train step 1.8-2.5x slower for images with a handful
    of objects (benchmarks/roi_sampling.py, batch 8, two cores: maskrcnn_resnet18 12.3 s -> 6.8 s,
    maskrcnn_resnet50 11.8 s -> 4.7 s). Test time takes torchvision's own
    low-resolution setting (``fasterrcnn_mobilenet_v3_large_320_fpn``: 150 proposals); training keeps 1000
    before and 500 after NMS and samples 128 ROIs per image (a quarter positive, as before).
    """
    if input_size > SMALL_INPUT:
        return {}
    return {"rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 500, "rpn_pre_nms_top_n_test": 150,
            "rpn_post_nms_top_n_test": 150, "box_batch_size_per_image": 128}


def _timm_detector(name: str, num_classes: int, size: dict) -> nn.Module:
    head, _, body = name.partition("_")
    if head not in TIMM_HEADS or not body:
        raise ModelNotFoundError(
            f"unknown detection model '{name}'; use one of {', '.join(TORCHVISION_DETECTORS + TORCHVISION_INSTANCE)}, "
            "or fasterrcnn_/retinanet_/maskrcnn_<timm name> such as fasterrcnn_resnet18"
        )
    if body not in timm.list_models():
        raise ModelNotFoundError(f"'{body}' in '{name}' is not a timm model; list them with "
                                 "`python -c \"import timm; print(timm.list_models('*resnet*'))\"`")
    retina = head == "retinanet"
    backbone = TimmFPNBackbone(body, levels=3 if retina else 4, extra="p6p7" if retina else "pool")
    mean, std = _timm_normalization(backbone.body)
    kwargs = dict(num_classes=num_classes, image_mean=mean, image_std=std, **size)
    if retina:
        return tv_det.RetinaNet(backbone, **kwargs)
    return (tv_det.MaskRCNN if head == "maskrcnn" else tv_det.FasterRCNN)(backbone, **kwargs)


def _timm_normalization(body: nn.Module) -> tuple[list[float], list[float]]:
    """The mean/std the timm body was made for (its pretrained config), ImageNet's when it has none."""
    cfg = getattr(body, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", _IMAGENET[0]), cfg.get("std", _IMAGENET[1])
    return [float(m) for m in mean], [float(s) for s in std]
