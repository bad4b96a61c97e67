"""Rich tables for ``cwkd inspect``."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from cwkd.features import LayerInfo


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def print_layers(model: str, layers: list[LayerInfo], size: tuple[int, int, int], *, all_layers: bool = False,
                 console: Console | None = None) -> None:
    """A table of feature-map layers: name, type, shape, channels, reduction, stage, parameters."""
    console = console or Console()
    shown = [layer for layer in layers if all_layers or layer.is_stage or layer.name.count(".") <= 1]
    table = Table(title=f"{model} at input {size[0]}x{size[1]}x{size[2]}: hookable layers")
    for column, justify in (("layer", "left"), ("type", "left"), ("output shape", "left"),
                            ("channels", "right"), ("reduction", "right"), ("stage", "center"),
                            ("params", "right")):
        table.add_column(column, justify=justify)
    for layer in shown:
        table.add_row(layer.name, layer.type, "x".join(str(v) for v in layer.shape), str(layer.channels),
                      str(layer.reduction), "stage" if layer.is_stage else "", _count(layer.params))
    console.print(table)
    hidden = len(layers) - len(shown)
    note = f"; {hidden} deeper layers hidden (--all lists them)" if hidden else ""
    console.print(f"{len(shown)} layers shown{note}. Stages are what --pairs last/all pair by reduction.")


def print_pairs(report: dict, console: Console | None = None) -> None:
    """The proposed pairs with aligner parameters and extra FLOPs."""
    console = console or Console()
    size = report["input_size"]
    table = Table(title=f"{report['student']} -> {report['teacher']} at {size[0]}x{size[1]}x{size[2]} "
                        f"({report['method']} aligner)")
    for column in ("student layer", "teacher layer", "reduction", "aligner params", "extra FLOPs/img"):
        table.add_column(column, overflow="fold")
    for row in report["pairs"]:
        resize = " (resized)" if row["resize"] else ""
        table.add_row(
            f"{row['student']} {'x'.join(map(str, row['student_shape']))}",
            f"{row['teacher']} {'x'.join(map(str, row['teacher_shape']))}{resize}",
            str(row["reduction"]), _count(row["aligner_params"]), _count(row["extra_flops"]),
        )
    console.print(table)
    console.print(
        f"aligners: {_count(report['aligner_params'])} parameters (training only, dropped on export), "
        f"{_count(report['extra_flops_per_image'])} FLOPs per image; student: "
        f"{_count(report['student_params'])} parameters"
    )
