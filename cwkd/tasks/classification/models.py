"""Classifiers: timm models by name, friendly aliases, and their weights from a local file."""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from cwkd.errors import ModelNotFoundError
from cwkd.files.weights import _strip_prefixes, fetch_pretrained, load_state_checked, looks_like_path

#: Friendly names users type, mapped to the timm model they mean.
ALIASES: dict[str, str] = {
    "mobilenetv1": "mobilenetv1_100",
    "mobilenet_v1": "mobilenetv1_100",
    "mobilenetv2": "mobilenetv2_100",
    "mobilenet_v2": "mobilenetv2_100",
    "mobilenetv3": "mobilenetv3_large_100",
    "mobilenetv3_small": "mobilenetv3_small_100",
    "mobilenetv3_large": "mobilenetv3_large_100",
    "efficientnet": "efficientnet_b0",
    "vit": "vit_small_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}


def _not_a_name(value: str) -> str:
    """Why a path given where a model name belongs cannot be used, and what to pass instead."""
    path = Path(value).expanduser()
    if path.is_dir():
        return (f"{value} is a directory, not a model name; pass a timm model name, or a checkpoint file in it "
                f"(e.g. {path / 'best.safetensors'}) to --teacher")
    if not path.exists():
        return f"file {value} does not exist (a path is never taken as a model name); check the path"
    return (f"{value} is a file, not a model name; pass the timm model name and give the file as --weights, "
            "--student-weights or --teacher-weights (a cwkd checkpoint goes to --teacher)")


def resolve_name(name: str) -> str:
    """Return the timm name for ``name``, following :data:`ALIASES`.

    Raises :class:`ModelNotFoundError` with the closest timm names when neither knows it, and says
    what is wrong when ``name`` is a path (see :func:`looks_like_path`), which is never looked up.

    Example:
        >>> resolve_name("mobilenetv1")
        'mobilenetv1_100'
    """
    if looks_like_path(name):
        raise ModelNotFoundError(_not_a_name(name))
    resolved = ALIASES.get(name.lower(), name)
    if timm.is_model(resolved):
        return resolved
    known = list(ALIASES) + timm.list_models()
    close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "."
    raise ModelNotFoundError(
        f"unknown model '{name}'{hint} List timm's models with "
        "`python -c \"import timm; print(timm.list_models('*resnet*'))\"`"
    )


def is_model_name(value: str) -> bool:
    """True when timm knows ``value`` (or the alias it stands for) as a model; paths never are."""
    return not looks_like_path(value) and timm.is_model(ALIASES.get(value.lower(), value))


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_chans: int = 3,
    pretrained: bool = False,
    weights: str | Path | None = None,
    new_head: bool = False,
) -> nn.Module:
    """Build a timm model by name (aliases allowed), randomly initialised unless asked otherwise.

    ``pretrained`` fetches timm's weights from the hub; ``weights`` loads a local safetensors or
    ``.pth`` file instead (the offline route). The classifier is sized to ``num_classes``;
    ``new_head`` lets ``weights`` come with another classifier (see :func:`load_weights`).

    Example:
        >>> model = create_model("test_resnet", num_classes=10, in_chans=1)
    """
    timm_name = resolve_name(name)
    kwargs: dict = {"in_chans": in_chans}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if pretrained and weights is None:
        model = fetch_pretrained(timm_name, **kwargs)
    else:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    model.cwkd_name = timm_name  # remembered for checkpoints, exports and messages
    if weights is not None:
        load_weights(model, weights, new_head=new_head)
    return model


def load_weights(model: nn.Module, path: str | Path, *, new_head: bool = False) -> None:
    """Load a safetensors or ``.pth``/``.pt`` state dict into ``model`` (never unpickling code).

    A state dict whose classifier does not match is an error that says so; so are missing keys.
    With ``new_head`` (fine-tuning, e.g. ImageNet weights for a 10-class student), a classifier of
    another size is left at its fresh initialisation instead, and 3-channel stem weights are
    summed for a 1-channel model, as timm does for its own pretrained weights.
    """
    from cwkd.files.checkpoint import read_state_dict

    state = read_state_dict(path)
    if new_head:
        state = _adapt_for_finetune(model, _strip_prefixes(state, model))
    load_state_checked(model, state, f"weights in {path}")


def _adapt_for_finetune(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    head = getattr(model, "pretrained_cfg", {}).get("classifier") or ""
    heads = (head,) if isinstance(head, str) else tuple(head)
    adapted = {}
    for key, value in state.items():
        target = own.get(key)
        if target is not None and target.shape != value.shape:
            if heads and any(key.startswith(h + ".") for h in heads if h):
                value = target.clone()  # a classifier for other classes: keep the fresh one
            elif value.dim() == 4 and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
                value = adapt_input_conv(target.shape[1], value)
        adapted[key] = value
    return adapted


def shape_of_weights(name: str, state: dict[str, torch.Tensor], in_chans: int) -> tuple[int | None, int | None]:
    """The classifier size and input channels ``state`` was saved with, for model ``name`` (None: it does not say).

    Example:
        >>> shape_of_weights("test_resnet", {"fc.weight": torch.zeros(7, 64)}, 3)  # doctest: +SKIP
        (7, None)
    """
    probe = create_model(name, in_chans=in_chans)
    state = _strip_prefixes(state, probe)
    head = probe.get_classifier() if hasattr(probe, "get_classifier") else None
    first_conv = next((m for m in probe.modules() if isinstance(m, nn.Conv2d)), None)
    return _size_in(probe, state, head, 0), _size_in(probe, state, first_conv, 1)


def _size_in(model: nn.Module, state: dict[str, torch.Tensor], module: nn.Module | None, dim: int) -> int | None:
    """Size ``dim`` of ``module.weight`` as ``state`` has it, if ``state`` has that tensor."""
    weight = getattr(module, "weight", None)
    key = next((k for k, p in model.named_parameters() if p is weight), None) if weight is not None else None
    return int(state[key].shape[dim]) if key in state and state[key].ndim > dim else None
