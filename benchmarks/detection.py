"""Detection and instance segmentation on real Fashion-MNIST items: does channel-wise distillation pay? (issue 12)

The data are 128 px canvases with 2-6 real Fashion-MNIST items each, written in the COCO layout with a box,
class and mask per item (``cwkd.composite``; train items for the train canvases, test items for val, never
mixed). A Mask R-CNN teacher on a ResNet-50 body is trained here with ``cwkd train``; then each student is
trained alone (``none``) and distilled with each method under the same schedule and seeds:

    none      the student alone (baseline)
    cwt       the paper's channel-wise transform, 1x1 conv -> ReLU -> 1x1 conv
    linear    one 1x1 conv aligner (FitNets-style hint)
    mgd       masked generative distillation (add it with --methods)

What is distilled is the paper's choice for detection: every FPN level both detectors have (P2-P5), paired by
measured stride, one aligner each; the teacher's backbone + FPN runs on the student's own padded batch. alpha
is MGD's two-stage setting in its summed form (``--reduction sum --alpha 5e-7``). The learning rate is the
detection task's default (``--lr`` not passed). Reported are the last epoch's val box AP and mask AP (COCO,
percent; the cosine schedule ends at lr 0), never the best epoch's, with the paired difference to ``none``.

``--plan cpu`` is the same benchmark cut to what a 2-core CPU trains in about five hours: a Faster R-CNN
R50 teacher; a Faster R-CNN R18 student (box AP) and a Mask R-CNN R18 student (box and mask AP, 4 epochs
instead of 6: its step costs twice a Faster R-CNN's and its eval pastes masks); none and cwt; results in
``benchmarks/results/detection_cpu``. The teacher has no mask head: what it teaches is its FPN, all that the
paper distils for Mask R-CNN too.

Each run writes ``benchmarks/results/detection/<key>.json`` when it finishes and is skipped when that file
exists, so an interrupted grid resumes; run directories go to ``benchmarks/runs/detection`` (git-ignored)
and are deleted once their result is written, except the teacher's. The data, the run order and the table
helpers are segmentation's (``benchmarks/segmentation.py``), running cwkd and writing results ``common.py``'s.

Usage:
    python benchmarks/detection.py --quick        # tiny data and models, none vs cwt, 1 seed (< 3 min)
    python benchmarks/detection.py                # the whole grid, then the report
    CWKD_BENCH_THREADS=1 python benchmarks/detection.py --plan cpu --jobs 2   # what fits ~5 h of 2 CPU cores
    python benchmarks/detection.py --report       # tables from the saved results
    python benchmarks/detection.py --step-cost    # distill step against student step + teacher backbone/FPN
    python benchmarks/detection.py --device cuda --jobs 6 --results DIR --runs DIR   # on a GPU, 6 cells at a time

Needs the Debian package ``dataset-fashion-mnist`` (or the IDX files under $CWKD_DATA) and pycocotools.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
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
from segmentation import (  # noqa: E402  (the benchmark this one follows)
    _stepper,
    auto_table,
    cost_table,
    load_cells,
    order,
    prepare_data,
    student_options,
    time_steps,
)

RUNS = ROOT / "benchmarks" / "runs" / "detection"
#: MGD's alpha for two-stage detectors, in the summed form (sum over C*H*W of every level, divided by the batch).
MGD_TWO_STAGE_ALPHA_SUM = 5e-7
#: The scores a run reports, as metrics.jsonl names them (``val_<name>``); a Faster R-CNN has no mask AP.
SCORES = {"box_ap": "box AP", "mask_ap": "mask AP"}


@dataclass(frozen=True)
class Plan:
    """Everything that sizes the benchmark; ``--quick`` is a smaller one."""

    name: str = "full"
    teacher: str = "maskrcnn_resnet50"
    students: tuple[str, ...] = ("maskrcnn_resnet18", "fasterrcnn_resnet18")
    methods: tuple[str, ...] = ("none", "cwt", "linear")
    seeds: tuple[int, ...] = (0, 1, 2)
    canvas: int = 128
    train_canvases: int = 400
    val_canvases: int = 100
    epochs: int = 6
    student_epochs: tuple[tuple[str, int], ...] = ()  # (student, epochs) where a student's differ from ``epochs``
    teacher_epochs: int = 10
    batch_size: int = 8
    auto: bool = False  # also --alpha auto cells for the first student (--auto)
    results: Path = RESULTS / "detection"
    runs: Path = RUNS
    device: str = "cpu"

    def epochs_of(self, student: str) -> int:
        return dict(self.student_epochs).get(student, self.epochs)


QUICK = Plan(name="quick", teacher="maskrcnn_test_resnet", students=("maskrcnn_test_resnet", "fasterrcnn_test_resnet"),
             methods=("none", "cwt"), seeds=(0,), canvas=64, train_canvases=8, val_canvases=4, epochs=1,
             teacher_epochs=2, batch_size=4,
             results=RUNS / "quick" / "results", runs=RUNS / "quick")
#: What fits about five hours of a 2-core CPU: the teacher is a Faster R-CNN R50, and the Mask R-CNN student
#: trains 4 epochs, not 6 (its step is over twice a Faster R-CNN's and its eval pastes masks: a 4-epoch cell
#: took 50-60 minutes here, two side by side). Same data, seeds and alpha as the full plan.
CPU = Plan(name="cpu", teacher="fasterrcnn_resnet50", students=("fasterrcnn_resnet18", "maskrcnn_resnet18"),
           methods=("none", "cwt"), student_epochs=(("maskrcnn_resnet18", 4),),
           results=RESULTS / "detection_cpu", runs=RUNS / "cpu")
PLANS = {"full": Plan(), "cpu": CPU, "quick": QUICK}


def _common(plan: Plan, data: Path, seed: int, epochs: int) -> list:
    return ["--data", data, "--input-size", plan.canvas, "--epochs", epochs, "--batch-size", plan.batch_size,
            "--workers", 0, "--seed", seed, "--device", plan.device, "--quiet"]


def _scores(record: dict) -> dict[str, float]:
    """The reported scores in one metrics.jsonl record."""
    return {name: record[f"val_{name}"] for name in SCORES if f"val_{name}" in record}


def train_teacher(plan: Plan, data: Path, extra: tuple = ()) -> dict:
    """``cwkd train`` the teacher (``extra``: more options) unless its result is saved; return that result."""
    out, path = plan.runs / "teacher", plan.results / "teacher.json"
    if path.is_file() and (out / "last.safetensors").is_file():
        return json.loads(path.read_text())
    history = run_in(out, ["train", "--model", plan.teacher, *_common(plan, data, 0, plan.teacher_epochs), *extra])
    result = {"model": plan.teacher, "scores": _scores(history[-1]), "history": [_scores(h) for h in history],
              "epochs": plan.teacher_epochs, "wall_s": round(sum(h["epoch_s"] for h in history), 1),
              "config": saved_config(out), "versions": versions()}
    write_json(path, result)
    return result


def run_cell(plan: Plan, data: Path, student: str, method: str, seed: int, auto: bool = False, *,
             name: str | None = None, distil: tuple | None = None, student_extra: tuple = ()) -> dict:
    """Train or distil one student (``auto``: with ``--alpha auto``); write and return its result as ``name``.

    ``distil``: the distilled cell's loss options (default: ``--reduction sum`` and MGD's two-stage alpha, or
    auto); ``student_extra``: more options for every cell, with ``cwkd train``'s names (``--backbone-weights``).
    """
    name = name or key(student, method, seed, auto)
    out = plan.runs / "cells" / name
    teacher = plan.runs / "teacher" / "last.safetensors"
    if distil is None:
        distil = ("--reduction", "sum", "--alpha", "auto" if auto else MGD_TWO_STAGE_ALPHA_SUM)
    command = ["train", "--model", student, *student_extra] if method == "none" else \
        ["distill", "--teacher", teacher, "--student", student, "--method", method, *distil,
         *student_options(student_extra),
         *(["--no-teacher-check"] if plan.name == "quick" else [])]  # the quick plan's teacher is at chance
    started = time.perf_counter()
    history = run_in(out, [*command, *_common(plan, data, seed, plan.epochs_of(student))])
    config = saved_config(out)
    result = {"student": student, "method": method, "seed": seed, "alpha_auto": auto,
              "alpha": config["alpha"] if method != "none" else None, "scores": _scores(history[-1]),
              "history": [_scores(h) for h in history], **cell_tail(history, started, config)}
    return keep_result(plan.results / f"{name}.json", result, out)


def run_grid(plan: Plan, jobs: int = 1) -> None:
    """The teacher and every missing cell, ``jobs`` at a time (each one a ``cwkd`` subprocess).

    The ``none`` cells need no teacher, so with ``jobs`` > 1 they train beside it; the distilled cells wait for
    it. With ``plan.auto``, ``--alpha auto`` cells for the first student's feature methods follow the grid.
    """
    data = prepare_data(plan)
    cells = [(*cell, False) for cell in order(plan)]
    if plan.auto:
        cells += [(plan.students[0], m, seed, True) for seed in plan.seeds for m in plan.methods if m != "none"]
    todo = [(n, cell) for n, cell in enumerate(cells, 1) if not (plan.results / f"{key(*cell)}.json").is_file()]
    if jobs > 1:  # the teacher-free cells first, beside the teacher
        todo.sort(key=lambda item: item[1][1] != "none")
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        teacher = pool.submit(train_teacher, plan, data)
        teacher.add_done_callback(partial(_teacher_done, plan.teacher))
        running = {pool.submit(_after, teacher if cell[1] != "none" else None, run_cell, plan, data, *cell):
                   (n, cell) for n, cell in todo}
        for future in as_completed(running):
            number, cell = running[future]
            try:
                result = future.result()
            except Exception as exc:  # report and go on: one broken cell must not lose the others
                failed.append(key(*cell))
                print(f"[{number}/{len(cells)}] {key(*cell)}: FAILED ({type(exc).__name__}: {exc})", flush=True)
                continue
            print(f"[{number}/{len(cells)}] {key(*cell)}: {_format(result['scores'])} "
                  f"({sum(result['epoch_s']):.0f}s)", flush=True)
    if teacher.exception() is not None:  # the cells that did not need it have finished
        failed.insert(0, "teacher")
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; rerun to retry them")


def _teacher_done(name: str, future) -> None:
    error = future.exception()
    print(f"teacher {name}: " + (f"FAILED ({type(error).__name__}: {error})" if error else
                                 _format(future.result()["scores"])), flush=True)


def _after(first, work, *args):
    """``work(*args)`` once the future ``first`` (if any) has finished; its exception stops ``work``."""
    if first is not None:
        first.result()
    return work(*args)


def _format(scores: dict[str, float]) -> str:
    return ", ".join(f"val {SCORES[k]} {v:.2f}" for k, v in scores.items())


def step_cost(plan: Plan, rounds: int = 5) -> dict:
    """Median ms of (a) a student train step, (b) the teacher's backbone + FPN forward on the student's padded
    batch (what a distill step runs of the teacher), (c) a cwt distill step; and c / (a + b).

    In-process at the grid's batch and canvas size on the first val canvases (real boxes and masks); the
    teacher has random weights (its cost does not depend on them).
    """
    import torch

    from cwkd import FeatureDistiller
    from cwkd.tasks import get_task, infer_task
    from cwkd.tasks.detection.fpn import teacher_backbone_features

    torch.manual_seed(0)
    data, size, device = prepare_data(plan), plan.canvas, torch.device(plan.device)
    t_task = get_task(infer_task(plan.teacher))
    teacher = t_task.build_model(plan.teacher, num_classes=11, input_size=size).eval().requires_grad_(False)
    teacher.to(device)
    results = {"threads": torch.get_num_threads(), "batch": plan.batch_size, "canvas": size, "rounds": rounds,
               "device": plan.device, "students": {}}
    for name in plan.students:
        task = get_task(infer_task(name))
        spec = task.load_data(str(data))
        images, targets = zip(*(spec.val[i] for i in range(plan.batch_size)), strict=True)
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if hasattr(v, "to") else v for k, v in t.items()} for t in targets]
        student = task.build_model(name, num_classes=spec.num_classes, input_size=size, new_head=True).to(device)
        common = dict(input_size=size, task=task)
        plain = FeatureDistiller(None, student, method="none", **common).to(device).train()
        distil = FeatureDistiller(teacher, student, method="cwt", reduction="sum", alpha=MGD_TWO_STAGE_ALPHA_SUM,
                                  **common).to(device).train()
        batch, _ = student.transform(images, [dict(t) for t in targets])  # what the teacher sees in a step
        steps = {"a_student_step": _stepper(plain, images, targets), "c_cwkd_step": _stepper(distil, images, targets),
                 "b_teacher_forward": partial(teacher_backbone_features, teacher, student, batch.tensors,
                                              batch.image_sizes)}
        results["students"][name] = time_steps(name, {k: _synced(v, device) for k, v in steps.items()}, rounds)
    write_json(plan.results / "step_cost.json", {**results, "versions": versions()})
    return results


def _synced(step, device):
    """``step`` followed by a CUDA synchronise, so that a timing on a GPU covers the queued kernels."""
    if device.type != "cuda":
        return step
    import torch

    def run() -> None:
        step()
        torch.cuda.synchronize(device)
    return run


# ----------------------------------------------------------------------------- report


def report(plan: Plan) -> str:
    """The markdown table: box AP and mask AP mean +- std per student and method, and the paired gain over none."""
    results, auto = load_cells(plan.results)
    if not results:
        return "no results yet"
    teacher = json.loads((plan.results / "teacher.json").read_text())
    shown = [name for name in SCORES if any(name in r["scores"] for r in results.values())]  # no mask: no column
    epochs = ", ".join(f"{s} {plan.epochs_of(s)}" for s in plan.students)
    lines = [f"Teacher {teacher['model']}: {_format(teacher['scores'])} (%) after {teacher['epochs']} epochs; "
             f"student epochs: {epochs}.", "",
             "| student | method | runs | " + " | ".join(f"val {SCORES[name]} (%) mean ± std | paired gain over none"
                                                       for name in shown) + " | per seed (box AP) |",
             "| --- | --- | ---: | " + "---: | ---: | " * len(shown) + "--- |"]
    for student in plan.students:
        for method in plan.methods:
            seeds = [s for s in plan.seeds if (student, method, s) in results]
            if seeds:
                lines.append(_row(results, student, method, seeds, shown))
    lines += auto_table(plan.seeds, results, auto, value=lambda r: r["scores"]["box_ap"], label="val box AP (%)")
    return "\n".join(lines + cost_table(plan.results / "step_cost.json", "teacher backbone + FPN forward"))


def _row(results: dict, student: str, method: str, seeds: list[int], shown: list[str]) -> str:
    """One table row: each ``shown`` score's mean ± std over ``seeds`` and its paired gain over ``none``."""
    cells = []
    for name in shown:
        values = [results[(student, method, s)]["scores"].get(name) for s in seeds]
        if None in values:  # a Faster R-CNN student has no mask AP
            cells += ["", ""]
            continue
        gains = [results[(student, method, s)]["scores"][name] - results[(student, "none", s)]["scores"][name]
                 for s in seeds if (student, "none", s) in results]
        gain = "" if method == "none" or not gains else f"{fmt_mean_std(gains, signed=True)} ({len(gains)} paired)"
        cells += [fmt_mean_std(values), gain]
    per_seed = ", ".join(f"{results[(student, method, s)]['scores']['box_ap']:.2f}" for s in seeds)
    return f"| {student} | {method} | {len(seeds)} | {' | '.join(cells)} | {per_seed} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny plan that checks the pipeline (< 3 min)")
    parser.add_argument("--plan", choices=("full", "cpu"), default="full", help="full: Mask R-CNN R50 teacher, "
                        "Mask and Faster R-CNN R18 students (a GPU's work); cpu: Faster R-CNN R50 -> Faster and Mask "
                        "R-CNN R18, none and cwt, about 5 hours of a 2-core CPU with --jobs 2 and "
                        "CWKD_BENCH_THREADS=1")
    parser.add_argument("--report", action="store_true", help="print the tables from saved results and exit")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these seeds")
    parser.add_argument("--methods", nargs="+", choices=("none", "cwt", "linear", "mgd"),
                        help="run these methods (default: none cwt linear; --quick: none cwt)")
    parser.add_argument("--step-cost", action="store_true", help="time the distill step against student step + "
                        "teacher backbone/FPN forward, then exit (run it on an idle machine)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of --step-cost (default: 5)")
    parser.add_argument("--device", default="cpu", help="where every run and --step-cost run (default: cpu)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time: the teacher and the none cells side "
                        "by side, then the distilled cells (default: 1)")
    parser.add_argument("--results", type=Path, help="folder of the result JSONs (default: the plan's)")
    parser.add_argument("--runs", type=Path, help="folder of the data and run directories (default: the plan's)")
    parser.add_argument("--auto", action="store_true", help="after the grid, --alpha auto cells for the first "
                        "student and each feature method, reported against the grid's alpha (issue 13)")
    args = parser.parse_args(argv)
    plan = replace(PLANS["quick" if args.quick else args.plan], device=args.device, auto=args.auto)
    if args.results:
        plan = replace(plan, results=args.results.resolve())
    if args.runs:
        plan = replace(plan, runs=args.runs.resolve())
    if args.seeds:
        plan = replace(plan, seeds=tuple(args.seeds))
    if args.methods:
        plan = replace(plan, methods=tuple(args.methods))
    if args.step_cost:
        step_cost(plan, max(1, args.rounds))
        return 0
    if not args.report:
        run_grid(plan, args.jobs)
    print(report(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
