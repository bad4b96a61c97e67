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
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "benchmarks" / "runs"
DOCS = ROOT / "docs"
FMNIST_TEST = 10000  # images in Fashion-MNIST's test split
INSTALL_HINT = ("Fashion-MNIST not found: run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the "
                "four IDX files in a folder and set CWKD_DATA to it")

#: The distilled pair per student at 32 px: reduction 8, 4x4 maps (from `cwkd inspect ... --pairs all`).
PAIRS = {
    "mobilenetv3_small_050": "blocks.1:layer2",   # 16x4x4  -> 128x4x4
    "mobilenetv1_100": "blocks.2:layer2",         # 256x4x4 -> 128x4x4
}
#: Method label -> (cwkd method, uses the feature loss, logit-KD weight).
METHODS = {
    "none": ("none", False, 0.0),
    "kd": ("none", False, 1.0),
    "linear": ("linear", True, 0.0),
    "cwt": ("cwt", True, 0.0),
    "cwt+kd": ("cwt", True, 1.0),
    "mgd": ("mgd", True, 0.0),
}


@dataclass(frozen=True)
class Plan:
    """Everything that sizes the benchmark; ``--quick`` is a smaller one."""

    name: str = "full"
    teacher: str = "resnet18"
    students: tuple[str, ...] = ("mobilenetv3_small_050", "mobilenetv1_100")
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    input_size: int = 32
    train_subset: int = 5000      # class-balanced images the students train on
    teacher_subset: int = 10000   # a superset of the students' subset
    test_subset: int | None = None  # None: the full 10k test split
    epochs: int = 5
    teacher_epochs: int = 4
    batch_size: int = 64
    alpha: float = 7.0
    kd_temperature: float = 4.0
    ablation_student: str = "mobilenetv3_small_050"
    alphas: tuple[float, ...] = (0.5, 2.0, 7.0, 20.0, 50.0, 200.0)
    hiddens: tuple[int, ...] = (32, 128, 512)   # 128 = the teacher's channels, cwkd's default
    ablation_seeds: tuple[int, ...] = (0, 1, 2)
    results: Path = RESULTS
    runs: Path = RUNS
    device: str = "cpu"


QUICK = Plan(name="quick", students=("mobilenetv3_small_050",), methods=("none", "cwt"), seeds=(0,),
             train_subset=1000, teacher_subset=2000, test_subset=2000, epochs=2, teacher_epochs=1,
             alphas=(), hiddens=(), ablation_seeds=(), results=RUNS / "quick" / "results", runs=RUNS / "quick")


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    group: str          # main, alpha or hidden
    student: str
    method: str         # a METHODS label
    seed: int
    alpha: float = 0.0
    hidden: int | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        parts = [self.student, self.method.replace("+", "_"), f"s{self.seed}"]
        if METHODS[self.method][1]:
            parts.append(f"a{self.alpha:g}" if isinstance(self.alpha, int | float) else f"a{self.alpha}")  # a7, aauto
        if self.hidden is not None:
            parts.append(f"h{self.hidden}")
        return "-".join(parts)


# ----------------------------------------------------------------------------- data


def prepare_data(plan: Plan, teacher: bool = True) -> tuple[Path, Path]:
    """Write the seeded, class-balanced subsets as IDX files; return (student root, teacher root).

    The teacher's subset is written only when ``teacher`` is set, and Fashion-MNIST is read only when a subset
    is missing (its ``done`` file), so a machine given the subsets and the trained teacher needs no IDX files.
    """
    test_count = plan.test_subset or FMNIST_TEST
    roots = [plan.runs / "data" / f"fmnist-train{size}-test{test_count}"
             for size in (plan.train_subset, plan.teacher_subset)]
    wanted = roots if teacher else roots[:1]
    if all((root / "done").is_file() for root in wanted):
        return roots[0], roots[1]
    _write_subsets(plan, wanted)
    return roots[0], roots[1]


def _write_subsets(plan: Plan, roots: list[Path]) -> None:
    """Write the missing subsets among ``roots`` (student first, then teacher) from the Fashion-MNIST IDX files."""
    from cwkd.tasks.classification.data import find_fashion_mnist, read_idx

    files = find_fashion_mnist(None)
    if files is None:
        print(INSTALL_HINT, file=sys.stderr)
        raise SystemExit(1)
    x, y = read_idx(files["x_train"]), read_idx(files["y_train"])
    x_test, y_test = read_idx(files["x_val"]), read_idx(files["y_val"])
    order = _balanced_order(y, seed=0)  # the student subset is a prefix of the teacher's: a superset
    test_idx = np.arange(len(y_test)) if plan.test_subset is None else _balanced_order(y_test, 0)[:plan.test_subset]
    for size, root in zip((plan.train_subset, plan.teacher_subset), roots, strict=False):
        idx = np.sort(order[:size])
        if not (root / "done").is_file():
            root.mkdir(parents=True, exist_ok=True)
            _write_idx(root / "train-images-idx3-ubyte", x[idx])
            _write_idx(root / "train-labels-idx1-ubyte", y[idx])
            _write_idx(root / "t10k-images-idx3-ubyte", x_test[test_idx])
            _write_idx(root / "t10k-labels-idx1-ubyte", y_test[test_idx])
            (root / "done").write_text(json.dumps({"train": int(size), "test": len(test_idx), "seed": 0}))


def _balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices ordered so that every prefix of 10*k holds k images per class (seeded shuffle)."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    depth = min(len(p) for p in per_class)
    return np.stack([p[:depth] for p in per_class], axis=1).reshape(-1)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


# ----------------------------------------------------------------------------- teacher


def teacher_command(plan: Plan, data_root: Path) -> list[str]:
    """The `cwkd train` command line that trains the teacher."""
    return [sys.executable, "-m", "cwkd", "train", "--model", plan.teacher, "--data", "fashion-mnist",
            "--data-root", str(data_root), "--input-size", str(plan.input_size), "--in-chans", "1",
            "--epochs", str(plan.teacher_epochs), "--batch-size", str(plan.batch_size), "--workers", "0",
            "--seed", "0", "--device", plan.device, "--out", str(plan.runs / "teacher"), "--overwrite", "--quiet"]


def _history(out: Path) -> list[dict]:
    """The per-epoch records of a run directory (empty when it has none)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def teacher_json(plan: Plan) -> Path:
    return plan.results / "accuracy_teacher.json"


def teacher_trained(plan: Plan) -> bool:
    """Whether the teacher's checkpoint is there with all its epochs (then only its result JSON may be missing)."""
    out = plan.runs / "teacher"
    return (out / "last.safetensors").is_file() and (
        teacher_json(plan).is_file() or len(_history(out)) >= plan.teacher_epochs)


def train_teacher(plan: Plan, data_root: Path) -> dict:
    """Train the teacher with `cwkd train` unless its checkpoint and result are there already."""
    out, result_path = plan.runs / "teacher", teacher_json(plan)
    if result_path.is_file() and (out / "last.safetensors").is_file():
        return json.loads(result_path.read_text())
    command = teacher_command(plan, data_root)
    if not teacher_trained(plan):
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    history = _history(out)
    result = {
        "model": plan.teacher, "input_size": plan.input_size, "in_chans": 1, "epochs": plan.teacher_epochs,
        "train_images": plan.teacher_subset, "test_images": plan.test_subset or 10000,
        "top1": history[-1]["val_top1"], "history": [h["val_top1"] for h in history],
        "wall_s": round(sum(h["epoch_s"] for h in history), 1),
        "command": "cwkd " + " ".join(command[3:]).replace(str(ROOT) + "/", ""),
        "checkpoint": str((out / "last.safetensors").relative_to(ROOT)), "versions": versions(),
    }
    _write_json(result_path, result)
    return result


# ----------------------------------------------------------------------------- cells


def grid(plan: Plan, only: str = "all") -> list[Cell]:
    """Every cell, in the order they run: most informative first, so a grid cut short is still balanced.

    First the smaller student's main grid seed by seed (every method at seed 0, then seed 1, ...), then the
    bigger student's baseline and cwt at the first seed, the first seed of the ablations, the rest of the
    bigger student, and the other ablation seeds.
    """
    main = [Cell("main", s, m, seed, alpha=plan.alpha if METHODS[m][1] else 0.0)
            for seed in plan.seeds for s in plan.students for m in plan.methods]
    ablation = []
    for seed in plan.ablation_seeds:
        ablation += [Cell("alpha", plan.ablation_student, "cwt", seed, alpha=a) for a in plan.alphas if a != plan.alpha]
        ablation += [Cell("hidden", plan.ablation_student, "cwt", seed, alpha=plan.alpha, hidden=h)
                     for h in plan.hiddens if h != 128]
    cells = {"all": main + ablation, "main": main, "ablations": ablation}[only]
    return sorted(cells, key=lambda c: _priority(plan, c))


def _priority(plan: Plan, cell: Cell) -> tuple:
    first_seed = cell.seed == plan.seeds[0]
    if cell.group == "main" and cell.student == plan.ablation_student:
        return (0, cell.seed)
    if cell.group == "main" and cell.method in ("none", "cwt"):
        return (1 if first_seed else 3, cell.seed)
    if cell.group != "main":
        return (2 if first_seed else 5, cell.seed)
    return (4, cell.seed)


def cell_path(plan: Plan, cell: Cell) -> Path:
    return plan.results / "accuracy" / f"{cell.key}.json"


def run_cell(plan: Plan, cell: Cell, data_root: str, teacher: str) -> dict:
    """Train one cell through the public API and write its result JSON (runs in a worker process).

    A cell stopped by SIGTERM/SIGINT leaves cwkd's resume state behind, and the next call resumes it.
    """
    import torch

    from cwkd.errors import TrainingError
    from cwkd.training.config import TrainConfig
    from cwkd.training.engine import run

    torch.set_num_threads(int(os.environ.get("CWKD_BENCH_THREADS", "1")))
    norm = teacher_normalization(plan.teacher, plan.input_size)
    method, feature, kd_weight = METHODS[cell.method]
    out = plan.runs / "cells" / cell.key
    cfg = TrainConfig(
        data="fashion-mnist", data_root=data_root, student=cell.student,
        teacher=teacher if (feature or kd_weight) else None, method=method,
        alpha=cell.alpha if feature else 1.0, pairs=PAIRS[cell.student] if feature else "last",
        hidden=cell.hidden, kd_weight=kd_weight, kd_temperature=plan.kd_temperature, epochs=plan.epochs,
        batch_size=plan.batch_size, input_size=plan.input_size, in_chans=1, mean=norm["mean"], std=norm["std"],
        workers=0, seed=cell.seed, device=plan.device, out=str(out), overwrite=True, quiet=True,
    )
    started = time.perf_counter()
    resume = out if (out / "state.pt").is_file() and (out / "config.json").is_file() else None
    try:
        result = run(cfg, resume=resume)
    except TrainingError as exc:  # a diverged run (non-finite loss) is a result too, and is reported as one
        record = {**{k: v for k, v in asdict(cell).items() if k != "extra"}, "key": cell.key, "top1": None,
                  "diverged": True, "error": str(exc), "history": [h["val_top1"] for h in _history(out)],
                  "config": cfg.to_dict(), "versions": versions()}
        _write_json(cell_path(plan, cell), record)
        shutil.rmtree(out, ignore_errors=True)
        return record
    wall = time.perf_counter() - started
    history = _history(out)
    saved = json.loads((out / "config.json").read_text())["config"]  # for `auto`, the number the run picked
    record = {
        **{k: v for k, v in asdict(cell).items() if k != "extra"}, "key": cell.key, "cwkd_method": method,
        "kd_weight": kd_weight, "pairs": cfg.pairs if feature else None, "epochs": plan.epochs,
        "train_images": plan.train_subset, "test_images": plan.test_subset or 10000,
        "top1": result.last["val_top1"], "best_top1": result.best_value, "best_epoch": result.best_epoch,
        "history": [h["val_top1"] for h in history],
        "last_train": {k: v for k, v in history[-1].items() if k.startswith("train_")},
        "wall_s": round(sum(h["epoch_s"] for h in history), 1), "wall_s_this_call": round(wall, 1),
        "alpha_used": saved["alpha"], "alpha_auto": saved.get("alpha_auto", False),
        "resumed": resume is not None, "threads": torch.get_num_threads(), "normalization": norm,
        "config": cfg.to_dict(), "versions": versions(),
    }
    _write_json(cell_path(plan, cell), record)
    shutil.rmtree(out, ignore_errors=True)  # checkpoints are not needed once the result is written
    return record


def teacher_normalization(teacher: str, input_size: int) -> dict:
    """The teacher's input mean/std (what `cwkd train` used for it), given to every student run.

    cwkd now remaps a batch to a teacher's own statistics itself; the benchmark still normalises every cell,
    baselines included, with the teacher's statistics (via --mean/--std) so that all runs of a student see
    identical input tensors. For mobilenetv3_small_050 these are its own defaults; mobilenetv1_100's timm
    defaults (0.5/0.5) differ, and the cells run before the fix used these same statistics.
    """
    import timm

    from cwkd.data.loading import data_config

    stats = data_config(timm.create_model(teacher, num_classes=10, in_chans=1), input_size=input_size, in_chans=1)
    return {"mean": list(stats.mean), "std": list(stats.std)}


def run_grid(plan: Plan, cells: list[Cell], jobs: int) -> None:
    """Train the teacher and every missing cell, ``jobs`` at a time; baselines start before the teacher ends."""
    student_root, teacher_root = prepare_data(plan, teacher=not teacher_trained(plan))
    teacher_ckpt = str(plan.runs / "teacher" / "last.safetensors")
    todo = [c for c in cells if not cell_path(plan, c).is_file()]
    print(f"{len(cells) - len(todo)} of {len(cells)} cells done already; {len(todo)} to run with {jobs} job(s)")
    # While the teacher trains (one job), the other jobs run cells that need no teacher.
    early = [c for c in todo if not _needs_teacher(c)][:max(0, jobs - 1)]
    ctx = get_context("spawn")
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        teacher = pool.submit(train_teacher, plan, teacher_root)
        pending: dict[Future, Cell] = {pool.submit(run_cell, plan, c, str(student_root), teacher_ckpt): c
                                       for c in early}
        info = teacher.result()
        print(f"teacher {plan.teacher}: {info['top1']:.2f}% top-1 ({info['wall_s']:.0f} s)", flush=True)
        pending.update({pool.submit(run_cell, plan, c, str(student_root), teacher_ckpt): c
                        for c in todo if c not in early})
        for future in _as_done(pending):
            cell = pending[future]
            try:
                rec = future.result()
            except Exception as exc:  # report and go on: one broken cell must not lose the others
                print(f"FAILED {cell.key}: {type(exc).__name__}: {exc}", flush=True)
                continue
            elapsed = (time.perf_counter() - started) / 60
            outcome = f"{rec['top1']:.2f}% ({rec['wall_s']:.0f} s)" if rec["top1"] is not None else "DIVERGED"
            print(f"[{elapsed:5.1f} min] {cell.key}: {outcome}", flush=True)


def _as_done(pending: dict[Future, Cell]):
    from concurrent.futures import as_completed

    return as_completed(list(pending))


def _needs_teacher(cell: Cell) -> bool:
    _, feature, kd_weight = METHODS[cell.method]
    return feature or kd_weight > 0


# ----------------------------------------------------------------------------- report


def load_results(plan: Plan) -> list[dict]:
    folder = plan.results / "accuracy"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _stats(values: list[float | None]) -> dict:
    """Mean, sample std and n of the finished runs; ``diverged`` counts the runs whose loss went non-finite."""
    diverged = sum(v is None for v in values)
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": [], "diverged": diverged}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values, "diverged": diverged}


def summarise(plan: Plan, records: list[dict]) -> dict:
    """Mean, sample std and n per (student, method), per alpha and per hidden width."""
    def collect(match) -> dict:
        return _stats([r["top1"] for r in records if match(r)])

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
    return _stats([r["top1"] - reference[r["seed"]] for r in records
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
                gains.setdefault(s, {})[m] = _stats(diffs)
    return gains


def _fmt(stat: dict) -> str:
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
    lines = ["| method | " + " | ".join(plan.students) + " |", "| --- |" + " --- |" * len(plan.students)]
    for m in plan.methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(summary["main"][s][m]) for s in plan.students) + " |")
    lines += ["", "| gain over none (difference of means ± its standard error) | " + " | ".join(plan.students) + " |",
              "| --- |" + " --- |" * len(plan.students)]
    for m in plan.methods[1:]:
        cells = [summary["gain_over_none"].get(s, {}).get(m) for s in plan.students]
        lines.append(f"| {m} | " + " | ".join(_fmt_gain(g) for g in cells) + " |")
    lines += ["", "| paired gain over none (mean ± std of per-seed differences) | " + " | ".join(plan.students) + " |",
              "| --- |" + " --- |" * len(plan.students)]
    for m in plan.methods[1:]:
        cells = [summary["paired_gain_over_none"].get(s, {}).get(m) for s in plan.students]
        lines.append(f"| {m} | " + " | ".join(
            f"{g['mean']:+.2f} ± {g['std']:.2f} (n={g['n']})" if g else "-" for g in cells) + " |")
    lines += ["", "| paired: cwt minus ... (mean ± std of per-seed differences) | " + " | ".join(plan.students) + " |",
              "| --- |" + " --- |" * len(plan.students)]
    for m in plan.methods:
        if m == "cwt":
            continue
        cells = [summary["paired_cwt_minus"].get(s, {}).get(m) for s in plan.students]
        lines.append(f"| {m} | " + " | ".join(
            f"{g['mean']:+.2f} ± {g['std']:.2f} (n={g['n']})" if g else "-" for g in cells) + " |")
    paired = summary["paired_ablations"]
    for kind, title in (("alpha", f"cwt alpha ({plan.ablation_student})"),
                        ("hidden", f"cwt hidden width ({plan.ablation_student}, alpha {plan.alpha:g})")):
        lines += ["", f"| {title} | top-1 | paired minus none | paired minus kd |", "| --- | --- | --- | --- |"]
        lines += [f"| {v:g} | {_fmt(s)} | {_fmt_paired(paired[kind][v]['none'])} | "
                  f"{_fmt_paired(paired[kind][v]['kd'])} |" for v, s in summary[kind].items()]
    return "\n".join(lines)


def _fmt_paired(stat: dict) -> str:
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
    _write_json(plan.results / "accuracy_summary.json",
                {"plan": {k: (_relative(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
                 "pairs": PAIRS, "teacher": teacher, "cells": len(records), **summary, "versions": versions()})
    if teacher:
        print(f"teacher {teacher['model']}: {teacher['top1']:.2f}% top-1 ({teacher['command']})")
    print(markdown(plan, summary))
    png = DOCS / "benchmarks_accuracy.png" if plan.name == "full" and plan.results == RESULTS \
        else plan.results / "accuracy.png"
    if plot(plan, summary, png):
        print(f"plot: {png.relative_to(ROOT)}")


# ----------------------------------------------------------------------------- diagnosis


def diagnose(plan: Plan, images: int = 256) -> dict:
    """At initialisation, how strongly does each term pull on the student? (A cheap look at "why".)

    For every student and feature method at the main alpha, on ``images`` training images with the trained
    teacher: the task and feature losses, the teacher map's mean square (the feature loss of an aligner
    that outputs zeros), and the gradient norm each term puts on the student's own weights.
    """
    import timm
    import torch

    from cwkd.core.distiller import FeatureDistiller
    from cwkd.data.loading import build_transform, data_config
    from cwkd.tasks.classification.data import load_data
    from cwkd.training.build import build_teacher
    from cwkd.training.config import TrainConfig

    torch.set_num_threads(int(os.environ.get("CWKD_BENCH_THREADS", "1")))
    student_root, _ = prepare_data(plan)
    spec = load_data("fashion-mnist", root=str(student_root))
    teacher_ckpt = str(plan.runs / "teacher" / "last.safetensors")
    norm = teacher_normalization(plan.teacher, plan.input_size)
    rows = {}
    for name in plan.students:
        cfg = TrainConfig(data="fashion-mnist", student=name, teacher=teacher_ckpt, in_chans=1)
        teacher, _ = build_teacher(cfg, spec.num_classes, 1)
        for method in ("linear", "cwt", "mgd"):
            torch.manual_seed(0)
            student = timm.create_model(name, num_classes=spec.num_classes, in_chans=1)
            dcfg = data_config(student, input_size=plan.input_size, in_chans=1, **norm)  # as run_cell feeds it
            tf = build_transform(dcfg, train=False, channels=1)
            x = torch.stack([tf(spec.train[i][0]) for i in range(images)])
            y = torch.tensor([spec.train[i][1] for i in range(images)])
            d = FeatureDistiller(teacher, student, pairs=PAIRS[name], method=method, alpha=plan.alpha,
                                 input_size=plan.input_size)
            out = d(x, y)
            weights = [p for p in student.parameters() if p.requires_grad]
            logits_loss = torch.nn.functional.cross_entropy(out["outputs"], y)
            feat = out["loss"] - logits_loss  # alpha * feature loss, with its graph (the dict's parts are detached)
            g_task = torch.autograd.grad(logits_loss, weights, retain_graph=True, allow_unused=True)
            g_feat = torch.autograd.grad(feat, weights, allow_unused=True)
            with torch.no_grad():
                teacher(x)
                t_map = d._t_hooks.pop()[d.pairs[0].teacher.name]
            rows[f"{name}/{method}"] = {
                "task_loss": logits_loss.item(), "feat_loss": out["feat_loss"].item(),
                "teacher_mean_square": t_map.pow(2).mean().item(),
                "grad_task": _norm(g_task), "grad_feat_alpha": _norm(g_feat),
            }
            print(f"{name:24s} {method:7s} " + " ".join(f"{k}={v:.4g}" for k, v in rows[f'{name}/{method}'].items()))
    _write_json(plan.results / "accuracy_diagnosis.json", {"alpha": plan.alpha, "images": images, "rows": rows,
                                                            "teacher_input": teacher_input_check(plan)})
    return rows


def teacher_input_check(plan: Plan, images: int = 3000) -> dict:
    """The teacher's test top-1 on batches normalised for each student, as is and remapped by cwkd.

    This is what the remap (``cwkd.Renormalize``) is for: a student whose timm statistics differ from the
    teacher's would otherwise distil from a teacher that sees the wrong input.
    """
    import timm
    import torch

    from cwkd.core.distiller import Renormalize
    from cwkd.data.loading import build_loaders, data_config
    from cwkd.tasks.classification.data import load_data
    from cwkd.training.build import build_teacher
    from cwkd.training.config import TrainConfig

    student_root, _ = prepare_data(plan)
    spec = load_data("fashion-mnist", root=str(student_root))
    cfg = TrainConfig(data="fashion-mnist", student=plan.students[0], in_chans=1, method="none", kd_weight=1.0,
                      teacher=str(plan.runs / "teacher" / "last.safetensors"))
    teacher, source = build_teacher(cfg, spec.num_classes, 1)
    rows = {}
    for name in plan.students:
        dcfg = data_config(timm.create_model(name, num_classes=10, in_chans=1), input_size=plan.input_size, in_chans=1)
        remap = Renormalize.between((dcfg.mean, dcfg.std), (source.mean, source.std))
        _, loader = build_loaders(spec, dcfg, batch_size=500, workers=0)
        hits, seen = [0, 0], 0
        with torch.no_grad():
            for x, y in loader:
                if seen >= images:
                    break
                hits[0] += int((teacher(x).argmax(1) == y).sum())
                hits[1] += int((teacher(remap(x) if remap is not None else x).argmax(1) == y).sum())
                seen += len(y)
        rows[name] = {"student_mean": list(dcfg.mean), "student_std": list(dcfg.std), "images": seen,
                      "teacher_top1_as_is": 100 * hits[0] / seen, "teacher_top1_remapped": 100 * hits[1] / seen}
        print(f"{name:24s} mean/std {dcfg.mean}/{dcfg.std}: teacher top-1 on {seen} test images "
              f"{rows[name]['teacher_top1_as_is']:.1f}% as is, {rows[name]['teacher_top1_remapped']:.1f}% remapped")
    return {"teacher_mean": list(source.mean), "teacher_std": list(source.std), "rows": rows}


def _norm(grads) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


# ----------------------------------------------------------------------------- misc


def versions() -> dict:
    import timm
    import torch

    import cwkd

    return {"cwkd": cwkd.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count()}


def _relative(path: Path) -> str:
    """``path`` relative to the checkout when it lies inside it, so saved results name no machine's folders."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--results``, shared with alpha.py."""
    parser.add_argument("--device", default="cpu", help="where the teacher and the cells train (default: cpu)")
    parser.add_argument("--results", type=Path, default=None, help="a folder that stands in for benchmarks/results: "
                        "cells in DIR/accuracy, the summary and the teacher's JSON in DIR")


def with_device_options(plan: Plan, args: argparse.Namespace) -> Plan:
    """``plan`` with the --device and --results of ``args``."""
    plan = replace(plan, device=args.device)
    return replace(plan, results=args.results.resolve()) if args.results else plan


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)  # atomic: a stopped run never leaves half a file that would be skipped as done


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
