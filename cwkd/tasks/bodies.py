"""A dense model's body started from a classifier's weights: ImageNet's, or those in a local file.

Segmenters and detectors are a body (a timm ``features_only`` network, or torchvision's ResNet or
MobileNet trunk) under heads. :func:`start_body` gives the body the weights of a classifier of the
same architecture and leaves the heads at their fresh initialisation:

- ImageNet weights: timm's pretrained classifier for a timm body, the builder's ``weights_backbone``
  default for torchvision's (fetched only when asked, never at build time otherwise);
- a local file: a cwkd run checkpoint (its student), a ``cwkd export`` student file, or a plain
  state dict (``.safetensors``, or ``.pth``/``.pt`` read with ``torch.load(weights_only=True)``).

Tensors are matched by name, never by position. The names may differ by a wrapper prefix (``student.``,
``module.``, ``features.``, ``backbone.body.``, a timm feature wrapper's ``model.``) and by the ``_`` that
timm's feature wrappers put for a ``.`` (``stem_0`` for ``stem.0``). A stem convolution made for other
input channels is summed or repeated as timm does for its own weights. Fewer than :data:`MIN_MATCH` of
the body's tensors found means the weights are another architecture's, and they are refused.

The body keeps plain, trainable BatchNorm: torchvision's own fine-tuning recipe swaps in FrozenBatchNorm2d
and freezes the first layers when it downloads a backbone, but then a checkpoint would no longer load into
the model that ``cwkd eval``, ``cwkd export`` and a teacher checkpoint rebuild, which is the same for every
start.

Example:
    >>> from cwkd.tasks import get_task
    >>> task = get_task("segmentation")
    >>> model = task.build_model("pspnet_resnet18", num_classes=11, backbone_weights="r18.pth")  # doctest: +SKIP
    >>> print(model.cwkd_body.line())  # doctest: +SKIP
    backbone resnet18 from r18.pth: 120 of 120 body tensors loaded; skipped 2 not in the body (fc.weight, fc.bias); ...
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from timm.models import adapt_input_conv
from torch import nn

from cwkd.errors import CheckpointError
from cwkd.files.checkpoint import read_metadata, read_state_dict, student_state
from cwkd.files.metadata import RUN_FORMAT, STUDENT_FORMAT
from cwkd.files.weights import fetch_pretrained

#: The share of a body's tensors a weights file must have (by name and shape), or it is refused.
MIN_MATCH = 0.9
#: Where a body's ImageNet weights come from: a timm model name, or a torchvision builder.
Origin = str | Callable[..., nn.Module]

_OFFLINE_HINT = ("offline, pass a local file instead (--backbone-weights / --student-backbone-weights FILE: a "
                 "classification checkpoint, a `cwkd export` student or a timm state dict of the same body), or set "
                 "HF_HUB_OFFLINE=1 to use weights already in the Hugging Face cache")


@dataclass(frozen=True)
class BodyLoad:
    """What :func:`fit_body` loaded: counts of the body's tensors, and the names it could not use."""

    source: str                     # "ImageNet (timm)" or the file's path
    arch: str                       # the body's architecture
    matched: int                    # body tensors loaded (floating point; BatchNorm's counters are not counted)
    total: int
    source_arch: str | None = None  # the architecture the file says it holds, where it says
    adapted: tuple[str, ...] = ()   # stem weights summed or repeated to the body's input channels
    fresh: tuple[str, ...] = ()     # body tensors the weights lack: left at their initialisation
    skipped: tuple[str, ...] = ()   # tensors of the weights that are not the body's (the classifier)

    def line(self) -> str:
        """One line for the run's log."""
        text = f"backbone {self.arch} from {self.source}: {self.matched} of {self.total} body tensors loaded"
        if self.adapted:
            text += f", {len(self.adapted)} adapted to the input channels ({_some(self.adapted)})"
        if self.fresh:
            text += f"; {len(self.fresh)} left fresh ({_some(self.fresh)})"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} not in the body ({_some(self.skipped)})"
        return text + "; heads fresh"

    def to_dict(self) -> dict:
        """config.json's ``body``: the counts, and the names as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _some(names: tuple[str, ...], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f", ... {len(names) - shown} more" if len(names) > shown else "")


def start_body(body: nn.Module, origin: Origin, *, in_chans: int = 3, pretrained: bool = False,
               weights: str | Path | None = None) -> BodyLoad:
    """Load ``weights`` (a file), else ImageNet's weights for ``origin`` (``pretrained``), into ``body``."""
    arch = arch_name(origin)
    if weights is not None:
        state, source_arch = read_body_file(weights)
        return fit_body(body, state, source=str(weights), arch=arch, source_arch=source_arch)
    if not pretrained:
        raise ValueError("start_body needs weights or pretrained=True")
    state = imagenet_state(origin, in_chans)
    return fit_body(body, state, source=f"ImageNet ({'timm' if isinstance(origin, str) else 'torchvision'})",
                    arch=arch)


def arch_name(origin: Origin) -> str:
    """``resnet18`` for a timm body, ``torchvision resnet50`` for a torchvision builder's."""
    if isinstance(origin, str):
        return origin
    return f"torchvision {_weights_enum(origin).__name__.removesuffix('_Weights').lower()}"


def read_body_file(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a weights file and the architecture it names (a cwkd file's model), if it names one."""
    state = read_state_dict(path)
    raw = _safetensors_metadata(Path(path))
    if raw.get("format") == RUN_FORMAT:
        meta = read_metadata(path)
        return student_state(state) or state, meta.model
    if raw.get("format") == STUDENT_FORMAT:
        return state, raw.get("model")
    return state, None


def _safetensors_metadata(path: Path) -> dict:
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}  # read_state_dict already said what is wrong with a damaged file


def imagenet_state(origin: Origin, in_chans: int = 3) -> dict[str, torch.Tensor]:
    """ImageNet weights for a body: timm's pretrained classifier, or a torchvision builder's backbone default."""
    if isinstance(origin, str):
        return fetch_pretrained(origin, offline_hint=_OFFLINE_HINT, in_chans=in_chans).state_dict()
    default = inspect.signature(origin).parameters["weights_backbone"].default  # None for the _v2 detectors
    weights = default if default is not None else _weights_enum(origin).DEFAULT
    try:  # looked up at call time, so a test can stand in for the download
        return torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except Exception as exc:  # no network, a proxy, a damaged download: all mean "not here"
        file = weights.url.rsplit("/", 1)[-1]
        raise CheckpointError(
            f"could not fetch torchvision's {weights} for the backbone ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'}); offline, copy {file} into "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or pass --backbone-weights FILE"
        ) from exc


def _weights_enum(builder: Callable[..., nn.Module]) -> type:
    """The weights enum a torchvision builder's ``weights_backbone`` takes (``ResNet50_Weights``)."""
    hint = typing.get_type_hints(inspect.unwrap(builder))["weights_backbone"]
    return next(a for a in typing.get_args(hint) if a is not type(None))


def fit_body(body: nn.Module, state: dict[str, torch.Tensor], *, source: str, arch: str,
             source_arch: str | None = None) -> BodyLoad:
    """Load the tensors of ``state`` that are ``body``'s (matched by name); refuse another architecture's."""
    own = body.state_dict()
    pairs, prefix = match_keys(list(own), list(state))
    loaded, adapted = {}, []
    for key, src in pairs.items():
        value, target = state[src], own[key]
        if value.shape != target.shape and _is_stem(value, target):
            value, adapted = _adapt_stem(value, target.shape[1]).to(target.dtype), [*adapted, key]
        if value.shape == target.shape:
            loaded[key] = value
    counted = [k for k, v in own.items() if v.is_floating_point()]
    matched = sum(k in loaded for k in counted)
    if matched < MIN_MATCH * len(counted):
        raise CheckpointError(_refusal(source, arch, source_arch, matched, len(counted)))
    body.load_state_dict(loaded, strict=False)
    used = {pairs[k] for k in loaded}
    # What the weights hold beside the body, where the body came from (a classifier's fc; not a dense file's heads).
    skipped = tuple(k for k in state if k.startswith(prefix) and k not in used)
    return BodyLoad(source=source, arch=arch, matched=matched, total=len(counted), source_arch=source_arch,
                    adapted=tuple(adapted), fresh=tuple(k for k in counted if k not in loaded), skipped=skipped)


def _refusal(source: str, arch: str, source_arch: str | None, matched: int, total: int) -> str:
    theirs = f"they are {source_arch}'s" if source_arch else "they are another architecture's"
    return (f"the weights in {source} fit only {matched} of the {total} tensors of the {arch} backbone "
            f"({100 * matched / max(total, 1):.0f}%; at least {MIN_MATCH:.0%} must match by name and shape): "
            f"{theirs}; pass weights of a {arch} classifier (a `cwkd train --model {arch.split()[-1]}` checkpoint, "
            "its `cwkd export`, or a timm state dict), or pick the model whose backbone they are")


def _adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A stem convolution for ``in_chans`` inputs: a gray one repeated over them and scaled (the same response to
    a gray image given as RGB), an RGB one summed or repeated as timm adapts its own (``adapt_input_conv``)."""
    if weight.shape[1] == 1:
        return weight.float().repeat(1, in_chans, 1, 1) / in_chans
    try:
        return adapt_input_conv(in_chans, weight.float())
    except (NotImplementedError, AssertionError, RuntimeError):
        return weight  # no rule for these channels: the shapes still differ, so the tensor stays fresh


def _is_stem(value: torch.Tensor, target: torch.Tensor) -> bool:
    """A convolution that differs only in its input channels (a gray body for RGB input, or back)."""
    return value.dim() == 4 == target.dim() and value.shape[0] == target.shape[0] and \
        value.shape[2:] == target.shape[2:]


def match_keys(body_keys: list[str], source_keys: list[str]) -> tuple[dict[str, str], str]:
    """Body key -> source key by name, under the one wrapper prefix of the source that matches the most.

    Returns the pairs and that prefix. Example:
        >>> match_keys(["stem_0.weight", "layer1.bias"], ["student.stem.0.weight", "student.layer1.bias"])
        ({'stem_0.weight': 'student.stem.0.weight', 'layer1.bias': 'student.layer1.bias'}, 'student.')
    """
    best: tuple[dict[str, str], str] = ({}, "")
    for body_prefix in _prefixes(body_keys, len(body_keys)):  # a timm feature wrapper's `model.` on every key
        inner = [k for k in body_keys if k.startswith(body_prefix)]
        for prefix in _prefixes(source_keys, MIN_MATCH * len(inner)):
            found = _match_under(inner, source_keys, body_prefix, prefix)
            if len(found) > len(best[0]):
                best = found, prefix
    return best


def _prefixes(keys: list[str], at_least: float) -> list[str]:
    """``""`` and the leading paths (up to three names) that at least ``at_least`` of ``keys`` share."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")[:-1]
        for depth in range(1, min(3, len(parts)) + 1):
            prefix = ".".join(parts[:depth]) + "."
            counts[prefix] = counts.get(prefix, 0) + 1
    return ["", *sorted(p for p, n in counts.items() if n >= at_least)]


def _canon(key: str) -> str:
    """A name with timm's feature-wrapper ``_`` and torch's ``.`` made alike (``stem_0`` and ``stem.0``)."""
    return key.replace("_", ".")


def _match_under(body_keys: list[str], source_keys: list[str], body_prefix: str, prefix: str) -> dict[str, str]:
    inner = {k[len(prefix):]: k for k in source_keys if k.startswith(prefix)}
    canon: dict[str, str | None] = {}
    for name, key in inner.items():
        canon[_canon(name)] = None if _canon(name) in canon else key  # two names alike: match neither that way
    found = {}
    for key in body_keys:
        name = key[len(body_prefix):]
        src = inner.get(name) or canon.get(_canon(name))
        if src is not None:
            found[key] = src
    return found
