"""Segmentation in the paper's setting, shrunk to fit: pretrained bodies, a converged teacher, 5 seeds (issue 24).

Every earlier dense benchmark started its bodies from scratch, with teachers barely ahead of their students.
The paper's students and teachers all start from ImageNet-pretrained backbones; this benchmark does the same
with Fashion-MNIST as the ImageNet stand-in:

1. Pretrain: each body (``resnet18``, ``resnet50``) is trained for classification on the Fashion-MNIST
   training set (all 60,000 images, one epoch; ``cwkd train --in-chans 3``). The runs are cached, resumable, under
   ``benchmarks/results/pretrained/bodies/`` (git-ignored: regenerated on demand) and their
   ``last.safetensors`` start every dense model below.
2. Teacher: a PSPNet-R50 on the composited segmentation canvases of ``benchmarks/segmentation.py`` (real
   Fashion-MNIST items, background + 10 classes), started from the R50 body (``--backbone-weights``) and
   fine-tuned for 8 epochs (the report prints its history: whether its mIoU had stopped rising). It should be
   clearly ahead of the student baseline (at least :data:`TEACHER_LEAD` mIoU); the report says so when not.
3. Students: a PSPNet-R18 from the R18 body (``--student-backbone-weights``), 5 seeds, 8 epochs, arms (run
   in :func:`cell_order`: ``none`` and ``cwt`` seed by seed first, then each other arm's 5 seeds):

       none       the student alone (the baseline every gain is paired with, seed by seed)
       cwt        the paper's channel-wise transform at MGD's segmentation alpha converted to the mean form
       cwt-auto   the same with ``--alpha auto``
       mgd        masked generative distillation at the same alpha (cwkd's MGD, as the CLI implements it)
       cwd        channel-wise distillation (Shu et al. 2021) as MMRazor's PSPNet R101 -> R18 config does it:
                  on the logits (the head's last conv, :data:`CWD_PAIRS`), tau 1, loss weight 5
       cwt+kd     cwt plus pixel-wise logit KD (``--kd-weight`` :data:`KD_WEIGHT`, temperature 4)

Decision rule, fixed before any run: **CWT pays if its paired gain over ``none`` (the ``cwt`` arm, at the
converted MGD alpha) is positive in at least 4 of 5 seeds and its mean is at least 1 mIoU with a 95 %
interval above 0** (Student's t over the 5 paired gains). Otherwise it did not pay, and the report says
which condition failed. The same rule is applied, for information, to every other arm.

Reported is the last epoch's val mIoU (the cosine schedule ends at lr 0), never the best epoch's. Results
go to ``benchmarks/results/pretrained/<key>.json`` and a finished cell is never run again, so an interrupted
plan resumes; run directories go to ``benchmarks/runs/pretrained`` (git-ignored) and are deleted once their
result is written, except the teacher's. The data, the cell runner and the tables are segmentation's.

Usage:
    python benchmarks/pretrained.py --quick      # tiny bodies, data and schedule, 1 seed: proves the pipeline
    python benchmarks/pretrained.py              # the whole plan (~95 min of 2 idle cores for none + cwt)
    python benchmarks/pretrained.py --arms none cwt   # only the arms the decision needs
    python benchmarks/pretrained.py --report     # tables and the decision from the saved results
    python benchmarks/pretrained.py --size       # the step times the plan is sized from
    python benchmarks/pretrained.py --results benchmarks/results/pretrained_rerun   # a separate replicate

Needs the Debian package ``dataset-fashion-mnist`` (or the IDX files under $CWKD_DATA).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from cwkd.compare import t975  # the 95 % t quantile `cwkd compare` uses

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, fmt_mean_std, key, run_in, versions, write_json  # noqa: E402
from segmentation import (  # noqa: E402  (the benchmark this one follows)
    MGD_SEG_ALPHA_SUM,
    prepare_data,
    run_cell,
    teacher_alpha,
    train_teacher,
)

RUNS = ROOT / "benchmarks" / "runs" / "pretrained"
#: How far ahead of the student baseline the teacher should be (mIoU points) for the comparison to mean much.
TEACHER_LEAD = 4.0
#: The decision rule: seeds, of which at least this many positive, a mean gain of at least this (mIoU), 95 % CI.
RULE_SEEDS, RULE_POSITIVE, RULE_MEAN = 5, 4, 1.0
#: Weight of the pixel-wise logit KD in the cwt+kd arm (a guess: no reference setting uses this exact term).
KD_WEIGHT = 1.0
#: The CWD arm, as MMRazor's cwd_logits_pspnet_r101_d8_pspnet_r18_d8 config: the logits (mmseg's
#: decode_head.conv_seg; cwkd's PSPNet calls the head's last conv head.bottleneck.4), tau 1, loss weight 5.
CWD_PAIRS, CWD_WEIGHT = "head.bottleneck.4:head.bottleneck.4", "5"
#: Training images of each pretrain data set (all of them are used unless a plan asks for a subset).
PRETRAIN_IMAGES = {"fashion-mnist": 60000, "fashion-mnist-mini": 6000}


@dataclass(frozen=True)
class Arm:
    """One way to train the student: the CLI method, its alpha, logit KD, and its layer pairs."""

    name: str
    method: str
    alpha: str | None = "mgd"   # "mgd": the converted MGD alpha; "auto"; a number; None: the method's default
    kd_weight: float = 0.0
    pairs: str | None = None    # None: the task's own (the last backbone stage)


ARMS = {a.name: a for a in (Arm("none", "none", None), Arm("cwt", "cwt"), Arm("cwt-auto", "cwt", "auto"),
                            Arm("mgd", "mgd"), Arm("cwd", "cwd", CWD_WEIGHT, pairs=CWD_PAIRS),
                            Arm("cwt+kd", "cwt", kd_weight=KD_WEIGHT))}
#: The arms the decision rule compares (run first, seed by seed); the others are for information.
DECISION_ARMS = ("none", "cwt")


@dataclass(frozen=True)
class Plan:
    """Everything that sizes the benchmark; ``--quick`` is a smaller one.

    The full plan is sized for about 95 minutes of 2 idle CPU cores from the step times ``--size`` measures
    (docs/benchmarks.md gives them): one pretrain epoch on all
    60,000 images (~15 min for both bodies), a teacher of 8 epochs (~13 min), then cells of 8 epochs on 480
    canvases (~5 min a baseline, ~8 a distilled cell). The epoch counts themselves are guesses, not tuned.
    """

    name: str = "full"
    bodies: tuple[str, ...] = ("resnet18", "resnet50")
    pretrain_subset: int | None = None  # class-balanced training images; None: all 60,000
    pretrain_test: int | None = None    # test images scored after each pretrain epoch; None: all 10,000
    pretrain_epochs: int = 1
    pretrain_batch: int = 128
    pretrain_data: str = "fashion-mnist"  # or the bundled fashion-mnist-mini (no subset then)
    device: str = "cpu"                   # where the pretrain runs train
    teacher: str = "pspnet_resnet50"
    students: tuple[str, ...] = ("pspnet_resnet18",)
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    canvas: int = 64
    train_canvases: int = 480
    val_canvases: int = 300
    epochs: int = 8
    teacher_epochs: int = 8
    batch_size: int = 16
    lr: float = 0.01  # fine-tuning from pretrained bodies: a fifth of the from-scratch benchmark's 0.05
    results: Path = RESULTS / "pretrained"
    runs: Path = RUNS

    @property
    def body_runs(self) -> Path:
        """Where the pretrained bodies' runs are cached (git-ignored under the results folder)."""
        return self.results / "bodies"


QUICK = Plan(name="quick", bodies=("test_resnet",), pretrain_subset=300, pretrain_test=100, pretrain_epochs=1,
             pretrain_batch=64, teacher="pspnet_test_resnet", students=("pspnet_test_resnet",), seeds=(0,),
             canvas=48, train_canvases=16, val_canvases=8, epochs=1, teacher_epochs=1, batch_size=8,
             results=RUNS / "quick" / "results", runs=RUNS / "quick")


def body_of(model: str) -> str:
    """The timm body of a ``<head>_<timm name>`` model (``pspnet_resnet18``, ``fasterrcnn_resnet18``)."""
    return model.partition("_")[2]


def pretrain_body(plan: Plan, body: str) -> Path:
    """Train ``body`` for classification on Fashion-MNIST unless cached; return its weights file."""
    out = plan.body_runs / body
    weights, done = out / "last.safetensors", out / "pretrain.json"
    if done.is_file() and weights.is_file():
        return weights
    data = ["--data", plan.pretrain_data]
    if plan.pretrain_subset is not None:  # a class-balanced subset, written as IDX files (accuracy.py's)
        from accuracy_data import prepare_data as fmnist_subset

        sizes = SimpleNamespace(train_subset=plan.pretrain_subset, teacher_subset=plan.pretrain_subset,
                                test_subset=plan.pretrain_test, runs=plan.runs)
        data += ["--data-root", fmnist_subset(sizes, teacher=False)[0]]
    history = run_in(out, ["train", "--model", body, *data, "--in-chans", 3, "--epochs", plan.pretrain_epochs,
                           "--batch-size", plan.pretrain_batch, "--workers", 0, "--seed", 0, "--device", plan.device,
                           "--quiet"])
    write_json(done, {"body": body, "top1": history[-1]["val_top1"], "history": [h["val_top1"] for h in history],
                      "epochs": plan.pretrain_epochs, "data": plan.pretrain_data,
                      "images": plan.pretrain_subset or PRETRAIN_IMAGES[plan.pretrain_data],
                      "wall_s": round(sum(h["epoch_s"] for h in history), 1), "versions": versions()})
    return weights


def run_plan(plan: Plan) -> None:
    """Pretrain the bodies, train the teacher, then every (seed, arm) cell not yet saved."""
    weights = {body: pretrain_body(plan, body) for body in plan.bodies}
    data = prepare_data(plan)
    teacher = train_teacher(plan, data, extra=("--backbone-weights", weights[body_of(plan.teacher)]))
    print(f"teacher {plan.teacher}: val mIoU {teacher['miou']:.2f}", flush=True)
    alpha, _ = teacher_alpha(plan)
    cells = [(student, seed, ARMS[arm]) for student, arm, seed in cell_order(plan)]
    for number, (student, seed, arm) in enumerate(cells, 1):
        name = key(student, arm.name, seed)
        if (plan.results / f"{name}.json").is_file():
            continue
        body = ("--backbone-weights", weights[body_of(student)])
        extra = (*(("--kd-weight", arm.kd_weight) if arm.kd_weight else ()),
                 *(("--pairs", arm.pairs) if arm.pairs else ()))
        result = run_cell(plan, data, student, arm.method, seed, alpha if arm.alpha == "mgd" else arm.alpha,
                          name=name, extra=extra, student_extra=body)
        print(f"[{number}/{len(cells)}] {name}: val mIoU {result['miou']:.2f}", flush=True)


def cell_order(plan: Plan) -> list[tuple[str, str, int]]:
    """Every (student, arm, seed): first the arms the decision needs (:data:`DECISION_ARMS`) seed by seed, so
    that a plan cut short keeps whole paired seeds, then each other arm with all its seeds before the next, so
    that it keeps whole rows."""
    first = [a for a in plan.arms if a in DECISION_ARMS]
    rest = [a for a in plan.arms if a not in DECISION_ARMS]
    return ([(s, a, seed) for s in plan.students for seed in plan.seeds for a in first]
            + [(s, a, seed) for s in plan.students for a in rest for seed in plan.seeds])


# ----------------------------------------------------------------------------- the decision and the report


@dataclass(frozen=True)
class Verdict:
    """The decision rule applied to one arm's paired gains (mIoU points, one per seed)."""

    gains: tuple[float, ...]
    mean: float
    low: float
    high: float
    positive: int
    pays: bool | None  # None: fewer seeds than the rule needs
    reason: str


def decide(gains: list[float], seeds: int = RULE_SEEDS) -> Verdict:
    """The rule: positive in at least 4 of 5 seeds, mean at least 1 mIoU, 95 % interval above 0.

    Example:
        >>> decide([1.5, 2.0, 0.8, 1.2, -0.1]).pays
        True
    """
    n = len(gains)
    mean = statistics.fmean(gains) if gains else math.nan
    half = t975(n - 1) * statistics.stdev(gains) / math.sqrt(n) if n > 1 else math.inf
    positive = sum(g > 0 for g in gains)
    fails = [text for ok, text in ((positive >= RULE_POSITIVE, f"positive in {positive} of {n} seeds, not "
                                    f"{RULE_POSITIVE}"), (mean >= RULE_MEAN, f"mean {mean:+.2f} < {RULE_MEAN:g}"),
                                   (mean - half > 0, f"95 % interval reaches {mean - half:+.2f}")) if not ok]
    if n < seeds:
        return Verdict(tuple(gains), mean, mean - half, mean + half, positive, None,
                       f"undecided: {n} of the {seeds} paired seeds the rule needs")
    reason = (f"pays: {positive}/{n} positive, mean {mean:+.2f}, 95 % interval above 0" if not fails
              else "does not pay: " + "; ".join(fails))
    return Verdict(tuple(gains), mean, mean - half, mean + half, positive, not fails, reason)


def load_results(plan: Plan) -> dict[tuple[str, str, int], dict]:
    """The saved cells by (student, arm, seed)."""
    found = {}
    for student in plan.students:
        for arm in plan.arms:
            for seed in plan.seeds:
                path = plan.results / f"{key(student, arm, seed)}.json"
                if path.is_file():
                    found[(student, arm, seed)] = json.loads(path.read_text())
    return found


def report(plan: Plan) -> str:
    """The teacher and baseline lines, the per-arm table with its verdicts, and the decision for CWT."""
    results = load_results(plan)
    table, decision = arm_table(plan, {cell: r["miou"] for cell, r in results.items()}, "mIoU")
    return "\n".join([*_pretrain_lines(plan), *_teacher_lines(plan, results), "", *table, "", decision,
                      *_epoch_times(plan, results)])


def _epoch_times(plan: Plan, results: dict[tuple[str, str, int], dict]) -> list[str]:
    """Each arm's median epoch time over its saved cells: what an arm costs next to ``none``. Wall clock of
    whatever else the machine ran meanwhile, so a ratio, not a speed measurement."""
    times = {arm: [t for (_, a, _), r in results.items() if a == arm for t in r.get("epoch_s", [])]
             for arm in plan.arms}
    parts = [f"{arm} {statistics.median(ts):.0f}" for arm, ts in times.items() if ts]
    return [f"Median epoch time per arm (s, wall clock on the machine that ran the cells): {', '.join(parts)}."] \
        if parts else []


def arm_table(plan, scores: dict[tuple[str, str, int], float], metric: str) -> tuple[list[str], str]:
    """The per-arm markdown table of ``scores`` by (student, arm, seed), each arm's gains paired by seed with
    ``none`` and judged by the rule, and the rule and its decision for CWT (``cwt`` on the first student)."""
    lines = [f"| student | arm | runs | val {metric} (%) mean ± std | paired gain | 95 % interval | positive "
             "| verdict |", "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    decision = "CWT: no results yet"
    for student in plan.students:
        for arm in plan.arms:
            values = [scores[(student, arm, s)] for s in plan.seeds if (student, arm, s) in scores]
            if not values or arm == "none":
                lines.append(f"| {student} | {arm} | {len(values)} | "
                             f"{fmt_mean_std(values) if values else 'not run yet'} | | | | |")
                continue
            gains = [scores[(student, arm, s)] - scores[(student, "none", s)] for s in plan.seeds
                     if (student, arm, s) in scores and (student, "none", s) in scores]
            verdict = decide(gains) if gains else None
            lines.append(_arm_row(student, arm, values, verdict))
            if arm == "cwt" and student == plan.students[0] and verdict is not None:
                decision = f"CWT ({student}, {metric}): {verdict.reason}"
    rule = (f"Decision rule: {RULE_POSITIVE} of {RULE_SEEDS} seeds positive, mean at least {RULE_MEAN:g} {metric}, "
            "95 % interval above 0.")
    return lines, f"{rule}\n{decision}"


def _arm_row(student: str, arm: str, values: list[float], verdict: Verdict | None) -> str:
    if verdict is None:
        return f"| {student} | {arm} | {len(values)} | {fmt_mean_std(values)} | no paired baseline | | | |"
    interval = f"[{verdict.low:+.2f}, {verdict.high:+.2f}]" if math.isfinite(verdict.low) else "-"
    return (f"| {student} | {arm} | {len(values)} | {fmt_mean_std(values)} | {verdict.mean:+.2f} | {interval} | "
            f"{verdict.positive}/{len(verdict.gains)} | {verdict.reason} |")


def _pretrain_lines(plan: Plan) -> list[str]:
    lines = []
    for body in plan.bodies:
        path = plan.body_runs / body / "pretrain.json"
        if path.is_file():
            r = json.loads(path.read_text())
            lines.append(f"Body {body}: Fashion-MNIST top-1 {r['top1']:.2f} % after {r['epochs']} epochs on "
                         f"{r['images']} images.")
    return lines


def _teacher_lines(plan: Plan, results: dict) -> list[str]:
    path = plan.results / "teacher.json"
    if not path.is_file():
        return ["Teacher: not trained yet."]
    teacher = json.loads(path.read_text())
    lines = [f"Teacher {teacher['model']}: val mIoU {teacher['miou']:.2f} % after {teacher['epochs']} epochs "
             f"(per epoch: {', '.join(f'{v:.1f}' for v in teacher['history'])})."]
    base = [r for (s, a, _), r in results.items() if a == "none" and s == plan.students[0]]
    if base:
        baseline = statistics.fmean(r["miou"] for r in base)
        lead = teacher["miou"] - baseline
        lines.append(f"The teacher leads the student baseline ({baseline:.2f}) by {lead:+.2f} mIoU"
                     + ("." if lead >= TEACHER_LEAD else f": less than the {TEACHER_LEAD:g} points wanted, so a "
                        "small gain from distillation is no surprise."))
        if all(len(r["history"]) > 1 for r in base):
            rising = statistics.fmean(r["history"][-1] - r["history"][-2] for r in base)
            lines.append(f"The baseline's last epoch changed its mIoU by {rising:+.2f} on average (near 0: "
                         "flattened).")
    return lines


def step_times(plan: Plan, repeats: int = 3) -> dict[str, float]:
    """Seconds per step of the plan's models on this machine (after one warm-up step): what the plan is sized
    from. A pretrain train step, a dense train step, and the teacher's forward (what distillation adds)."""
    import time

    import timm
    import torch

    from cwkd.tasks.segmentation.models import create_segmentation_model

    def seconds(model, x, train: bool) -> float:
        model.train(train)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        times = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            with torch.set_grad_enabled(train):
                out = model(x)
            if train:
                (out["out"] if isinstance(out, dict) else out).float().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
        return statistics.fmean(times[1:])

    torch.manual_seed(0)
    pixels, canvas = torch.randn(plan.pretrain_batch, 3, 28, 28), torch.randn(plan.batch_size, 3, plan.canvas,
                                                                                plan.canvas)
    found = {f"pretrain {b} (batch {plan.pretrain_batch}, 28 px)": seconds(timm.create_model(b, num_classes=10),
                                                                           pixels, True) for b in plan.bodies}
    for model in dict.fromkeys((*plan.students, plan.teacher)):
        found[f"train {model} (batch {plan.batch_size}, {plan.canvas} px)"] = seconds(
            create_segmentation_model(model, num_classes=11), canvas, True)
    found[f"forward {plan.teacher}"] = seconds(create_segmentation_model(plan.teacher, num_classes=11), canvas,
                                               False)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny plan that proves the pipeline end to end")
    parser.add_argument("--report", action="store_true", help="print the tables from saved results and exit")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these seeds")
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), help="run (and report) only these arms")
    parser.add_argument("--size", action="store_true", help="time one step of each model the plan trains, "
                        "the numbers it is sized from, and exit")
    parser.add_argument("--results", type=Path, help="save and read results (and the bodies) in this folder "
                        "instead: a separate replicate, with its own data, teacher and run directories under "
                        "benchmarks/runs/pretrained/<folder name>")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.results:
        plan = replace(plan, results=args.results.resolve(), runs=plan.runs / args.results.name)
    if args.seeds:
        plan = replace(plan, seeds=tuple(args.seeds))
    if args.arms:
        plan = replace(plan, arms=tuple(a for a in ARMS if a in args.arms))
    if args.size:
        for what, took in step_times(plan).items():
            print(f"{what}: {took:.2f} s a step")
        return 0
    if not args.report:
        print(f"alpha: MGD's segmentation {MGD_SEG_ALPHA_SUM:g} (summed form), converted for the teacher's map")
        run_plan(plan)
    print(report(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
