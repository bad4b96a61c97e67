"""Image classification: one label per image, cross-entropy, top-1 and top-5."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

from cwkd.choices import Task
from cwkd.core.losses import cross_entropy
from cwkd.data.spec import DataSpec
from cwkd.data.transforms import DataConfig, transformed_datasets
from cwkd.errors import ConfigError
from cwkd.tasks.base import ExportIO, TaskSpec
from cwkd.tasks.classification.data import load_data
from cwkd.tasks.classification.metric import ClassificationScorer, Confusion
from cwkd.tasks.classification.models import create_model, resolve_name


class Classification(TaskSpec):
    """timm classifiers on image folders and the named data sets; the best checkpoint has the best top-1."""

    name = Task.classification
    best_metric = "top1"
    metrics = {"top1": "top-1", "top5": "top-5"}
    export_io = ExportIO.batched("input", "logits", "[batch, classes]")
    timm_models = True

    def load_data(self, data: str, *, root: str | None = None, download: bool = False,
                  skip_corrupt: bool = False) -> DataSpec:
        """A named data set or an ImageFolder (:func:`cwkd.tasks.classification.data.load_data`)."""
        return load_data(data, root=root, download=download, skip_corrupt=skip_corrupt)

    def resolve_name(self, name: str) -> str:
        """A timm name (aliases such as mobilenetv1 allowed)."""
        return resolve_name(name)

    def build_model(self, name: str, *, num_classes: int | None = None, in_chans: int = 3,
                    pretrained: bool = False, weights: str | None = None, new_head: bool = False,
                    input_size: int | None = None, backbone_weights: str | None = None) -> nn.Module:
        """A timm model with its classifier sized to ``num_classes``
        (:func:`cwkd.tasks.classification.models.create_model`)."""
        if backbone_weights is not None:
            raise ConfigError(f"--backbone-weights {backbone_weights}: a classifier has no separate backbone; start "
                              "it from the file with --weights (--student-weights for `cwkd distill`), which "
                              "replaces a classifier for other classes")
        return create_model(name, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained,
                            weights=weights, new_head=new_head)

    def default_input_size(self, spec: DataSpec) -> int | None:
        """Small native images (28 px, 32 px) train at the next multiple of 32; folders at the model's own size."""
        return None if spec.native_size is None else 32 * math.ceil(spec.native_size / 32)

    def datasets(self, spec: DataSpec, dcfg: DataConfig) -> tuple[Dataset, Dataset]:
        """Images through the model's timm transform (random crops and flips for training)."""
        return transformed_datasets(spec, dcfg)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, *,
             label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
        """Cross-entropy, with label smoothing."""
        return cross_entropy(outputs, targets, label_smoothing=label_smoothing)

    def per_class_counter(self, num_classes: int) -> Confusion:
        """Counts of (true, predicted) classes, recorded while :meth:`evaluate` runs."""
        return Confusion(num_classes)

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """A classifier's output is its logits."""
        return outputs

    def scorer(self, loader, device: torch.device) -> ClassificationScorer:
        """Top-1, top-5 (percent) and mean cross-entropy."""
        return ClassificationScorer(device)
