"""cwkd: channel-wise feature knowledge distillation.

A small student learns to mimic a large teacher's feature maps through a learnable
``1x1 conv -> ReLU -> 1x1 conv`` transform on the student side, with an L2 loss:
``loss = task loss + alpha * feature loss``.

The public names load on first use (PEP 562), so ``import cwkd`` and ``cwkd --help`` do not pay
for torch and timm until something needs them.

Example:
    >>> import cwkd
    >>> teacher = cwkd.create_model("test_resnet", num_classes=10)
    >>> student = cwkd.create_model("test_efficientnet", num_classes=10)
    >>> distiller = cwkd.FeatureDistiller(teacher, student, alpha=1.0)
"""

import importlib as _importlib

__version__ = "0.1.0"

#: Where each public name lives: ``cwkd.NAME`` imports ``cwkd.<module>`` on first use.
_SOURCES = {
    "cwkd.core.aligner": ["build_aligner"],
    "cwkd.core.autoalpha": ["AutoAlpha", "pick_alpha"],
    "cwkd.choices": ["Method", "Optimizer", "Precision", "Reduction"],
    "cwkd.training.config": ["TrainConfig"],
    "cwkd.core.distiller": ["FeatureDistiller", "Renormalize"],
    "cwkd.compare": ["compare_runs"],
    "cwkd.errors": ["CheckpointError", "ConfigError", "CwkdError", "DataError", "ExportError", "LayerError",
                    "ModelNotFoundError", "PairingError", "TrainingError"],
    "cwkd.evaluation": ["evaluate_checkpoint", "load_student"],
    "cwkd.export": ["export_student"],
    "cwkd.core.features": ["FeatureHooks", "LayerInfo", "probe"],
    "cwkd.inspection": ["inspect_model", "propose_pairs"],
    "cwkd.core.losses": ["convert_alpha", "feature_loss", "kd_loss"],
    "cwkd.tasks.classification.models": ["create_model"],
    "cwkd.core.pairing": ["Pair", "pair_layers"],
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = sorted([*_MODULE_OF, "__version__"])


def __getattr__(name: str):
    """Import a public name's module on first use, and keep the name for the next lookup."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'cwkd' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

