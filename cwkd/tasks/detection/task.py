"""Object detection and instance segmentation: torchvision detectors, COCO data, COCO AP.

Models come from :mod:`cwkd.tasks.detection.models` (torchvision's, or Faster R-CNN / RetinaNet / Mask R-CNN heads on a
timm body), data from :mod:`cwkd.tasks.detection.data` (COCO 2017 or cwkd's composited layout), scores from
:mod:`cwkd.tasks.detection.metric` (pycocotools, the ``cwkd[detection]`` extra). A training step calls the detector
with its targets, and its loss dict is the task loss. Features are the FPN outputs, one aligner per
level both detectors have at one stride (:class:`cwkd.tasks.detection.fpn.FPNTaps`): the teacher's backbone + FPN
runs on the student's own transformed, padded batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import Dataset

from cwkd.choices import ExportFormat, MgdMask, Optimizer, Task
from cwkd.data.spec import DataSpec
from cwkd.data.transforms import DataConfig, Transformed
from cwkd.errors import ConfigError, ModelNotFoundError
from cwkd.files.checkpoint import read_state_dict
from cwkd.files.weights import load_state_checked
from cwkd.tasks.base import ExportIO, Scorer, TaskSpec
from cwkd.tasks.bodies import start_body
from cwkd.tasks.detection.data import DetectionTransform, collate_detection, load_coco
from cwkd.tasks.detection.fpn import FPNTaps, normalization
from cwkd.tasks.detection.models import backbone_origin, create_detection_model, detection_task, list_detection_models

#: Classes (background included) a model is built with when no data set says (only shapes matter, e.g. inspect).
DEFAULT_CLASSES = 2
#: Largest default input size: larger images are resized to this unless --input-size says otherwise.
MAX_DEFAULT_SIZE = 800


def _detections_io(outputs: tuple[str, ...]) -> ExportIO:
    """One image in, any size; per detection a box, label, score (and mask) out, as many as the model finds."""
    shapes = {"boxes": "[N, 4] (x1, y1, x2, y2 in input pixels)", "labels": "[N] int64", "scores": "[N]",
              "masks": "[N, 1, height, width] (probabilities)"}
    axes = {name: {0: "detections"} for name in outputs}
    if "masks" in outputs:
        axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    return ExportIO("images", outputs, ", ".join(f"'{name}' {shapes[name]}" for name in outputs),
                    {"images": {2: "height", 3: "width"}, **axes}, batch=1,
                    values="RGB in 0-1, any height and width: the graph resizes and normalises it", rows_unordered=True)


class Detection(TaskSpec):
    """Boxes and classes on COCO-style data; the best checkpoint has the best COCO box AP."""

    name = Task.detection
    best_metric = "box_ap"
    metrics = {"box_ap": "box AP", "box_ap50": "box AP50"}
    export_io = _detections_io(("boxes", "labels", "scores"))
    ddp_find_unused = True
    steady_shapes = False  # proposals, objects and masks differ per batch: glibc's own policy keeps memory flat
    collate = staticmethod(collate_detection)
    # cwkd's SGD 0.05 diverges on a detector trained from scratch. torchvision's reference recipe uses 0.02 for 16
    # images (0.00125 per image, from pretrained backbones); on the tests' tiny Mask R-CNN from scratch 0.01 and
    # 0.02 still blew up at batch 2, 0.005 trained. A larger batch may take more (docs/detection.md).
    default_lr = {Optimizer.sgd: 0.005, Optimizer.adamw: 1e-4}
    #: Whether the data set's masks are loaded and mask AP is scored.
    masks = False
    # TorchScript: a timm body rarely scripts, and tracing would fix the number of detections.
    refused_exports = {ExportFormat.torchscript: "use --format onnx (one image in; boxes, labels and scores out) or "
                                                 "safetensors"}

    def load_data(self, data: str, *, root: str | None = None, download: bool = False,
                  skip_corrupt: bool = False) -> DataSpec:
        """A COCO-style folder (:func:`cwkd.tasks.detection.data.load_coco`); class 0 is the background, as
        detectors count.

        Checks first that pycocotools (COCO AP) is installed, so a run never trains an epoch it cannot score.
        """
        from cwkd.tasks.detection.metric import _pycocotools

        _pycocotools()
        coco = load_coco(data, masks=self.masks)
        first = coco.train.records[0]
        native = max(int(first.get("width", 0)), int(first.get("height", 0))) or None
        return DataSpec(str(data), coco.train, coco.val, ["background", *coco.classes], channels=3,
                        native_size=native)

    def resolve_name(self, name: str) -> str:
        """A detector name: torchvision's, or ``fasterrcnn_``/``retinanet_``/``maskrcnn_`` + a timm name."""
        if detection_task(name) is None:
            raise ModelNotFoundError(f"'{name}' is not a detection model; use one of "
                                     f"{', '.join(list_detection_models())}, such as fasterrcnn_resnet18")
        return name

    def build_model(self, name: str, *, num_classes: int | None = None, in_chans: int = 3,
                    pretrained: bool = False, weights: str | None = None, new_head: bool = False,
                    input_size: int | None = None, backbone_weights: str | None = None) -> nn.Module:
        """A detector by name (:func:`cwkd.tasks.detection.models.create_detection_model`), resizing its input
        to ``input_size``.

        ``new_head`` marks the run's student, which must do this task (a teacher may be any detector);
        ``pretrained`` / ``backbone_weights`` start its body from ImageNet's or a classifier's weights
        (:func:`cwkd.tasks.bodies.start_body`); the FPN and heads stay fresh, the body's BatchNorm trainable.
        """
        found = detection_task(self.resolve_name(name))
        if new_head and found != self.name.value:
            raise ConfigError(f"'{name}' is a model for the {found} task but this run is {self.name.value}; pass "
                              f"--task {found}, or pick a {self.name.value} student")
        classes = num_classes or DEFAULT_CLASSES
        model = create_detection_model(name, classes, input_size=input_size, in_chans=in_chans)
        if weights is None and (pretrained or backbone_weights):  # whole-model weights need no backbone start
            model.cwkd_body = start_body(model.backbone.body, backbone_origin(name), in_chans=in_chans,
                                         pretrained=pretrained, weights=backbone_weights)
        model.num_classes = classes
        mean, std = normalization(model)
        size = model.transform.min_size[-1]
        # What data_config() and default_input_size() read: the detector's own resize and statistics.
        model.pretrained_cfg = {"input_size": (3, size, size), "mean": tuple(mean.flatten().tolist()),
                                "std": tuple(std.flatten().tolist()), "interpolation": "bilinear", "crop_pct": 1.0}
        if weights is not None:
            load_state_checked(model, read_state_dict(weights), f"the weights in {weights}",
                               hint=f"they are not {name}'s with {classes} classes (background included)")
        return model

    def default_input_size(self, spec: DataSpec) -> int | None:
        """The data's own image size (its first training image's longer side), at most 800 px."""
        return min(spec.native_size or MAX_DEFAULT_SIZE, MAX_DEFAULT_SIZE)

    def datasets(self, spec: DataSpec, dcfg: DataConfig) -> tuple[Dataset, Dataset]:
        """Images (0-1, the detector normalises and resizes them itself) with boxes and masks flipped and scaled."""
        return (Transformed(spec.train, DetectionTransform(train=True)),
                Transformed(spec.val, DetectionTransform(train=False)))

    def batch_to(self, batch, device: torch.device, memory_format: torch.memory_format) -> tuple:
        """The list of images and the list of target dicts on ``device``."""
        images, targets = batch
        return ([image.to(device, non_blocking=True) for image in images],
                [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                 for t in targets])

    def forward(self, model: nn.Module, inputs, targets):
        """The detector's loss dict in train mode (it needs the targets), its detections otherwise."""
        if model.training and targets is not None:
            return model(inputs, targets)
        return model(inputs)

    def loss(self, outputs: dict[str, torch.Tensor], targets, *, label_smoothing: float = 0.0) -> dict:
        """The sum of the detector's own losses, and each of them (``loss_classifier``, ``loss_box_reg``, ...)."""
        return {"task_loss": sum(outputs.values()), **{k: v.detach() for k, v in outputs.items()}}

    def scorer(self, loader, device: torch.device) -> Scorer:
        """COCO AP (percent; ``per_class``: AP per class) and the loss per image
        (:class:`~cwkd.tasks.detection.metric.DetectionScorer`)."""
        from cwkd.tasks.detection.metric import DetectionScorer

        return DetectionScorer(loader.dataset, device, masks=self.masks)

    def chance(self, num_classes: int) -> float:
        """AP near 0: a detector that finds (almost) nothing."""
        return 1.0

    @contextmanager
    def as_taught(self, teacher: nn.Module, student: nn.Module, teacher_input: nn.Module | None) -> Iterator[nn.Module]:
        """The teacher resizing as the student does: its backbone sees the student's resized batch, renormalised to
        its own statistics (:func:`cwkd.tasks.detection.fpn.teacher_backbone_features`), as its own transform does
        here."""
        mine, theirs = teacher.transform, student.transform
        saved = mine.min_size, mine.max_size
        mine.min_size, mine.max_size = theirs.min_size, theirs.max_size
        try:
            yield teacher
        finally:
            mine.min_size, mine.max_size = saved

    def feature_prefix(self, model: nn.Module) -> str:
        """The backbone (body + FPN)."""
        return "backbone."

    def feature_taps(self, teacher: nn.Module, student: nn.Module, input_size: tuple[int, int, int],
                     pairs) -> FPNTaps:
        """Every FPN level both detectors have at one stride, the teacher's run on the student's batch."""
        if not (isinstance(pairs, str) and pairs in ("last", "all")):
            raise ConfigError(f"--pairs {pairs}: detectors pair their FPN levels by stride, every level both have; "
                              "drop --pairs (see them with `cwkd inspect --teacher T --student S`)")
        return FPNTaps(teacher, student, input_size)

    def mgd_defaults(self, model: str) -> tuple[MgdMask, float]:
        """MGD's det/configs/distillers/mgd/: Faster and Mask R-CNN students mask 45 % of the positions, RetinaNet
        65 %."""
        return (MgdMask.pixel, 0.65) if model.startswith("retinanet") else (MgdMask.pixel, 0.45)

    def export_model(self, model: nn.Module) -> nn.Module:
        """The detector as a graph of one image ``[1, 3, H, W]`` (RGB, 0-1, any size) in and its detections out."""
        return _OneImage(model, self.export_io.outputs).train(model.training)


class Instance(Detection):
    """Boxes, classes and a mask per object; the best checkpoint has the best COCO mask AP."""

    name = Task.instance
    best_metric = "mask_ap"
    metrics = {"mask_ap": "mask AP", "box_ap": "box AP"}
    export_io = _detections_io(("boxes", "labels", "scores", "masks"))
    masks = True


class _OneImage(nn.Module):
    """``model([images[0]])``'s detections as a tuple of tensors (``outputs``): what an ONNX graph returns."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        found = self.model([images[0]])[0]
        return tuple(found[name] for name in self.outputs)
