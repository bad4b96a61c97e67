"""``--alpha auto`` against a fair alpha sweep for cwt, linear and MGD (issue 13), on the accuracy benchmark.

Reuses ``benchmarks/accuracy.py`` (same data, teacher, pairs, schedule, seeds and result files): every
cell (student, method, alpha, seed) writes ``benchmarks/results/accuracy/<cell>.json`` and is skipped
when that file exists, so the grid resumes, and the cwt sweep already run there is reused. ``auto``
cells (key ``...-aauto``) record the alpha the run picked as ``alpha_used``.

The report compares, per student and method, ``auto`` with the best swept alpha (the highest mean
top-1 over seeds), as the mean ± std of the per-seed differences (paired: a seed fixes the init,
batches and augmentation), and with the baseline of the same seed.

Usage:
    python benchmarks/alpha.py --quick          # smoke: one student, cwt at alpha 7 and auto, 1 seed (~2 min)
    python benchmarks/alpha.py --jobs 2         # the whole grid (resumable), then the report
    python benchmarks/alpha.py --report         # only the report, from the saved results
    python benchmarks/alpha.py --probe          # what the rule measures and picks, per student and method
    python benchmarks/alpha.py --device cuda --jobs 10 --students mobilenetv1_100 --alphas 0.5,2,7 --results DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (the benchmark this one extends)
from accuracy_plan import PAIRS, Cell, Plan  # noqa: E402
from accuracy_report import fmt_paired, fmt_stat, load_results, seed_stats  # noqa: E402
from common import write_json  # noqa: E402

FEATURE_METHODS = ("cwt", "linear", "mgd")
ALPHAS = (0.5, 2.0, 7.0, 20.0, 50.0, 200.0)
FULL = Plan(methods=("none", *FEATURE_METHODS), alphas=ALPHAS)
QUICK = replace(accuracy.QUICK, methods=("none", "cwt"), alphas=(7.0,))


def grid(plan: Plan, sweep: bool = True) -> list[Cell]:
    """Baselines and ``auto`` for every seed first, then the sweep seed by seed (a grid cut short still pairs)."""
    methods = [m for m in plan.methods if m != "none"]
    cells = []
    for seed in plan.seeds:
        for student in plan.students:
            cells.append(Cell("main", student, "none", seed))
            cells += [Cell("auto", student, method, seed, alpha="auto") for method in methods]
    for seed in plan.seeds if sweep else ():
        for student in plan.students:
            for method in methods:
                cells += [Cell("alpha", student, method, seed, alpha=a) for a in plan.alphas]
    return cells


def summarise(plan: Plan, records: list[dict]) -> dict:
    """Per student and method: top-1 per alpha, the best swept alpha, auto's picks and its paired differences."""
    top1 = {(r["student"], r["method"], r["alpha"] if r["method"] != "none" else None, r["seed"]): r
            for r in records if r.get("hidden") is None}
    out: dict = {}
    for s in plan.students:
        base = {seed: top1[(s, "none", None, seed)]["top1"] for seed in plan.seeds if (s, "none", None, seed) in top1}
        for m in (m for m in plan.methods if m != "none"):
            runs = {a: {seed: top1[(s, m, a, seed)] for seed in plan.seeds if (s, m, a, seed) in top1}
                    for a in (*plan.alphas, "auto")}
            swept = {a: seed_stats([r["top1"] for r in runs[a].values()]) for a in plan.alphas}
            finished = {a: st for a, st in swept.items() if st["n"] and not st["diverged"]}
            best = max(finished, key=lambda a: finished[a]["mean"]) if finished else None
            auto = runs["auto"]
            out.setdefault(s, {})[m] = {
                "swept": swept, "best_alpha": best, "auto": seed_stats([r["top1"] for r in auto.values()]),
                "auto_picked": {seed: r.get("alpha_used") for seed, r in auto.items()},
                "auto_minus_best": _paired(auto, runs[best]) if best is not None else seed_stats([]),
                "auto_minus_default": _paired(auto, runs[7.0]) if 7.0 in runs else seed_stats([]),
                "auto_minus_none": seed_stats([r["top1"] - base[seed] for seed, r in auto.items()
                                           if r["top1"] is not None and seed in base]),
            }
    return out


def _paired(runs: dict[int, dict], reference: dict[int, dict]) -> dict:
    """Per-seed differences of the finished runs in both."""
    return seed_stats([r["top1"] - reference[seed]["top1"] for seed, r in runs.items()
                   if seed in reference and r["top1"] is not None and reference[seed]["top1"] is not None])


def markdown(plan: Plan, summary: dict) -> str:
    """One table per student: the sweep, the best alpha, and auto."""
    lines = []
    for s, methods in summary.items():
        lines += [f"| {s} | " + " | ".join(f"alpha {a:g}" for a in plan.alphas)
                  + " | best | auto (picked) | auto minus best | auto minus alpha 7 | auto minus none |",
                  "| --- |" + " --- |" * (len(plan.alphas) + 5)]
        for m, row in methods.items():
            picked = ", ".join(f"{v:.3g}" for v in row["auto_picked"].values() if v is not None) or "-"
            best = row["best_alpha"] if row["best_alpha"] is not None else "-"
            paired = " | ".join(fmt_paired(row[f"auto_minus_{k}"]) for k in ("best", "default", "none"))
            lines.append(f"| {m} | " + " | ".join(fmt_stat(row["swept"][a]) for a in plan.alphas)
                         + f" | {best} | {fmt_stat(row['auto'])} ({picked}) | {paired} |")
        lines.append("")
    return "\n".join(lines)


def report(plan: Plan) -> None:
    summary = summarise(plan, load_results(plan))
    write_json(plan.results / "alpha_summary.json", {"students": plan.students, "alphas": plan.alphas, **summary})
    print(markdown(plan, summary))


def probe(plan: Plan, batches: int = 5) -> dict:
    """What ``--alpha auto`` measures and picks on the benchmark's first training batches (no training)."""
    import timm
    import torch

    from cwkd.core.autoalpha import MAX_LOSS_RATIO, RATIO, measure, pick_alpha
    from cwkd.core.distiller import FeatureDistiller
    from cwkd.data.loading import build_loaders
    from cwkd.data.transforms import data_config
    from cwkd.tasks.classification.data import load_data
    from cwkd.training.build import build_teacher
    from cwkd.training.config import TrainConfig

    student_root, teacher_root = accuracy.prepare_data(plan)
    accuracy.train_teacher(plan, teacher_root)
    spec = load_data("fashion-mnist", root=str(student_root))
    teacher_ckpt = str(plan.runs / "teacher" / "last.safetensors")
    norm = accuracy.teacher_normalization(plan.teacher, plan.input_size)
    rows = {}
    for name in FULL.students:  # both students, also with --quick (its smaller teacher)
        cfg = TrainConfig(data="fashion-mnist", student=name, teacher=teacher_ckpt, in_chans=1)
        teacher, _ = build_teacher(cfg, spec.num_classes, 1)
        for method in FEATURE_METHODS:
            for reduction in ("mean", "sum"):
                torch.manual_seed(0)
                student = timm.create_model(name, num_classes=spec.num_classes, in_chans=1)
                dcfg = data_config(student, input_size=plan.input_size, in_chans=1, **norm)
                loader, _ = build_loaders(spec, dcfg, batch_size=plan.batch_size, workers=0, seed=0)
                data = [b for _, b in zip(range(batches), loader, strict=False)]
                d = FeatureDistiller(teacher, student, pairs=PAIRS[name], method=method, alpha="auto",
                                     input_size=plan.input_size, reduction=reduction)
                picked = pick_alpha(d, data)
                per_batch = measure(d, data)
                rows[f"{name}/{method}/{reduction}"] = {**asdict(picked), "ratios": [
                    r["grad_task"] / r["grad_feat"] for r in per_batch]}
                print(f"{name:22s} {method:6s} {reduction:4s} {picked.line()}; loss task {picked.task_loss:.3g} "
                      f"feat {picked.feat_loss:.3g}", flush=True)
    teacher = json.loads(accuracy.teacher_json(plan).read_text())
    write_json(accuracy.RESULTS / "alpha_probe.json",  # committed: it names the plan and teacher it measured
                {"plan": plan.name, "batches": batches, "batch_size": plan.batch_size, "ratio": RATIO,
                 "max_loss_ratio": MAX_LOSS_RATIO,
                 "teacher": {k: teacher[k] for k in ("model", "top1", "epochs", "train_images")}, "rows": rows})
    return rows


def _subset(given: str, known: tuple[str, ...], option: str) -> list[str]:
    names = [n.strip() for n in given.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"error: {option}: unknown {', '.join(unknown) or '(none given)'}; use {', '.join(known)}")
    return names


def _alphas(given: str) -> tuple[float, ...]:
    try:
        alphas = tuple(float(a) for a in given.split(",") if a.strip())
    except ValueError:
        raise SystemExit(f"error: --alphas: {given!r} is not a comma-separated list of numbers, e.g. 0.5,2,7") from None
    if not alphas or min(alphas) <= 0:
        raise SystemExit(f"error: --alphas: {given!r}: give one or more positive numbers, e.g. 0.5,2,7")
    return alphas


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke: one student, cwt at alpha 7 and auto, 1 seed")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    parser.add_argument("--seeds", type=int, default=None, help="use only the first N seeds")
    parser.add_argument("--students", default=None, help="comma-separated subset of the students (default: both)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of cwt,linear,mgd (default: all)")
    parser.add_argument("--no-sweep", action="store_true", help="only the baselines and the auto cells")
    parser.add_argument("--report", action="store_true", help="only summarise the saved results")
    parser.add_argument("--probe", action="store_true", help="what auto measures and picks (no training)")
    parser.add_argument("--alphas", default=None, help="comma-separated alphas of the sweep (default: "
                        f"{','.join(f'{a:g}' for a in ALPHAS)})")
    accuracy.add_device_options(parser)
    args = parser.parse_args(argv)
    plan = accuracy.with_device_options(QUICK if args.quick else FULL, args)
    if args.alphas:
        plan = replace(plan, alphas=_alphas(args.alphas))
    if args.seeds is not None:
        plan = replace(plan, seeds=plan.seeds[:args.seeds])
    if args.students:
        plan = replace(plan, students=tuple(_subset(args.students, plan.students, "--students")))
    if args.methods:
        plan = replace(plan, methods=("none", *_subset(args.methods, FEATURE_METHODS, "--methods")))
    if args.probe:
        probe(plan)
        return
    if not args.report:
        cells = grid(plan, sweep=not args.no_sweep)
        accuracy.run_grid(plan, cells, max(1, args.jobs))
    report(plan)


if __name__ == "__main__":
    main()
