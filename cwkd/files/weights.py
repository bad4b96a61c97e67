"""Weights files: what looks like a path, and loading a state dict into a model with an error that says
what does not fit."""

from __future__ import annotations

import os

import torch
from torch import nn

from cwkd.errors import CheckpointError

#: File endings of weights and checkpoints: a value ending so is a path, never a model name.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def looks_like_path(value: str) -> bool:
    """True when ``value`` has a path separator or a weights-file ending (timm's ``hf-hub:`` names aside)."""
    if value.startswith(("hf-hub:", "hf_hub:")):
        return False
    return "/" in value or os.sep in value or value.lower().endswith(WEIGHT_SUFFIXES)


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """``model.load_state_dict(state)`` with an error naming ``source`` and what does not fit.

    Why: torch's own error is a long traceback listing every key; this one says what to check.
    """
    name = getattr(model, "cwkd_name", type(model).__name__)
    hint = hint or f"check that they are weights for {name} (model name, in_chans and number of classes)"
    state = _strip_prefixes(state, model)
    missing, unexpected = _compare_keys(model, state)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} do not fit {name}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); {hint}"
        )
    own = model.state_dict()
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{source} do not fit {name}: '{k}' has shape {tuple(state[k].shape)}, the model expects "
            f"{tuple(own[k].shape)}; {hint}"
        )
    model.load_state_dict(state)


def _strip_prefixes(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``module.`` from DDP, ``student.`` from cwkd) when the model has none."""
    own = set(model.state_dict())
    for prefix in ("module.", "student.", "model."):
        if not (set(state) & own) and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _compare_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = set(model.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)
