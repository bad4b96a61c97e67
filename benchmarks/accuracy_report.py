"""accuracy.py's report: the saved cells summarised per student and method, alpha and hidden width (mean,
sample std and paired per-seed differences), as markdown tables, ``accuracy_summary.json`` and a plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
from accuracy_plan import PAIRS, Plan, teacher_json
from common import RESULTS, ROOT, full_versions, mean_std, relative, write_json

DOCS = ROOT / "docs"


def load_results(plan: Plan) -> list[dict]:
    folder = plan.results / "accuracy"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def seed_stats(values: list[float | None]) -> dict:
    """Mean, sample std and n of the finished runs; ``diverged`` counts the runs whose loss went non-finite."""
    diverged = sum(v is None for v in values)
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": [], "diverged": diverged}
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": values, "diverged": diverged}


def summarise(plan: Plan, records: list[dict]) -> dict:
    """Mean, sample std and n per (student, method), per alpha and per hidden width."""
    def collect(match) -> dict:
        return seed_stats([r["top1"] for r in records if match(r)])

    main = {s: {m: collect(lambda r, s=s, m=m: r["group"] == "main" and r["student"] == s and r["method"] == m)
                for m in plan.methods} for s in plan.students}
    abl = plan.ablation_student
    is_cwt_main = {"group": "main", "student": abl, "method": "cwt"}

    def at_alpha(a: float):
        return lambda r: (r["student"] == abl and r["method"] == "cwt" and r["alpha"] == a and r["hidden"] is None
                          and r["group"] in ("main", "alpha"))

    def at_hidden(h: int):
        return lambda r: (all(r[k] == v for k, v in is_cwt_main.items()) if h == 128 else
                          (r["group"] == "hidden" and r["hidden"] == h))

    alpha = {a: collect(at_alpha(a)) for a in plan.alphas}
    hidden = {h: collect(at_hidden(h)) for h in plan.hiddens}
    # Each ablation run against the baseline and against KD of the same seed (same init, batches, augmentation).
    by_seed = {m: {r["seed"]: r["top1"] for r in records if r["group"] == "main" and r["student"] == abl
                   and r["method"] == m and r["top1"] is not None} for m in ("none", "kd")}
    paired = {"alpha": {a: {m: _paired_to(records, at_alpha(a), ref) for m, ref in by_seed.items()}
                        for a in plan.alphas},
              "hidden": {h: {m: _paired_to(records, at_hidden(h), ref) for m, ref in by_seed.items()}
                         for h in plan.hiddens}}
    gains = {}
    for s in plan.students:
        base = main[s]["none"]
        for m in plan.methods:
            if m != "none" and main[s][m]["n"] and base["n"]:
                diff = main[s][m]["mean"] - base["mean"]
                # standard error of a difference of two independent means (needs 2+ seeds on each side)
                se = (math.sqrt(main[s][m]["std"] ** 2 / main[s][m]["n"] + base["std"] ** 2 / base["n"])
                      if min(main[s][m]["n"], base["n"]) > 1 else None)
                gains.setdefault(s, {})[m] = {"gain": diff, "se": se, "n": main[s][m]["n"], "n_none": base["n"]}
    return {"main": main, "alpha": alpha, "hidden": hidden, "paired_ablations": paired, "gain_over_none": gains,
            "paired_gain_over_none": _paired_gains(plan, records),
            "paired_cwt_minus": {s: {m: {**g, "mean": -g["mean"], "values": [-v for v in g["values"]]}
                                     for m, g in d.items()}
                                 for s, d in _paired_gains(plan, records, reference="cwt").items()}}


def _paired_to(records: list[dict], match, reference: dict[int, float]) -> dict:
    """Per-seed differences between the finished runs ``match`` selects and ``reference`` ({seed: top-1})."""
    return seed_stats([r["top1"] - reference[r["seed"]] for r in records
                   if match(r) and r["top1"] is not None and r["seed"] in reference])


def _paired_gains(plan: Plan, records: list[dict], reference: str = "none") -> dict:
    """Per-seed differences to ``reference``: a seed fixes the student's init, batch order and augmentation,
    so within a seed only the loss differs, and the spread of the differences is the fair ± range."""
    top1 = {(r["student"], r["method"], r["seed"]): r["top1"] for r in records
            if r["group"] == "main" and r["top1"] is not None}
    gains: dict = {}
    for s in plan.students:
        for m in plan.methods:
            if m == reference:
                continue
            diffs = [top1[(s, m, seed)] - top1[(s, reference, seed)] for seed in plan.seeds
                     if (s, m, seed) in top1 and (s, reference, seed) in top1]
            if diffs:
                gains.setdefault(s, {})[m] = seed_stats(diffs)
    return gains


def fmt_stat(stat: dict) -> str:
    """``mean ± std (n=N)`` of finished runs, with how many diverged, or what happened when none finished."""
    diverged = f"; {stat['diverged']} diverged" if stat.get("diverged") else ""
    if not stat["n"]:
        return f"all {stat['diverged']} diverged" if diverged else "not run"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f} (n={stat['n']}{diverged})"


def _fmt_gain(gain: dict | None) -> str:
    if gain is None:
        return "-"
    spread = f" ± {gain['se']:.2f}" if gain["se"] is not None else " (one seed: no ± range)"
    return f"{gain['gain']:+.2f}{spread}"


def markdown(plan: Plan, summary: dict) -> str:
    """The tables: top-1 per method and student, its gains over ``none``, cwt against the others, the ablations."""
    def table(title: str, methods, cell) -> list[str]:  # one row per method, one column per student
        return [f"| {title} | " + " | ".join(plan.students) + " |", "| --- |" + " --- |" * len(plan.students),
                *(f"| {m} | " + " | ".join(cell(s, m) for s in plan.students) + " |" for m in methods)]

    def paired(part: str):  # a cell of the per-seed differences in summary[part]
        return lambda s, m: fmt_paired(summary[part][s][m]) if m in summary[part].get(s, {}) else "-"

    lines = [*table("method", plan.methods, lambda s, m: fmt_stat(summary["main"][s][m])), "",
             *table("gain over none (difference of means ± its standard error)", plan.methods[1:],
                    lambda s, m: _fmt_gain(summary["gain_over_none"].get(s, {}).get(m))), "",
             *table("paired gain over none (mean ± std of per-seed differences)", plan.methods[1:],
                    paired("paired_gain_over_none")), "",
             *table("paired: cwt minus ... (mean ± std of per-seed differences)",
                    [m for m in plan.methods if m != "cwt"], paired("paired_cwt_minus"))]
    paired = summary["paired_ablations"]
    for kind, title in (("alpha", f"cwt alpha ({plan.ablation_student})"),
                        ("hidden", f"cwt hidden width ({plan.ablation_student}, alpha {plan.alpha:g})")):
        lines += ["", f"| {title} | top-1 | paired minus none | paired minus kd |", "| --- | --- | --- | --- |"]
        lines += [f"| {v:g} | {fmt_stat(s)} | {fmt_paired(paired[kind][v]['none'])} | "
                  f"{fmt_paired(paired[kind][v]['kd'])} |" for v, s in summary[kind].items()]
    return "\n".join(lines)


def fmt_paired(stat: dict) -> str:
    """Per-seed differences as ``+mean ± std (n=N)``, or ``-`` when there are none."""
    return f"{stat['mean']:+.2f} ± {stat['std']:.2f} (n={stat['n']})" if stat["n"] else "-"


def plot(plan: Plan, summary: dict, path: Path) -> bool:
    """Accuracy by method with error bars (one panel per student), plus the alpha sweep."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return False
    panels = len(plan.students) + (1 if any(s["n"] for s in summary["alpha"].values()) else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    for ax, student in zip(axes[0], plan.students, strict=False):
        stats = [summary["main"][student][m] for m in plan.methods]
        means = [s["mean"] if s["n"] else np.nan for s in stats]
        ax.bar(range(len(stats)), means, yerr=[s["std"] or 0.0 for s in stats], capsize=4,
               color=["#999999" if m == "none" else "#d62728" if m.startswith("cwt") else "#1f77b4"
                      for m in plan.methods])
        for i, s in enumerate(stats):
            ax.scatter([i] * s["n"], s["values"], color="black", s=8, zorder=3)
        ax.set_xticks(range(len(stats)), plan.methods, rotation=30)
        ends = [v for s in stats if s["n"] for v in (*s["values"], s["mean"] - s["std"], s["mean"] + s["std"])]
        ax.set_ylim(min(ends or [0.0]) - 0.8, max(ends or [100.0]) + 0.5)
        seeds = sorted({s["n"] for s in stats if s["n"]})
        ax.set_title(f"{student}\n(bars: mean ± std over {'/'.join(map(str, seeds))} seeds; dots: seeds)", fontsize=9)
        ax.set_ylabel("test top-1 (%)")
    if panels > len(plan.students):
        ax = axes[0][-1]
        pts = [(a, s) for a, s in summary["alpha"].items() if s["n"]]
        ax.errorbar([a for a, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts],
                    marker="o", capsize=4, color="#d62728", label="cwt")
        for a, s in pts:
            if s.get("diverged"):
                ax.annotate(f"{s['diverged']} of {s['n'] + s['diverged']}\ndiverged", (a, s["mean"] - s["std"]),
                            textcoords="offset points", xytext=(0, -22), ha="center", fontsize=7)
        base = summary["main"][plan.ablation_student]["none"]
        if base["n"]:
            ax.axhline(base["mean"], color="#999999", linestyle="--", label="none (baseline)")
        ax.set_xscale("log")
        ax.set_xlabel("alpha (mean-MSE form)")
        ax.set_title(f"cwt alpha sweep, {plan.ablation_student}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fashion-MNIST test top-1, teacher {plan.teacher}, {plan.train_subset} train images, "
                 f"{plan.epochs} epochs, {plan.input_size} px", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(plan: Plan) -> None:
    records = load_results(plan)
    summary = summarise(plan, records)
    teacher = json.loads(teacher_json(plan).read_text()) if teacher_json(plan).is_file() else None
    write_json(plan.results / "accuracy_summary.json",
                {"plan": {k: (relative(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
                 "pairs": PAIRS, "teacher": teacher, "cells": len(records), **summary, "versions": full_versions()})
    if teacher:
        print(f"teacher {teacher['model']}: {teacher['top1']:.2f}% top-1 ({teacher['command']})")
    print(markdown(plan, summary))
    png = DOCS / "benchmarks_accuracy.png" if plan.name == "full" and plan.results == RESULTS \
        else plan.results / "accuracy.png"
    if plot(plan, summary, png):
        print(f"plot: {relative(png)}")
