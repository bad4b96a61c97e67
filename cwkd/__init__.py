"""cwkd: channel-wise feature knowledge distillation.

A small student learns to mimic a large teacher's feature maps through a learnable
``1x1 conv -> ReLU -> 1x1 conv`` transform on the student side, with an L2 loss:
``loss = task loss + alpha * feature loss``.

Example:
    >>> import cwkd
    >>> teacher = cwkd.create_model("test_resnet", num_classes=10)
    >>> student = cwkd.create_model("test_efficientnet", num_classes=10)
    >>> distiller = cwkd.FeatureDistiller(teacher, student, alpha=1.0)
"""

__version__ = "0.1.0"

from cwkd.aligner import Method, build_aligner
from cwkd.config import Optimizer, Precision, TrainConfig
from cwkd.distiller import FeatureDistiller, Renormalize
from cwkd.errors import (
    CheckpointError,
    ConfigError,
    CwkdError,
    DataError,
    ExportError,
    LayerError,
    ModelNotFoundError,
    PairingError,
    TrainingError,
)
from cwkd.evaluation import evaluate_checkpoint, load_student
from cwkd.export import export_student
from cwkd.features import FeatureHooks, LayerInfo, probe
from cwkd.inspection import inspect_model, propose_pairs
from cwkd.losses import Reduction, convert_alpha, feature_loss, kd_loss
from cwkd.models import create_model
from cwkd.pairing import Pair, pair_layers

__all__ = [
    "CheckpointError", "ConfigError", "CwkdError", "DataError", "ExportError", "FeatureDistiller", "Renormalize",
    "FeatureHooks", "LayerError", "LayerInfo", "Method", "ModelNotFoundError", "Optimizer", "Pair",
    "PairingError", "Precision", "Reduction", "TrainConfig", "TrainingError", "__version__", "build_aligner",
    "convert_alpha", "create_model", "evaluate_checkpoint", "export_student", "feature_loss", "inspect_model",
    "kd_loss", "load_student", "pair_layers", "probe", "propose_pairs",
]
