"""Rich tables for ``cwkd inspect``, ``cwkd eval`` and ``cwkd compare``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cwkd.core.features import LayerInfo
from cwkd.tasks import get_task

if TYPE_CHECKING:
    from cwkd.compare import Comparison, Group
    from cwkd.evaluation import EvalResult


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


_MATRIX_MAX = 20  # a confusion matrix wider than this does not fit a terminal; --json has it whole


def print_eval(result: EvalResult, console: Console | None = None) -> None:
    """The summary table, then (when measured) per-class scores and a classifier's confusion matrix."""
    console = console or Console(highlight=False, soft_wrap=True)
    labels = get_task(result.task).metrics
    table = Table(title=escape(f"cwkd eval: {result.model} on {result.data} ({result.split})"))
    for column in (*(labels[k] for k in result.scores), "loss", "images", "images/s", "device", "precision"):
        table.add_column(column, justify="right")
    table.add_row(*(f"{v:.2f}%" for v in result.scores.values()), f"{result.loss:.4f}", str(result.images),
                  f"{result.images_per_s:.0f}", result.device, result.precision)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", style="yellow", markup=False)
    if result.per_class is not None and result.confusion is None:
        _print_scores(result.per_class, {"iou": "IoU", **labels}, console)
    if result.per_class is not None and result.confusion is not None:
        _print_accuracy(result.per_class, result.confusion, console)


def _print_accuracy(rows: list[dict], confusion: list[list[int]], console: Console) -> None:
    """Per-class top-1 of a classifier, then its confusion matrix when it fits a terminal."""
    table = Table(title="per-class accuracy")
    for column in ("#", "class", "images", "correct", "top-1"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for i, row in enumerate(rows):
        top1 = "-" if row["top1"] is None else f"{row['top1']:.2f}%"
        table.add_row(str(i), escape(row["class"]), str(row["images"]), str(row["correct"]), top1)
    console.print(table)
    if len(confusion) > _MATRIX_MAX:
        console.print(f"confusion matrix: {len(confusion)} classes is too wide to print; use --json")
        return
    table = Table(title="confusion matrix (rows: true class, columns: predicted)")
    table.add_column("true \\ pred", justify="right")
    for i in range(len(confusion)):
        table.add_column(str(i), justify="right")
    for i, row in enumerate(confusion):
        table.add_row(str(i), *(str(v) for v in row))
    console.print(table)


def _print_scores(rows: list[dict], labels: dict[str, str], console: Console) -> None:
    """Per-class scores in percent (a segmenter's IoU, a detector's AP); ``-`` for a class not scored."""
    keys = [k for k in rows[0] if k != "class"] if rows else []
    table = Table(title="per-class " + ", ".join(labels.get(k, k) for k in keys))
    for column in ("#", "class", *(labels.get(k, k) for k in keys)):
        table.add_column(column, justify="left" if column == "class" else "right")
    for i, row in enumerate(rows):
        table.add_row(str(i), escape(row["class"]), *("-" if row[k] is None else f"{row[k]:.2f}%" for k in keys))
    console.print(table)


def print_comparison(result: Comparison, console: Console | None = None, title: str | None = None) -> None:
    """One row per setting (runs that differ only in seed: mean ± std over n), and the paired difference
    of the last epoch's metric against the baseline run of the same seed with its 95 % t-interval."""
    console = console or Console(highlight=False, soft_wrap=True)
    paired = any(g.paired or g.is_baseline for g in result.groups)
    label = result.label
    columns = ["run", "model", "teacher", "method", "alpha", "pairs", "seed", "n", "best", "final", "epochs",
               "img/s", *(["vs baseline (95% CI)"] if paired else [])]
    rows = [_comparison_row(group, paired) for group in result.groups]
    # A setting every row shares goes into the title, not a column: twelve columns fold every cell at 80 wide.
    shared = {i for i, column in enumerate(columns) if 0 < i < 8 and len(rows) > 1 and len({r[i] for r in rows}) == 1}
    heading = title or f"cwkd compare: val {label} (%), {result.task}"
    if shared:
        heading += " — " + ", ".join(f"{columns[i]} {rows[0][i]}" for i in sorted(shared))
    table = Table(title=escape(heading))
    for i, column in enumerate(columns):
        if i not in shared:
            table.add_column(column, justify="right" if i >= 6 else "left", overflow="fold",
                             min_width=8 if i in (0, 1, 2, 5) else 14 if i == 12 else None)
    for row in rows:
        table.add_row(*(escape(str(cell)) for i, cell in enumerate(row) if i not in shared))
    console.print(table)


def _comparison_row(group: Group, paired: bool) -> list[str]:
    first, runs = group.runs[0], group.runs
    name = ", ".join(r.path.name for r in runs) + (" (baseline)" if group.is_baseline else "")
    epochs = {f"{r.epochs}/{r.planned_epochs}" if r.epochs < r.planned_epochs else str(r.epochs) for r in runs}
    row = [name, first.model, first.teacher, first.method, first.alpha, first.pairs,
           ", ".join(str(r.seed) for r in runs), str(len(runs)), _spread(group.values("best")),
           _spread(group.values("final")), ", ".join(sorted(epochs)), _spread(group.values("images_per_s"), digits=0)]
    if paired:
        row.append("" if group.is_baseline else _paired_cell(group))
    return row


def _spread(values: list[float], digits: int = 2) -> str:
    """``82.10`` for one value, ``82.10 ± 0.35`` (mean ± sample std) for several, ``-`` for none."""
    from cwkd.compare import mean_std

    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _paired_cell(group: Group) -> str:
    p = group.paired
    if p is None:
        return "no baseline run of these seeds"
    if p.low is None:
        return f"{p.mean:+.2f} (1 pair: no interval)"
    return f"{p.mean:+.2f} [{p.low:+.2f}, {p.high:+.2f}] ({len(p.diffs)} pairs)"
