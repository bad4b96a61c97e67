"""What ``cwkd inspect`` reports: a model's hookable layers, or a proposed teacher/student pairing."""

from __future__ import annotations

from torch import nn

from cwkd.aligner import Method, aligner_macs, build_aligner
from cwkd.config import check_sizes
from cwkd.features import LayerInfo, as_size, probe
from cwkd.models import create_model, default_input_size, model_name
from cwkd.pairing import pair_layers


def _model(model: str | nn.Module, in_chans: int | None) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    return create_model(model, in_chans=in_chans or 3)


def _size(model: nn.Module, input_size: int | None, in_chans: int | None) -> tuple[int, int, int]:
    default = default_input_size(model)
    return as_size(input_size or default[1:], in_chans or default[0])


def inspect_model(model: str | nn.Module, *, input_size: int | None = None,
                  in_chans: int | None = None) -> tuple[list[LayerInfo], tuple[int, int, int]]:
    """Probe a model (randomly initialised: shapes need no weights); return its layers and input size.

    Example:
        >>> layers, size = inspect_model("test_resnet")
        >>> [(l.name, l.channels, l.reduction) for l in layers if l.is_stage][-1]
        ('layer4', 96, 32)
    """
    check_sizes(input_size=input_size, in_chans=in_chans)  # 0 is refused, not taken as "the default"
    module = _model(model, in_chans)
    size = _size(module, input_size, in_chans)
    return probe(module, size), size


def propose_pairs(teacher: str | nn.Module, student: str | nn.Module, *, pairs: str = "last",
                  method: Method | str = Method.cwt, hidden: int | None = None,
                  input_size: int | None = None, in_chans: int | None = None) -> dict:
    """The pairs cwkd would distil, with aligner parameters and extra FLOPs per image.

    Example:
        >>> report = propose_pairs("test_resnet", "test_efficientnet")
        >>> report["pairs"][0]["teacher"]
        'layer4'
    """
    method = Method(method)
    check_sizes(hidden=hidden, input_size=input_size, in_chans=in_chans)
    t_model, s_model = _model(teacher, in_chans), _model(student, in_chans)
    size = _size(s_model, input_size, in_chans)
    t_layers, s_layers = probe(t_model, size), probe(s_model, size)
    found = pair_layers(s_layers, t_layers, pairs, student_label=model_name(s_model),
                        teacher_label=model_name(t_model))
    rows, total_params, total_macs = [], 0, 0
    for pair in found:
        s, t = pair.student, pair.teacher
        params = 0 if method is Method.none else sum(
            p.numel() for p in build_aligner(method, s.channels, t.channels, hidden).parameters())
        macs = aligner_macs(method, s.channels, t.channels, s.height, s.width, hidden)
        total_params, total_macs = total_params + params, total_macs + macs
        rows.append({**pair.to_dict(), "aligner_params": params, "extra_flops": 2 * macs})
    return {
        "teacher": model_name(t_model), "student": model_name(s_model), "input_size": list(size),
        "method": method.value, "hidden": hidden, "pairs": rows,
        "aligner_params": total_params, "extra_flops_per_image": 2 * total_macs,
        "student_params": sum(p.numel() for p in s_model.parameters()),
    }
