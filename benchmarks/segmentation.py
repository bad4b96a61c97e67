"""Semantic segmentation on real Fashion-MNIST items: does channel-wise distillation pay? (issue 11)

The data are canvases with 2-6 real Fashion-MNIST items each (``cwkd.composite``; train items for the train
canvases, test items for val, never mixed) and a per-pixel class mask (background + 10 classes). A PSPNet
teacher on a dilated ResNet-50 is trained once with ``cwkd train``; then each student is trained alone
(``none``) and distilled with each method under the same schedule and seeds:

    none      the student alone (baseline)
    linear    one 1x1 conv aligner (FitNets-style hint)
    cwt       the paper's channel-wise transform, 1x1 conv -> ReLU -> 1x1 conv
    mgd       masked generative distillation (Yang et al. 2022)

What is distilled is the paper's choice for segmentation: the last backbone stage at 1/8 of the input
(``pairs=last`` on the task's backbone). alpha is cwkd's mean-MSE form, converted from MGD's segmentation
setting (2e-5 in the summed form) for the teacher's last-stage map with ``cwkd.convert_alpha``.
Reported is the last epoch's val mIoU (the cosine schedule ends at lr 0), never the best epoch's.

Each run writes ``benchmarks/results/segmentation/<key>.json`` when it finishes and is skipped when that file
exists, so an interrupted grid resumes; run directories go to ``benchmarks/runs/segmentation`` (git-ignored)
and are deleted once their result is written, except the teacher's.

Usage:
    python benchmarks/segmentation.py --quick      # tiny data, 1 student, none vs cwt, 1 seed (~3 min)
    python benchmarks/segmentation.py              # the whole grid, then the report
    python benchmarks/segmentation.py --report     # tables from the saved results
    python benchmarks/segmentation.py --students pspnet_resnet18 --methods none mgd \
        --results benchmarks/results/segmentation_mgd_faithful   # a variant with its own teacher and baseline

Needs the Debian package ``dataset-fashion-mnist`` (or the IDX files under $CWKD_DATA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from common import (
    RESULTS,
    ROOT,
    cell_tail,
    fmt_mean_std,
    keep_result,
    key,
    run_in,
    saved_config,
    versions,
    write_json,
)

RUNS = ROOT / "benchmarks" / "runs" / "segmentation"
METHODS = ("none", "linear", "cwt", "mgd")
#: MGD's alpha for segmentation, in the summed form (sum over C*H*W, divided by the batch).
MGD_SEG_ALPHA_SUM = 2e-5


@dataclass(frozen=True)
class Plan:
    """Everything that sizes the benchmark; ``--quick`` is a smaller one."""

    name: str = "full"
    teacher: str = "pspnet_resnet50"
    students: tuple[str, ...] = ("pspnet_resnet18", "pspnet_mobilenetv3_small_100")
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    canvas: int = 64
    train_canvases: int = 600
    val_canvases: int = 300
    epochs: int = 5
    teacher_epochs: int = 8
    batch_size: int = 16
    lr: float = 0.05
    results: Path = RESULTS / "segmentation"
    runs: Path = RUNS


QUICK = Plan(name="quick", teacher="pspnet_resnet18", students=("pspnet_mobilenetv3_small_100",),
             methods=("none", "cwt"), seeds=(0,), train_canvases=64, val_canvases=32, epochs=2, teacher_epochs=2,
             results=RUNS / "quick" / "results", runs=RUNS / "quick")


def prepare_data(plan: Plan, source: str = "fashion-mnist") -> Path:
    """Write the composited data set once (seed 0) and return its folder.

    ``source``: the items' data set, ``fashion-mnist`` or the bundled ``fashion-mnist-mini`` (6,000 train and
    1,000 test items: what a machine without Fashion-MNIST, such as the GPU machine, composites from).
    """
    from cwkd.composite import items_from_spec, write_dense_dataset
    from cwkd.tasks.classification.data import load_data

    prefix = "fm-dense" if source == "fashion-mnist" else f"{source}-dense"
    root = plan.runs / "data" / f"{prefix}-{plan.canvas}px-{plan.train_canvases}-{plan.val_canvases}"
    if not (root / "done").is_file():
        items = items_from_spec(load_data(source))
        write_dense_dataset(root, items, canvas=plan.canvas, seed=0,
                            counts={"train": plan.train_canvases, "val": plan.val_canvases})
        (root / "done").write_text("ok\n")
    return root


def _common(plan: Plan, data: Path, seed: int, epochs: int) -> list:
    return ["--task", "segmentation", "--data", data, "--input-size", plan.canvas, "--epochs", epochs,
            "--batch-size", plan.batch_size, "--lr", plan.lr, "--workers", 0, "--seed", seed, "--device", "cpu",
            "--quiet"]


def train_teacher(plan: Plan, data: Path, extra: tuple = ()) -> dict:
    """``cwkd train`` the teacher (``extra``: more options) unless its result is saved; return that result."""
    out, path = plan.runs / "teacher", plan.results / "teacher.json"
    if path.is_file() and (out / "last.safetensors").is_file():
        return json.loads(path.read_text())
    history = run_in(out, ["train", "--model", plan.teacher, *_common(plan, data, 0, plan.teacher_epochs), *extra])
    result = {"model": plan.teacher, "miou": history[-1]["val_miou"], "pixel_acc": history[-1]["val_pixel_acc"],
              "history": [h["val_miou"] for h in history], "epochs": plan.teacher_epochs,
              "wall_s": round(sum(h["epoch_s"] for h in history), 1), "versions": versions()}
    write_json(path, result)
    return result


def teacher_alpha(plan: Plan) -> tuple[float, list[int]]:
    """MGD's segmentation alpha converted to the mean form for the teacher map that ``pairs=last`` distils."""
    from cwkd import convert_alpha, propose_pairs

    shape = propose_pairs(plan.teacher, plan.students[0], input_size=plan.canvas)["pairs"][-1]["teacher_shape"]
    return convert_alpha(MGD_SEG_ALPHA_SUM, *shape, to="mean"), shape


def run_cell(plan: Plan, data: Path, student: str, method: str, seed: int, alpha: float | str | None, *,
             name: str | None = None, extra: tuple = (), student_extra: tuple = ()) -> dict:
    """Train or distil one student (``alpha`` a number, ``"auto"``, or None: the method's default); write and
    return its result as ``name`` (default: student, method, seed). ``extra`` are more options for a distilled
    cell, ``student_extra`` for every cell, given with ``cwkd train``'s names (``--backbone-weights``)."""
    name = name or key(student, method, seed, auto=alpha == "auto")
    out = plan.runs / "cells" / name
    teacher = plan.runs / "teacher" / "last.safetensors"
    distil = ["--method", method, *(["--alpha", alpha] if alpha is not None else []), *extra,
              *student_options(student_extra),
              *(["--no-teacher-check"] if plan.name == "quick" else [])]  # the quick plan's teacher is at chance
    command = ["train", "--model", student, *student_extra] if method == "none" else \
        ["distill", "--teacher", teacher, "--student", student, *distil]
    started = time.perf_counter()
    history = run_in(out, [*command, *_common(plan, data, seed, plan.epochs)])
    config = saved_config(out)
    result = {"student": student, "method": method, "seed": seed,
              "alpha": config["alpha"] if method != "none" else None, "alpha_auto": alpha == "auto",
              "miou": history[-1]["val_miou"], "pixel_acc": history[-1]["val_pixel_acc"],
              "history": [h["val_miou"] for h in history], **cell_tail(history, started, config)}
    return keep_result(plan.results / f"{name}.json", result, out)


def student_options(options: tuple) -> list:
    """``cwkd train``'s options under ``cwkd distill``'s student names (``--backbone-weights`` ->
    ``--student-backbone-weights``); values pass unchanged."""
    return [str(a).replace("--", "--student-", 1) if str(a).startswith("--") else a for a in options]


def run_auto(plan: Plan, methods: tuple[str, ...] = ("cwt", "mgd")) -> None:
    """``--alpha auto`` for the first student and ``methods`` over every seed (issue 13), beside the grid."""
    data = prepare_data(plan)
    train_teacher(plan, data)
    student = plan.students[0]
    for seed in plan.seeds:
        for method in methods:
            name = key(student, method, seed, auto=True)
            if (plan.results / f"{name}.json").is_file():
                continue
            result = run_cell(plan, data, student, method, seed, "auto")
            print(f"{name}: alpha {result['alpha']:.4g}, val mIoU {result['miou']:.2f} "
                  f"({sum(result['epoch_s']):.0f}s)", flush=True)


def order(plan: Plan) -> list[tuple[str, str, int]]:
    """Every (student, method, seed), most informative first, so a grid cut short still compares something.

    The first student's whole grid seed by seed, then the other students' none and cwt over every seed,
    then their other methods.
    """
    first, others = plan.students[0], plan.students[1:]
    cells = [(first, m, seed) for seed in plan.seeds for m in plan.methods]
    cells += [(s, m, seed) for s in others for seed in plan.seeds for m in plan.methods if m in ("none", "cwt")]
    cells += [(s, m, seed) for s in others for seed in plan.seeds for m in plan.methods if m not in ("none", "cwt")]
    return cells


def run_grid(plan: Plan) -> None:
    data = prepare_data(plan)
    teacher = train_teacher(plan, data)
    print(f"teacher {plan.teacher}: val mIoU {teacher['miou']:.2f}")
    alpha, shape = teacher_alpha(plan)
    print(f"alpha {alpha:.4g} (mean form) = {MGD_SEG_ALPHA_SUM:g} (summed form) x {shape[0]}*{shape[1]}*{shape[2]}")
    cells = order(plan)
    for number, (student, method, seed) in enumerate(cells, 1):
        if (plan.results / f"{key(student, method, seed)}.json").is_file():
            continue
        result = run_cell(plan, data, student, method, seed, alpha)
        print(f"[{number}/{len(cells)}] {key(student, method, seed)}: val mIoU {result['miou']:.2f} "
              f"({sum(result['epoch_s']):.0f}s)", flush=True)


def step_cost(plan: Plan, rounds: int = 7) -> dict:
    """Median seconds of (a) a student train step, (b) a teacher forward, (c) a cwt distill step; c / (a + b).

    In-process at the grid's batch and canvas size on random tensors, the three timed in interleaved rounds
    after one warm-up each, so a slower stretch of the machine hits them alike.
    """
    import torch

    from cwkd import FeatureDistiller
    from cwkd.tasks import get_task
    from cwkd.tasks.segmentation.models import create_segmentation_model

    torch.manual_seed(0)
    task, size, batch = get_task("segmentation"), plan.canvas, plan.batch_size
    images, masks = torch.randn(batch, 3, size, size), torch.randint(0, 11, (batch, size, size))
    teacher = create_segmentation_model(plan.teacher, num_classes=11).eval().requires_grad_(False)
    results = {"threads": torch.get_num_threads(), "batch": batch, "canvas": size, "rounds": rounds, "students": {}}
    for name in plan.students:
        student = create_segmentation_model(name, num_classes=11)
        common = dict(input_size=size, task=task)
        plain = FeatureDistiller(None, student, method="none", **common).train()
        distil = FeatureDistiller(teacher, student, method="cwt", **common).train()
        steps = {"a_student_step": _stepper(plain, images, masks), "c_cwkd_step": _stepper(distil, images, masks)}
        steps["b_teacher_forward"] = lambda: _teacher_forward(teacher, images)
        results["students"][name] = time_steps(name, steps, rounds)
    write_json(plan.results / "step_cost.json", {**results, "versions": versions()})
    return results


def time_steps(name: str, steps: dict, rounds: int) -> dict:
    """Median ms of ``a_student_step``, ``b_teacher_forward`` and ``c_cwkd_step``, and c / (a + b).

    The steps are timed in interleaved rounds after one warm-up each, so a slower stretch of the machine
    hits them alike.
    """
    times: dict[str, list[float]] = {k: [] for k in steps}
    for round_ in range(rounds + 1):
        for label, step in steps.items():
            started = time.perf_counter()
            step()
            if round_:  # round 0 warms up
                times[label].append(time.perf_counter() - started)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["c_cwkd_step"] / (medians["a_student_step"] + medians["b_teacher_forward"])
    print(f"{name}: student step {medians['a_student_step'] * 1000:.0f} ms, teacher forward "
          f"{medians['b_teacher_forward'] * 1000:.0f} ms, cwt step {medians['c_cwkd_step'] * 1000:.0f} ms: "
          f"ratio {ratio:.3f}", flush=True)
    return {**{k: round(v * 1000, 1) for k, v in medians.items()}, "ratio": round(ratio, 3)}


def _stepper(distiller, images, masks):
    import torch

    optimizer = torch.optim.SGD(distiller.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        out = distiller(images, masks)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
    return step


def _teacher_forward(teacher, images) -> None:
    import torch

    with torch.inference_mode():
        teacher(images)


# ----------------------------------------------------------------------------- report


def report(plan: Plan) -> str:
    """The markdown tables: mIoU mean +- std per student and method, and the paired gain over the baseline."""
    results, auto = load_cells(plan.results)
    if not results:
        return "no results yet"
    teacher = json.loads((plan.results / "teacher.json").read_text())
    lines = [f"Teacher {teacher['model']}: val mIoU {teacher['miou']:.2f} % after {teacher['epochs']} epochs.", "",
             "| student | method | runs | val mIoU (%) mean ± std | paired gain over none | per seed |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for student in plan.students:
        for method in plan.methods:
            seeds = [s for s in plan.seeds if (student, method, s) in results]
            if not seeds:
                continue
            values = [results[(student, method, s)]["miou"] for s in seeds]
            gains = [results[(student, method, s)]["miou"] - results[(student, "none", s)]["miou"]
                     for s in seeds if (student, "none", s) in results]
            gain = "" if method == "none" or not gains else f"{fmt_mean_std(gains, signed=True)} ({len(gains)} paired)"
            lines.append(f"| {student} | {method} | {len(seeds)} | {fmt_mean_std(values)} | {gain} | "
                         f"{', '.join(f'{v:.2f}' for v in values)} |")
    return "\n".join(lines + auto_table(plan.seeds, results, auto) + cost_table(plan.results / "step_cost.json"))


def load_cells(folder: Path) -> tuple[dict, dict]:
    """The cells saved in ``folder`` by (student, method, seed): the grid's, and the ``--alpha auto`` ones."""
    results, auto = {}, {}
    for path in sorted(folder.glob("*-s*.json")):
        r = json.loads(path.read_text())
        (auto if r.get("alpha_auto") else results)[(r["student"], r["method"], r["seed"])] = r
    return results, auto


def auto_table(seeds: tuple[int, ...], fixed: dict, auto: dict, value=lambda r: r["miou"],
               label: str = "val mIoU (%)") -> list[str]:
    """Markdown lines: ``--alpha auto`` runs against the grid's alpha and ``none``, paired by seed.

    ``fixed`` and ``auto`` map ``(student, method, seed)`` to result records; ``value`` reads the score.
    """
    if not auto:
        return []
    lines = ["", "`--alpha auto` against the grid's alpha (paired by seed):", "",
             f"| student | method | alpha picked per seed | {label} | minus the grid's alpha | minus none |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for student, method in sorted({(s, m) for s, m, _ in auto}):
        runs = {seed: auto[(student, method, seed)] for seed in seeds if (student, method, seed) in auto}
        picked = ", ".join(f"{r['alpha']:.3g}" for r in runs.values())
        paired = [_paired(runs, fixed, student, other, value) for other in (method, "none")]
        lines.append(f"| {student} | {method} | {picked} | {fmt_mean_std([value(r) for r in runs.values()])} | "
                     f"{paired[0]} | {paired[1]} |")
    return lines


def _paired(runs: dict, fixed: dict, student: str, other: str, value) -> str:
    diffs = [value(r) - value(fixed[(student, other, seed)]) for seed, r in runs.items()
             if (student, other, seed) in fixed]
    return f"{fmt_mean_std(diffs, signed=True)} ({len(diffs)})" if diffs else "-"


def cost_table(path: Path, teacher: str = "teacher forward") -> list[str]:
    """The step-cost table that :func:`step_cost` saved in ``path`` as markdown lines (none if not measured)."""
    if not path.is_file():
        return []
    cost = json.loads(path.read_text())
    lines = ["", f"Step cost (batch {cost['batch']}, {cost['canvas']} px, median of {cost['rounds']} rounds):", "",
             f"| student | (a) student step ms | (b) {teacher} ms | (c) cwt step ms | c / (a + b) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    return lines + [f"| {name} | {c['a_student_step']} | {c['b_teacher_forward']} | {c['c_cwkd_step']} | {c['ratio']} |"
                    for name, c in cost["students"].items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny plan that checks the pipeline (~3 min)")
    parser.add_argument("--report", action="store_true", help="print the tables from saved results and exit")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these seeds")
    parser.add_argument("--step-cost", action="store_true", help="time the distill step against student step + "
                        "teacher forward, then exit (run it on an idle machine)")
    parser.add_argument("--auto", nargs="*", choices=("cwt", "linear", "mgd"), default=None, metavar="METHOD",
                        help="run --alpha auto for the first student and these methods (default: cwt mgd) "
                             "over every seed instead of the grid, then the report")
    parser.add_argument("--students", nargs="+", help="run (and report) only these students")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="run (and report) only these methods")
    parser.add_argument("--results", type=Path, help="save and read results in this folder instead (a variant: "
                        "its teacher and run directories go to benchmarks/runs/segmentation/<folder name>)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.seeds:
        plan = replace(plan, seeds=tuple(args.seeds))
    if args.students:
        plan = replace(plan, students=tuple(args.students))
    if args.methods:
        plan = replace(plan, methods=tuple(m for m in METHODS if m in args.methods))
    if args.results:
        plan = replace(plan, results=args.results.resolve(), runs=plan.runs / args.results.name)
    if args.step_cost:
        step_cost(plan)
        return 0
    if args.auto is not None:
        run_auto(plan, tuple(args.auto) or ("cwt", "mgd"))
    elif not args.report:
        run_grid(plan)
    print(report(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
