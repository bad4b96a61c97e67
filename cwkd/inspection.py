"""What ``cwkd inspect`` reports: a model's hookable layers, or a proposed teacher/student pairing."""

from __future__ import annotations

from torch import nn

from cwkd.choices import check_sizes
from cwkd.core.aligner import Method, aligner_macs, build_aligner
from cwkd.core.features import LayerInfo, as_size, probe
from cwkd.core.modelinfo import default_input_size, model_name
from cwkd.core.pairing import pair_layers
from cwkd.tasks import Task, get_task, infer_task
from cwkd.tasks.base import TaskSpec


def _model(model: str | nn.Module, in_chans: int | None, task: TaskSpec, input_size: int | None = None) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    return task.build_model(model, in_chans=in_chans or 3, input_size=input_size)


def _name(model: str | nn.Module) -> str:
    return model if isinstance(model, str) else model_name(model)


def _size(model: nn.Module, input_size: int | None, in_chans: int | None) -> tuple[int, int, int]:
    default = default_input_size(model)
    return as_size(input_size or default[1:], in_chans or default[0])


def inspect_model(model: str | nn.Module, *, input_size: int | None = None, in_chans: int | None = None,
                  task: Task | str | None = None) -> tuple[list[LayerInfo], tuple[int, int, int]]:
    """Probe a model (randomly initialised: shapes need no weights); return its layers and input size.

    ``task`` (default: inferred from the name) says how to build a model given by name.

    Example:
        >>> layers, size = inspect_model("test_resnet")
        >>> [(l.name, l.channels, l.reduction) for l in layers if l.is_stage][-1]
        ('layer4', 96, 32)
    """
    check_sizes(input_size=input_size, in_chans=in_chans)  # 0 is refused, not taken as "the default"
    spec = get_task(infer_task(_name(model), task))
    module = _model(model, in_chans, spec, input_size)
    size = _size(module, input_size, in_chans)
    taps = spec.feature_taps(module, module, size, "all")  # a detector paired with itself: its FPN levels
    return ([pair.student for pair in taps.pairs] if taps is not None else probe(module, size)), size


def propose_pairs(teacher: str | nn.Module, student: str | nn.Module, *, pairs: str = "last",
                  method: Method | str = Method.cwt, hidden: int | None = None,
                  input_size: int | None = None, in_chans: int | None = None,
                  task: Task | str | None = None) -> dict:
    """The pairs cwkd would distil, with aligner parameters and extra FLOPs per image.

    ``task`` (default: inferred from the names) builds the models and says where stages are found
    (a segmentation model's backbone, never its head).

    Example:
        >>> report = propose_pairs("test_resnet", "test_efficientnet")
        >>> report["pairs"][0]["teacher"]
        'layer4'
    """
    method = Method(method)
    check_sizes(hidden=hidden, input_size=input_size, in_chans=in_chans)
    spec = get_task(infer_task(_name(student), task, other=_name(teacher)))
    t_model, s_model = (_model(m, in_chans, spec, input_size) for m in (teacher, student))
    size = _size(s_model, input_size, in_chans)
    taps = spec.feature_taps(t_model, s_model, size, pairs)  # a detector's FPN levels, paired by stride
    if taps is not None:
        found = taps.pairs
    else:
        within = spec.feature_prefix(s_model) if pairs in ("last", "all") else ""
        t_layers, s_layers = probe(t_model, size, within=within), probe(s_model, size, within=within)
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
