"""Faster R-CNN in the paper's setting, shrunk to fit: pretrained bodies, a trained teacher, 5 seeds (issue 24).

The detection twin of ``benchmarks/pretrained.py``, with its pretrain stage, decision rule and report helpers,
and ``benchmarks/detection.py``'s data and cells:

1. Pretrain: ``resnet18`` and ``resnet50`` trained for classification on Fashion-MNIST (the ImageNet stand-in;
   ``pretrained.pretrain_body``), cached under the results folder's ``bodies/`` (git-ignored, resumable).
2. Teacher: a Faster R-CNN R50 (``fasterrcnn_resnet50``) on detection.py's composited COCO canvases, from the
   R50 body (``--backbone-weights``). The report says whether it leads the student baseline by at least
   ``pretrained.TEACHER_LEAD`` box AP.
3. Students: Faster R-CNN R18 (``fasterrcnn_resnet18``) from the R18 body (``--student-backbone-weights``),
   the same seeds for every arm, distilling every FPN level both detectors have (P2-P5, paired by stride):

       none   the student alone (the baseline every gain is paired with, seed by seed)
       cwt    the paper's channel-wise transform at MGD's two-stage alpha, 5e-7 in the summed form
              (``--reduction sum``, as detection.py)
       mgd    MGD as its reference code does it for Faster R-CNN: pixel mask at 0.45 (the detection task's
              default), the same alpha
       cwd    channel-wise distillation as MMRazor's cwd_fpn_frcnn_r101_frcnn_r50_1x_coco config: on the FPN
              outputs, tau 1, loss weight 10 per level (``--alpha 10``: cwkd sums the levels' losses as
              MMRazor does). MMRazor distils five neck outputs; cwkd's detectors pair four (P2-P5, no pooled P6)

   Every cell clips the gradient norm at 35 (:data:`CLIP_GRAD`, MGD's detection configs), the baseline
   included, so that the arms differ in their distillation alone.

Decision rule, fixed before any run: **CWT pays if its paired box AP gain over ``none`` is positive in at least
4 of 5 seeds and its mean is at least 1 box AP point with a 95 % interval above 0** (Student's t over the
paired gains; ``pretrained.decide``). With fewer than 5 paired seeds the report says "undecided". The same rule
is applied, for information, to mgd and cwd.

Reported is the last epoch's val box AP (COCO, percent), never the best epoch's. A finished cell is never
run again (its JSON in the results folder), so an interrupted plan resumes; ``report.md`` beside the JSONs
holds the tables and the decision.

Plans: ``full`` is the CPU protocol on Fashion-MNIST (too slow for a 2-core CPU); ``gpu`` is what fits the
``pretrained_detection`` step of ``benchmarks/gpu_check.py`` (about 8 minutes of an H100, an estimate), from
the bundled ``fashion-mnist-mini`` (the GPU machine has no Fashion-MNIST); ``quick`` proves the pipeline on
tiny models on the CPU, also from the bundled set.

Usage:
    python benchmarks/pretrained_detection.py --quick                 # tiny models, 1 seed, on the CPU
    python benchmarks/pretrained_detection.py --plan gpu --device cuda --jobs 8 --results R --runs W
    python benchmarks/pretrained_detection.py --report [--plan gpu --results R]

Needs pycocotools.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, key  # noqa: E402
from detection import MGD_TWO_STAGE_ALPHA_SUM, run_cell, train_teacher  # noqa: E402
from pretrained import (  # noqa: E402  (the protocol this one follows)
    TEACHER_LEAD,
    _pretrain_lines,
    arm_table,
    body_of,
    pretrain_body,
)
from segmentation import prepare_data  # noqa: E402

RUNS = ROOT / "benchmarks" / "runs" / "pretrained_detection"
#: The gradient-norm clip of every cell (MGD's Faster R-CNN configs clip at 35).
CLIP_GRAD = 35
#: The loss options of each distilled arm: MGD's two-stage alpha (summed form) for cwt and mgd; MMRazor's CWD.
ARMS = {"none": (), "cwt": ("--reduction", "sum", "--alpha", MGD_TWO_STAGE_ALPHA_SUM),
        "mgd": ("--reduction", "sum", "--alpha", MGD_TWO_STAGE_ALPHA_SUM),
        "cwd": ("--alpha", 10, "--cwd-tau", 1)}
REPORT = "report.md"


@dataclass(frozen=True)
class Plan:
    """Everything that sizes the benchmark (the fields pretrain_body and detection.py's cells read, too)."""

    name: str = "full"
    bodies: tuple[str, ...] = ("resnet18", "resnet50")
    pretrain_data: str = "fashion-mnist"
    pretrain_subset: int | None = None
    pretrain_test: int | None = None
    pretrain_epochs: int = 10
    pretrain_batch: int = 128
    source: str = "fashion-mnist"  # the items of the composited canvases
    teacher: str = "fasterrcnn_resnet50"
    students: tuple[str, ...] = ("fasterrcnn_resnet18",)
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    canvas: int = 128
    train_canvases: int = 400
    val_canvases: int = 100
    epochs: int = 12
    teacher_epochs: int = 16
    batch_size: int = 8
    results: Path = RESULTS / "pretrained_detection"
    runs: Path = RUNS
    device: str = "cpu"

    @property
    def body_runs(self) -> Path:
        """Where the pretrained bodies' runs are cached (git-ignored under the results folder)."""
        return self.results / "bodies"

    def epochs_of(self, student: str) -> int:
        return self.epochs


#: The GPU step's plan, sized from docs/benchmarks.md's H200 numbers (an estimate, not a measurement: a
#: Faster R-CNN R18 step of 65 ms at batch 8 and 128 px, a Mask R-CNN R50 teacher's 10 epochs in 116 s), for
#: about 8 minutes of an H100 with 8 cells at a time: pretrain ~0.5 min, teacher beside the none cells ~2.5,
#: 15 distilled cells in two waves ~4.5. The mini set's 6,000 items make the canvases and the pretrain set.
GPU = Plan(name="gpu", pretrain_data="fashion-mnist-mini", pretrain_epochs=6, source="fashion-mnist-mini",
           epochs=8, teacher_epochs=10, results=RESULTS / "pretrained_detection_gpu", runs=RUNS / "gpu",
           device="cuda")
QUICK = Plan(name="quick", bodies=("test_resnet",), pretrain_data="fashion-mnist-mini", pretrain_epochs=1,
             pretrain_batch=256, source="fashion-mnist-mini", teacher="fasterrcnn_test_resnet",
             students=("fasterrcnn_test_resnet",), seeds=(0,), canvas=64, train_canvases=8, val_canvases=4,
             epochs=1, teacher_epochs=2, batch_size=4, results=RUNS / "quick" / "results", runs=RUNS / "quick")
PLANS = {"full": Plan(), "gpu": GPU, "quick": QUICK}


def cells(plan: Plan) -> list[tuple[str, str, int]]:
    """Every (student, arm, seed), seed by seed, so that a plan cut short keeps whole paired seeds."""
    return [(s, arm, seed) for seed in plan.seeds for s in plan.students for arm in plan.arms]


def queue(plan: Plan, jobs: int = 1) -> list[tuple[str, str, int]]:
    """The cells not yet saved, in :func:`cells`' order; with ``jobs`` > 1 the ``none`` cells first, which need
    no teacher and so train beside it (the distilled cells then follow seed by seed)."""
    todo = [c for c in cells(plan) if not (plan.results / f"{key(*c)}.json").is_file()]
    return sorted(todo, key=lambda cell: cell[1] != "none") if jobs > 1 else todo  # stable within each group


def run_plan(plan: Plan, jobs: int = 1) -> None:
    """Pretrain the bodies, train the teacher, then every cell not yet saved, ``jobs`` at a time.

    Work is queued in order (:func:`queue`) and waits only on work queued before it, so a pool of any size
    cannot deadlock.
    """
    data = prepare_data(plan, source=plan.source)
    todo = queue(plan, jobs)
    failed: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        bodies = {b: pool.submit(pretrain_body, plan, b) for b in plan.bodies}
        teacher = pool.submit(_teacher, plan, data, bodies[body_of(plan.teacher)])
        running = {pool.submit(_cell, plan, data, cell, bodies[body_of(cell[0])],
                               None if cell[1] == "none" else teacher): cell for cell in todo}
        for number, (future, cell) in enumerate(running.items(), 1):
            failed += _outcome(f"[{number}/{len(running)}] {key(*cell)}", future, lambda r: _box(r["scores"]))
        failed += _outcome(f"teacher {plan.teacher}", teacher, lambda r: _box(r["scores"]))
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; rerun to retry them")


def _teacher(plan: Plan, data: Path, body: Future) -> dict:
    return train_teacher(plan, data, extra=("--backbone-weights", body.result(), "--clip-grad", CLIP_GRAD))


def _cell(plan: Plan, data: Path, cell: tuple[str, str, int], body: Future, teacher: Future | None) -> dict:
    """One student cell from its pretrained body, once the body (and for a distilled cell the teacher) exist."""
    student, arm, seed = cell
    weights = body.result()
    if teacher is not None:
        teacher.result()
    clip = ("--clip-grad", CLIP_GRAD)  # an option of train and distill alike, not a --student- one
    return run_cell(plan, data, student, arm, seed, name=key(*cell), distil=(*ARMS[arm], *clip),
                    student_extra=("--backbone-weights", weights, *(clip if arm == "none" else ())))


def _outcome(label: str, future: Future, describe) -> list[str]:
    """Print how ``future`` ended; ``[label]`` if it failed (one broken cell must not lose the others)."""
    try:
        result = future.result()
    except Exception as exc:
        print(f"{label}: FAILED ({type(exc).__name__}: {exc})", flush=True)
        return [label.split("] ")[-1]]
    print(f"{label}: {describe(result)}", flush=True)
    return []


def _box(scores: dict) -> str:
    return f"val box AP {scores['box_ap']:.2f}"


# ----------------------------------------------------------------------------- the report


def load_results(plan: Plan) -> dict[tuple[str, str, int], float]:
    """The saved cells' box AP by (student, arm, seed)."""
    found = {}
    for cell in cells(plan):
        path = plan.results / f"{key(*cell)}.json"
        if path.is_file():
            found[cell] = json.loads(path.read_text())["scores"]["box_ap"]
    return found


def report(plan: Plan) -> str:
    """The bodies, the teacher and its lead, the per-arm table with verdicts, and the decision for CWT."""
    results = load_results(plan)
    table, decision = arm_table(plan, results, "box AP")
    return "\n".join([*_pretrain_lines(plan), *_teacher_lines(plan, results), "", *table, "", decision])


def _teacher_lines(plan: Plan, results: dict) -> list[str]:
    path = plan.results / "teacher.json"
    if not path.is_file():
        return ["Teacher: not trained yet."]
    teacher = json.loads(path.read_text())
    box = teacher["scores"]["box_ap"]
    lines = [f"Teacher {teacher['model']}: val box AP {box:.2f} % after {teacher['epochs']} epochs (per epoch: "
             + ", ".join(f"{h['box_ap']:.1f}" for h in teacher["history"]) + ")."]
    base = [v for (s, a, _), v in results.items() if a == "none" and s == plan.students[0]]
    if base:
        lead = box - sum(base) / len(base)
        lines.append(f"The teacher leads the student baseline ({sum(base) / len(base):.2f}) by {lead:+.2f} box AP"
                     + ("." if lead >= TEACHER_LEAD else f": less than the {TEACHER_LEAD:g} points wanted."))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and data, 1 seed: the pipeline end to end")
    parser.add_argument("--plan", choices=("full", "gpu"), default="full",
                        help="full: the CPU protocol on Fashion-MNIST; gpu: the gpu_check step's (mini set)")
    parser.add_argument("--report", action="store_true", help="print the tables from saved results and exit")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these seeds")
    parser.add_argument("--device", default=None, help="where every run trains (default: the plan's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default: 1)")
    parser.add_argument("--results", type=Path, help="folder of the result JSONs (default: the plan's)")
    parser.add_argument("--runs", type=Path, help="folder of the data and run directories (default: the plan's)")
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else args.plan]
    changes = {"device": args.device, "results": args.results and args.results.resolve(),
               "runs": args.runs and args.runs.resolve(), "seeds": args.seeds and tuple(args.seeds)}
    plan = replace(plan, **{k: v for k, v in changes.items() if v})
    try:
        if not args.report:
            run_plan(plan, args.jobs)
    finally:  # also after a failed cell: what finished is reported
        text = report(plan)
        plan.results.mkdir(parents=True, exist_ok=True)
        (plan.results / REPORT).write_text(text + "\n")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
