"""Accuracy of channel-wise feature distillation on real Fashion-MNIST (issue 5, part 1).

A resnet18 teacher is trained once with ``cwkd train``; then every student is distilled with each
method under the same schedule, augmentation and seeds, and scored on the full 10k test set:

    none      the student alone (baseline)
    kd        Hinton logit KD (T=4, weight 1)
    linear    one 1x1 conv aligner (FitNets-style hint)
    cwt       the paper's channel-wise transform, 1x1 conv -> ReLU -> 1x1 conv
    cwt+kd    cwt plus logit KD
    mgd       masked generative distillation (Yang et al. 2022)

Design (see docs/benchmarks.md, "## Accuracy", for the reasoning):
- 32 px input, in_chans=1. At 32 px the last stage of both models is a 1x1 map, where a "channel-wise"
  transform is just a linear layer on a vector, so the distilled pair is chosen explicitly at
  reduction 8 (4x4 maps): the layer names come from
  ``cwkd inspect --teacher resnet18 --student STUDENT --input-size 32 --pairs all``.
- A fixed, seeded, class-balanced subset of the 60k training images (the same for every run) keeps a
  run to a few minutes on 2 CPU cores; the teacher sees a larger superset of it. Scoring is always on
  the full 10k test split (``val`` for fashion-mnist in cwkd).
- alpha is in cwkd's mean-MSE form; the main grid uses 7, which is MGD's ImageNet setting (7e-5 in the
  summed form) converted with ``cwkd.core.losses.convert_alpha``.
- Reported is the last epoch's top-1 (the cosine schedule ends at lr 0), not the best epoch, which
  would select on the test set.

Each cell (student, method, alpha, hidden, seed) writes ``benchmarks/results/accuracy/<cell>.json`` as
soon as it finishes, and cells whose file exists are skipped, so an interrupted grid resumes and a
partial grid still counts. Checkpoints go to ``benchmarks/runs/`` (git-ignored) and a cell's run
directory is deleted once its result is written; the teacher's checkpoint is kept there.

The code, by concern: ``accuracy_plan.py`` (pairs, methods, the plan and its grid of cells, result paths),
``accuracy_data.py`` (the subsets), ``accuracy_cells.py`` (training the teacher and the cells),
``accuracy_report.py`` (tables, summary JSON, plot) and ``accuracy_diagnose.py`` (``--diagnose``); this file is
the command line, and ``common.py`` holds what every benchmark shares.

Usage:
    python benchmarks/accuracy.py --quick           # one student, none vs cwt, 1 seed, tiny subset (~3 min)
    python benchmarks/accuracy.py                   # teacher + main grid + ablations, then the report
    python benchmarks/accuracy.py --only main --jobs 2
    python benchmarks/accuracy.py --report          # tables, summary JSON and plot from the saved results
    python benchmarks/accuracy.py --device cuda --results DIR   # on a GPU; DIR stands in for benchmarks/results

Needs the Debian package ``dataset-fashion-mnist`` (or the four IDX files under $CWKD_DATA). matplotlib
is needed for the plot only (``pip install matplotlib``); it is not a cwkd dependency.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from accuracy_cells import run_cell, run_grid, teacher_normalization, teacher_trained, train_teacher
from accuracy_data import prepare_data
from accuracy_diagnose import diagnose
from accuracy_plan import METHODS, PAIRS, QUICK, Cell, Plan, cell_path, grid, teacher_json
from accuracy_report import load_results, report, summarise
from common import RESULTS

#: What alpha.py and the tests use from here, wherever it lives now.
__all__ = ["METHODS", "PAIRS", "QUICK", "RESULTS", "Cell", "Plan", "add_device_options", "cell_path", "diagnose",
           "grid", "load_results", "main", "prepare_data", "report", "run_cell", "run_grid", "summarise",
           "teacher_json", "teacher_normalization", "teacher_trained", "train_teacher", "with_device_options"]


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--results``, shared with alpha.py."""
    parser.add_argument("--device", default="cpu", help="where the teacher and the cells train (default: cpu)")
    parser.add_argument("--results", type=Path, default=None, help="a folder that stands in for benchmarks/results: "
                        "cells in DIR/accuracy, the summary and the teacher's JSON in DIR")


def with_device_options(plan: Plan, args: argparse.Namespace) -> Plan:
    """``plan`` with the --device and --results of ``args``."""
    plan = replace(plan, device=args.device)
    return replace(plan, results=args.results.resolve()) if args.results else plan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one student, none vs cwt, 1 seed, tiny subset")
    parser.add_argument("--only", choices=["all", "main", "ablations"], default="all", help="which cells to run")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    parser.add_argument("--seeds", type=int, default=None, help="use only the first N seeds")
    parser.add_argument("--cells", default=None, help="run only these cells (comma-separated keys, as in the "
                        "result file names), e.g. mobilenetv3_small_050-cwt-s1-a50")
    parser.add_argument("--report", action="store_true", help="only summarise the saved results")
    parser.add_argument("--diagnose", action="store_true", help="compare the loss terms' gradients at init, "
                        "and the teacher's top-1 on each student's input")
    add_device_options(parser)
    args = parser.parse_args(argv)
    plan = with_device_options(QUICK if args.quick else Plan(), args)
    if args.seeds is not None:
        plan = replace(plan, seeds=plan.seeds[:args.seeds], ablation_seeds=plan.ablation_seeds[:args.seeds])
    if args.diagnose:
        diagnose(plan)
        return
    if not args.report:
        cells = grid(plan, args.only)
        if args.cells:
            wanted = args.cells.split(",")
            unknown = sorted(set(wanted) - {c.key for c in cells})
            if unknown:
                parser.error(f"unknown cell(s) {', '.join(unknown)}; keys look like {cells[0].key}")
            cells = [c for c in cells if c.key in wanted]
        run_grid(plan, cells, max(1, args.jobs))
    report(plan)


if __name__ == "__main__":
    main()
