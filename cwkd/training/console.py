"""What a run prints: rich progress bars on a terminal, plain lines in CI and pipes, nothing when quiet."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class RunConsole:
    """Progress and logging for one run. Only rank 0 of a distributed run should print."""

    def __init__(self, *, quiet: bool = False, enabled: bool = True, stream=None) -> None:
        self.enabled = enabled  # False on every rank but 0 of a distributed run: print nothing at all
        self.quiet = quiet or not enabled
        self.console = Console(file=stream or sys.stdout, highlight=False, soft_wrap=True)
        self.tty = self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._last_line = 0.0
        self._total = 0
        self._label = ""

    def info(self, message: str) -> None:
        """One line of information."""
        if not self.quiet:
            self.console.print(message)

    def warn(self, message: str) -> None:
        """A warning, printed even when quiet (by rank 0 only)."""
        if self.enabled:
            self.console.print(f"[yellow]warning:[/yellow] {message}")

    def start(self, label: str, total: int) -> None:
        """Begin a progress bar (or plain progress lines) over ``total`` steps."""
        self._total, self._label, self._last_line = total, label, time.monotonic()
        if self.quiet or not self.tty:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=20),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total, stats="")

    def advance(self, done: int, stats: dict[str, float]) -> None:
        """Report ``done`` steps finished, with running stats (loss parts, img/s)."""
        text = _format(stats)
        if self._progress is not None:
            self._progress.update(self._task, completed=done, stats=text)
        elif not self.quiet and time.monotonic() - self._last_line > 30:
            self._last_line = time.monotonic()
            self.console.print(f"{self._label} step {done}/{self._total} {text}")

    def stop(self) -> None:
        """End the current progress bar."""
        if self._progress is not None:
            self._progress.stop()
        self._progress, self._task = None, None

    def table(self, title: str, columns: Iterable[str], rows: Iterable[Iterable[object]]) -> None:
        """Print a small table (a summary or comparison)."""
        if self.quiet:
            return
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(v) for v in row))
        self.console.print(table)


def epoch_line(rec: dict, epochs: int, metrics: dict[str, str]) -> str:
    """An epoch's line from its metrics.jsonl record: train loss parts, val ``metrics`` (name: label), speed."""
    feat = f" feat {rec['train_feat_loss']:.4f}" if "train_feat_loss" in rec else ""
    kd = f" kd {rec['train_kd_loss']:.4f}" if "train_kd_loss" in rec else ""
    scores = " ".join(f"{label} {rec[f'val_{name}']:.2f}%" for name, label in metrics.items())
    return (f"epoch {rec['epoch']}/{epochs}  train loss {rec['train_loss']:.4f} (task "
            f"{rec['train_task_loss']:.4f}{feat}{kd})  val {scores} loss {rec['val_loss']:.4f}  "
            f"{rec['images_per_s']:.0f} img/s (data wait {100 * rec.get('data_wait', 0):.0f}%) "
            f"{rec['epoch_s']:.1f}s")


def _format(stats: dict[str, float]) -> str:
    parts = []
    for key, value in stats.items():
        parts.append(f"{key} {value:.0f}" if key.endswith("/s") else f"{key} {value:.4g}")
    return "  ".join(parts)
