"""Weights files: what looks like a path, timm's pretrained weights from the hub, and loading a state dict
into a model with an error that says what does not fit."""

from __future__ import annotations

import os
import socket
import urllib.parse

import timm
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


_OFFLINE_HINT = ("offline, pass a local weights file instead (--weights / --teacher-weights FILE, safetensors "
                 "or .pth), or set HF_HUB_OFFLINE=1 to use weights already in the Hugging Face cache")


def fetch_pretrained(timm_name: str, *, offline_hint: str = _OFFLINE_HINT, **kwargs) -> nn.Module:
    """timm's ``timm_name`` with its pretrained weights from the hub; unreachable is one CheckpointError.

    ``offline_hint`` ends the message: the local route for the option that asked (``kwargs`` go to timm).
    """
    _require_hub(timm_name, offline_hint)
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as exc:  # network, missing weights, hub errors: all mean "not reachable"
        raise CheckpointError(
            f"could not fetch pretrained weights for '{timm_name}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'}); {offline_hint}"
        ) from exc


def _require_hub(timm_name: str, offline_hint: str = _OFFLINE_HINT) -> None:
    """Fail at once, not after a minute of retries, when the hub's name does not even resolve."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return  # huggingface_hub then reads its local cache only, and fails fast by itself
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise CheckpointError(
            f"pretrained weights for '{timm_name}' come from the Hugging Face hub, and {host} cannot be "
            f"resolved from this machine (no network?); {offline_hint}"
        ) from exc
