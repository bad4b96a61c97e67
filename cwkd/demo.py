"""``cwkd demo``: an offline, few-minute tour on the bundled Fashion-MNIST subset.

It trains a teacher, then a baseline student and a CWT student with the same budget, and
prints how they compare. Everything runs on the CPU from data shipped inside the package.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cwkd.config import TrainConfig
from cwkd.console import RunConsole
from cwkd.engine import RunResult, run


@dataclass(frozen=True)
class DemoPlan:
    """The demo's recipe: models, size and epochs."""

    teacher: str = "resnet18"
    student: str = "mobilenetv3_small_050"
    input_size: int = 32
    teacher_epochs: int = 6
    student_epochs: int = 6
    alpha: float = 5.0  # mean-MSE form; at 32 px the last stage is 1x1, so the map is a vector
    pairs: str = "last"


FULL = DemoPlan()
FAST = DemoPlan(teacher_epochs=1, student_epochs=1)


def run_demo(out: Path | str = Path("runs/demo"), *, fast: bool = False, seed: int = 0, workers: int = 2,
             console: RunConsole | None = None) -> dict[str, RunResult]:
    """Train teacher, baseline student and CWT student on ``fashion-mnist-mini``; print a comparison.

    Re-running replaces the demo's own runs under ``out``.

    Example:
        >>> results = run_demo("runs/demo", fast=True)  # doctest: +SKIP
        >>> results["cwt"].best_top1 > 0
        True
    """
    plan = FAST if fast else FULL
    out = Path(out)
    console = console or RunConsole()
    common = dict(data="fashion-mnist-mini", input_size=plan.input_size, seed=seed, workers=workers,
                  overwrite=True, quiet=console.quiet, device="auto")
    steps = [
        ("teacher", f"1/3 training the teacher ({plan.teacher}, {plan.teacher_epochs} epochs)",
         TrainConfig(student=plan.teacher, method="none", epochs=plan.teacher_epochs,
                     out=str(out / "teacher"), **common)),
        ("baseline", f"2/3 training the baseline student ({plan.student}, no teacher)",
         TrainConfig(student=plan.student, method="none", epochs=plan.student_epochs,
                     out=str(out / "baseline"), **common)),
        ("cwt", f"3/3 distilling the student from the teacher (cwt, alpha {plan.alpha}, pairs {plan.pairs})",
         TrainConfig(student=plan.student, method="cwt", alpha=plan.alpha, pairs=plan.pairs,
                     teacher=str(out / "teacher" / "best.safetensors"), epochs=plan.student_epochs,
                     out=str(out / "cwt"), **common)),
    ]
    console.info(f"cwkd demo on the bundled fashion-mnist-mini (6,000 train / 1,000 val images), "
                 f"input {plan.input_size} px{', --fast' if fast else ''}; runs go to {out}/")
    results: dict[str, RunResult] = {}
    seconds: dict[str, float] = {}
    for key, label, cfg in steps:
        console.info(label)
        started = time.perf_counter()
        results[key] = run(cfg, console=console)  # progress bars and one line per epoch
        seconds[key] = time.perf_counter() - started
        console.info(f"    best val top-1 {results[key].best_top1:.2f}% in {seconds[key]:.0f}s")
    _print_table(console, plan, results, seconds)
    return results


def _print_table(console: RunConsole, plan: DemoPlan, results: dict[str, RunResult], seconds: dict) -> None:
    def params(result: RunResult) -> str:
        return f"{sum(p.numel() for p in result.student.parameters()) / 1e6:.2f}M"

    rows = [
        ["teacher", plan.teacher, params(results["teacher"]), "-", f"{results['teacher'].best_top1:.2f}",
         f"{seconds['teacher']:.0f}s"],
        ["baseline student", plan.student, params(results["baseline"]), "none",
         f"{results['baseline'].best_top1:.2f}", f"{seconds['baseline']:.0f}s"],
        ["cwkd student", plan.student, params(results["cwt"]), "cwt", f"{results['cwt'].best_top1:.2f}",
         f"{seconds['cwt']:.0f}s"],
    ]
    console.table("cwkd demo: fashion-mnist-mini val top-1 (%)",
                  ["run", "model", "params", "distillation", "top-1", "time"], rows)
    gain = results["cwt"].best_top1 - results["baseline"].best_top1
    console.info(f"CWT distillation changed the student's top-1 by {gain:+.2f} points "
                 f"(one seed; see docs/benchmarks.md for multi-seed results on the full data set).")
