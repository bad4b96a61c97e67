"""Semantic segmentation: one label per pixel, cross-entropy ignoring 255, mIoU.

Models come from :mod:`cwkd.tasks.segmentation.models` (torchvision's, or a PSPNet/DeepLabV3 head on a timm
body), data from :mod:`cwkd.tasks.segmentation.data` (VOC-style or plain folders), scores from
:mod:`cwkd.tasks.segmentation.metric`. Features are distilled
from the backbone (``backbone.``): ``--pairs last`` is its last stage, at 1/8 of the input when dilated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from cwkd.choices import MgdMask, Task
from cwkd.data.spec import DataSpec
from cwkd.data.transforms import DataConfig, Transformed
from cwkd.errors import ModelNotFoundError
from cwkd.files.checkpoint import read_state_dict
from cwkd.files.weights import load_state_checked
from cwkd.tasks.base import ExportIO, TaskSpec
from cwkd.tasks.bodies import start_body
from cwkd.tasks.segmentation.data import IGNORE_INDEX, JointTransform, load_segmentation
from cwkd.tasks.segmentation.metric import SegmentationScorer
from cwkd.tasks.segmentation.models import (
    TORCHVISION_MODELS,
    backbone_origin,
    create_segmentation_model,
    is_segmentation_name,
)

#: Weight of the auxiliary head's loss (PSPNet's 0.4).
AUX_WEIGHT = 0.4
#: Largest default training crop: larger images train at this size unless --input-size says otherwise.
MAX_DEFAULT_SIZE = 512
#: Classes a model is built with when no data set says (only shapes matter then, e.g. `cwkd inspect`).
DEFAULT_CLASSES = 21


class Segmentation(TaskSpec):
    """Semantic segmentation on VOC-style or ``images/ + masks/`` folders; the best checkpoint has the best mIoU."""

    name = Task.segmentation
    best_metric = "miou"
    metrics = {"miou": "mIoU", "pixel_acc": "pixel acc"}
    export_io = ExportIO.batched("input", "out", "[batch, classes, height, width]")

    def load_data(self, data: str, *, root: str | None = None, download: bool = False,
                  skip_corrupt: bool = False) -> DataSpec:
        """A segmentation folder (:func:`cwkd.tasks.segmentation.data.load_segmentation`), 3-channel, sized by
        its first image."""
        seg = load_segmentation(data)
        with Image.open(seg.train.pairs[0][0]) as first:
            native = max(first.size)
        return DataSpec(str(data), seg.train, seg.val, seg.classes, channels=3, native_size=native)

    def resolve_name(self, name: str) -> str:
        """A segmentation model name (torchvision's, or ``pspnet_``/``deeplabv3_`` + a timm name)."""
        if not is_segmentation_name(name):
            raise ModelNotFoundError(f"'{name}' is not a segmentation model; use one of "
                                     f"{', '.join(TORCHVISION_MODELS)}, or pspnet_<timm name> / "
                                     "deeplabv3_<timm name> such as pspnet_resnet18")
        return name

    def build_model(self, name: str, *, num_classes: int | None = None, in_chans: int = 3,
                    pretrained: bool = False, weights: str | None = None, new_head: bool = False,
                    input_size: int | None = None, backbone_weights: str | None = None) -> nn.Module:
        """A segmentation model by name (:func:`cwkd.tasks.segmentation.models.create_segmentation_model`),
        from ``weights`` if given.

        ``pretrained`` / ``backbone_weights`` start its backbone (not needed when ``weights`` has the whole model).
        """
        model = create_segmentation_model(name, num_classes or DEFAULT_CLASSES, in_chans=in_chans)
        if weights is None and (pretrained or backbone_weights):  # whole-model weights need no backbone start
            model.cwkd_body = start_body(model.backbone, backbone_origin(name), in_chans=in_chans,
                                         pretrained=pretrained, weights=backbone_weights)
        model.num_classes = num_classes or DEFAULT_CLASSES
        if weights is not None:
            load_state_checked(model, read_state_dict(weights), f"the weights in {weights}",
                               hint=f"they are not {name}'s with {model.num_classes} classes")
        return model

    def default_input_size(self, spec: DataSpec) -> int | None:
        """The data's own image size (its first training image's longer side), at most 512 px."""
        return min(spec.native_size or MAX_DEFAULT_SIZE, MAX_DEFAULT_SIZE)

    def datasets(self, spec: DataSpec, dcfg: DataConfig) -> tuple[Dataset, Dataset]:
        """Image and mask through one :class:`~cwkd.tasks.segmentation.data.JointTransform` (random scale, crop,
        flip)."""
        chans, size, _ = dcfg.input_size
        return tuple(Transformed(split, JointTransform(size, dcfg.mean, dcfg.std, train=train, channels=chans))
                     for split, train in ((spec.train, True), (spec.val, False)))  # type: ignore[return-value]

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor, *,
             label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
        """Cross-entropy over labelled pixels on ``out``, plus 0.4 x the same on ``aux`` where the model has one."""
        def ce(logits: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX,
                                   label_smoothing=label_smoothing)

        main = ce(outputs["out"])
        if "aux" not in outputs:
            return {"task_loss": main}
        aux = ce(outputs["aux"])
        return {"task_loss": main + AUX_WEIGHT * aux, "out_loss": main.detach(), "aux_loss": aux.detach()}

    def logits(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``out`` logits (classes on dim 1, at the input's size): pixel-wise logit KD matches them."""
        return outputs["out"]

    def kd_positions(self, targets: torch.Tensor) -> torch.Tensor:
        """The labelled pixels: those marked 255 (ignore) take no logit KD, as they take no cross-entropy."""
        return targets != IGNORE_INDEX

    def scorer(self, loader, device: torch.device) -> SegmentationScorer:
        """mIoU and pixel accuracy (percent), per-class IoU (``iou``) and mean cross-entropy per labelled pixel."""
        return SegmentationScorer(device)

    def mgd_defaults(self, model: str) -> tuple[MgdMask, float]:
        """75 % of the positions masked, as MGD's
        seg/configs/distillers/mgd/psp_r101_distill_psp_r18_40k_512x512_city.py."""
        return MgdMask.pixel, 0.75

    def chance(self, num_classes: int) -> float:
        """The most mIoU predicting one class everywhere can reach: that class's IoU at most 100 %, the rest 0."""
        return 100.0 / num_classes

    def feature_prefix(self, model: nn.Module) -> str:
        """The backbone: the head's layers are never paired by ``--pairs last``/``all``."""
        return "backbone." if isinstance(getattr(model, "backbone", None), nn.Module) else ""

    def export_model(self, model: nn.Module) -> nn.Module:
        """The model returning its ``out`` logits alone, as a tensor, in the model's own train/eval mode.

        The mode matters: the ONNX exporter puts the module it was given back into that module's mode
        afterwards, and a wrapper left in train mode would switch the model's BatchNorm to batch statistics.
        """
        return _OutOnly(model).train(model.training)


class _OutOnly(nn.Module):
    """``model(x)["out"]``: one output tensor, what ONNX and TorchScript graphs return."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]
