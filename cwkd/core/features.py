"""Feature discovery: probe a model with one dummy forward pass and describe every hookable layer.

Shapes are read from the model, never typed in: channels and reduction come from the recorded
outputs, and stages come from timm's ``feature_info`` where the model has one.

A reduction is the *nominal* stride (4, 8, 16, 32, ...), not ``input / map``: at 176 px a stride-32
stage is 6x6 in a ResNet (padded convs round up) and 5x5 in a ConvNeXt (2x2 patch convs round down),
and both are reduction 32, so they pair; the distiller resizes one map onto the other.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cwkd.errors import LayerError

#: Modules whose 4-D output is a pooled vector, not a feature map.
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity)


@dataclass(frozen=True)
class LayerInfo:
    """One hookable layer: its output as a feature map ``(channels, height, width)``.

    ``layout`` says how the raw output is laid out: ``nchw``, ``nhwc`` or ``nlc`` (tokens, with
    ``prefix_tokens`` class/register tokens in front of an ``height x width`` grid).
    """

    name: str
    type: str
    shape: tuple[int, ...]
    channels: int
    height: int
    width: int
    reduction: int
    layout: str
    prefix_tokens: int
    is_stage: bool
    params: int
    order: int

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def as_size(input_size: int | Iterable[int] | None, in_chans: int = 3) -> tuple[int, int, int]:
    """Normalise ``224``, ``(224, 224)`` or ``(3, 224, 224)`` to ``(C, H, W)``."""
    if input_size is None:
        return (in_chans, 224, 224)
    if isinstance(input_size, int):
        return (in_chans, input_size, input_size)
    size = tuple(int(v) for v in input_size)
    if len(size) == 2:
        return (in_chans, *size)
    if len(size) == 3:
        return size  # type: ignore[return-value]
    raise LayerError(f"input size {input_size!r} is not H, (H, W) or (C, H, W)")


def probe(model: nn.Module, input_size: int | Iterable[int] | None = None, *, within: str = "") -> list[LayerInfo]:
    """Run one dummy forward pass and return every layer whose output is a feature map.

    ``within`` (e.g. ``"backbone."``) keeps only the layers under that submodule, with stages from its
    own ``feature_info``: a segmentation model's head is then never taken for a stage.

    Hooks are removed afterwards and the model's train/eval mode is put back as it was.

    Example:
        >>> import timm
        >>> layers = probe(timm.create_model("test_resnet"), 160)
        >>> [layer.name for layer in layers if layer.is_stage][-1]
        'layer4'
    """
    c, h, w = as_size(input_size)
    records: list[tuple[str, nn.Module, torch.Tensor]] = []

    def make_hook(name: str, module: nn.Module):
        def hook(_mod, _inp, out):
            if isinstance(out, torch.Tensor):
                records.append((name, module, out.detach()))
        return hook

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    named = [(n, m) for n, m in model.named_modules() if n and n.startswith(within)]
    with _restore_mode(model), torch.no_grad():
        model.eval()
        handles = [m.register_forward_hook(make_hook(n, m)) for n, m in named]
        try:
            model(torch.zeros(1, c, h, w, device=device))
        except Exception as exc:
            raise LayerError(
                f"a probe forward pass at input size {(c, h, w)} failed ({type(exc).__name__}: {exc}); "
                "pass the input size the model expects (--input-size, --in-chans)"
            ) from exc
        finally:
            for handle in handles:
                handle.remove()
    part = model.get_submodule(within.rstrip(".")) if within else model
    stage_names = [within + n for n in _timm_stage_names(part)]
    timm_stages = {within + n: v for n, v in _timm_stages(part).items()}
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    layers: list[LayerInfo] = []
    seen: set[str] = set()
    for order, (name, module, out) in enumerate(records):
        if name in seen:  # a module called twice keeps its first output
            continue
        seen.add(name)
        info = _describe(name, module, out, (h, w), prefix, timm_stages.get(name), order)
        if info is not None:
            layers.append(info)
    return _mark_stages(layers, stage_names)


def _describe(
    name: str, module: nn.Module, out: torch.Tensor, hw: tuple[int, int], prefix: int,
    stage: tuple[int, int] | None, order: int,
) -> LayerInfo | None:
    """Turn one recorded output into a :class:`LayerInfo`, or ``None`` if it is not a map.

    ``stage`` is timm's ``(channels, reduction)`` for a ``feature_info`` module, else ``None``.
    """
    if out.shape[0] != 1:  # batch of one in, so anything else is internal (windows, heads)
        return None
    if isinstance(module, _POOLS) and out.dim() == 4 and out.shape[-1] == out.shape[-2] == 1:
        return None
    if out.dim() == 4:
        tokens = 0
        found = _map_layout(out, hw, stage)
        if found is None:
            return None
        layout, (ch, fh, fw), reduction = found
    elif out.dim() == 3:
        grid = _token_grid(out.shape[1], hw, prefix)
        if grid is None:
            return None
        layout, tokens, (fh, fw), ch = "nlc", grid[0], grid[1], out.shape[2]
        reduction = stage[1] if stage else _reduction(hw[0], fh)
        if reduction is None:
            return None
    else:
        return None
    params = sum(p.numel() for p in module.parameters())
    return LayerInfo(
        name=name, type=type(module).__name__, shape=tuple(out.shape[1:]), channels=int(ch),
        height=int(fh), width=int(fw), reduction=reduction, layout=layout, prefix_tokens=tokens,
        is_stage=False, params=params, order=order,
    )


def _token_grid(n: int, hw: tuple[int, int], prefix: int) -> tuple[int, tuple[int, int]] | None:
    """Find ``(prefix, (gh, gw))`` so that ``n - prefix`` tokens form the input's grid."""
    for k in dict.fromkeys([prefix, 0, 1, 2, 4, 5, 8]):
        m = n - k
        if m <= 0:
            continue
        side = math.isqrt(m * hw[1] // hw[0]) if hw[0] else 0
        for gw in (side, side + 1):
            if gw and m % gw == 0:
                gh = m // gw
                if hw[0] % gh == 0 and hw[1] % gw == 0 and hw[0] // gh == hw[1] // gw:
                    return k, (gh, gw)
    return None


def _map_layout(out: torch.Tensor, hw: tuple[int, int], stage: tuple[int, int] | None):
    """Read a 4-D output as NCHW, or else NHWC: the one whose grid matches the input's aspect.

    A timm stage (``stage`` is its ``(channels, reduction)``) is read by its channel count and keeps
    timm's nominal reduction.
    """
    a, b, c = (int(v) for v in out.shape[1:])
    candidates = [("nchw", (a, b, c)), ("nhwc", (c, a, b))]
    for layout, (ch, fh, fw) in candidates:
        if stage is not None and ch == stage[0]:
            return layout, (ch, fh, fw), stage[1]
    for layout, (ch, fh, fw) in candidates:
        red_h, red_w = _reduction(hw[0], fh), _reduction(hw[1], fw)
        if red_h is not None and red_h == red_w:
            return layout, (ch, fh, fw), red_h
    return None


def _reduction(size: int, feat: int) -> int | None:
    """The nominal stride from input to feature map: the power of two whose map is ``feat`` within a pixel.

    224 -> 7 gives 32, and so do 176 -> 6 and 176 -> 5 (strided layers round odd sizes up or down).
    Other exact strides stay (a patch-14 ViT: 224 -> 16 gives 14). ``None``: not a map of this input.
    """
    if feat <= 0 or feat > size:
        return None
    power = 2 ** round(math.log2(size / feat))
    if abs(feat - size / power) <= 1:
        return power
    return size // feat if size % feat == 0 else None


def _timm_feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if hasattr(info, "get_dicts"):  # a features_only body's FeatureInfo: its chosen stages
        info = info.get_dicts()
    if isinstance(info, list) and all(isinstance(i, dict) and "module" in i for i in info):
        return info
    return []


def _timm_stage_names(model: nn.Module) -> list[str]:
    return [i["module"] for i in _timm_feature_info(model)]


def _timm_stages(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module: (channels, nominal reduction)}`` from timm's ``feature_info``."""
    return {i["module"]: (int(i["num_chs"]), int(i["reduction"])) for i in _timm_feature_info(model)
            if "num_chs" in i and "reduction" in i}


def _mark_stages(layers: list[LayerInfo], stage_names: list[str]) -> list[LayerInfo]:
    """Mark timm's ``feature_info`` modules as stages, or else the last layer at each reduction."""
    by_name = {layer.name: layer for layer in layers}
    stages = [n for n in stage_names if n in by_name]
    if not stages:
        last: dict[int, LayerInfo] = {}
        for layer in sorted(layers, key=lambda x: x.order):
            last[layer.reduction] = layer
        stages = [layer.name for layer in last.values()]
    chosen = set(stages)
    return [
        LayerInfo(**{**layer.to_dict(), "is_stage": layer.name in chosen}) for layer in layers
    ]


def stages(layers: list[LayerInfo]) -> list[LayerInfo]:
    """The stage layers, in execution order."""
    return sorted((layer for layer in layers if layer.is_stage), key=lambda x: x.order)


def find_layer(layers: list[LayerInfo], name: str, model_label: str) -> LayerInfo:
    """Look a layer up by name, with an error that says how to list the names."""
    for layer in layers:
        if layer.name == name:
            return layer
    close = [layer.name for layer in layers if name in layer.name or layer.name in name][:5]
    hint = f" (close: {', '.join(close)})" if close else ""
    raise LayerError(
        f"layer '{name}' is not a feature-map layer of {model_label}{hint}; "
        f"run `cwkd inspect {model_label}` to list its layers"
    )


def to_map(out: torch.Tensor, layer: LayerInfo) -> torch.Tensor:
    """Turn a raw layer output into a ``(B, C, H, W)`` feature map using its recorded layout."""
    if layer.layout == "nchw":
        return out
    if layer.layout == "nhwc":
        return out.permute(0, 3, 1, 2)
    grid = out[:, layer.prefix_tokens:, :]
    return grid.transpose(1, 2).reshape(out.shape[0], layer.channels, layer.height, layer.width)


class FeatureHooks:
    """Forward hooks that keep the outputs of named layers until they are read.

    Use as a context manager; :meth:`pop` returns the captured outputs and clears the buffer,
    so no feature tensor outlives the step that made it.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.model = model
        self.names = list(dict.fromkeys(names))
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> FeatureHooks:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        """Register the hooks (idempotent)."""
        if self._handles:
            return
        modules = dict(self.model.named_modules())
        for name in self.names:
            if name not in modules:
                raise LayerError(f"layer '{name}' is not in the model")
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        """Remove the hooks and drop anything still buffered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _hook(self, name: str):
        def hook(_mod, _inp, out):
            self._outputs[name] = out
        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """Return the captured outputs and clear the buffer."""
        outputs, self._outputs = self._outputs, {}
        return outputs

    def __len__(self) -> int:
        return len(self._outputs)


@contextlib.contextmanager
def _restore_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule back in the train/eval mode it had."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode
