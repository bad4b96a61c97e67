"""accuracy.py's training: the teacher through ``cwkd train`` once, then every cell through the public API in
worker processes, ``jobs`` at a time, each writing its result JSON as soon as it finishes."""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

from accuracy_data import prepare_data
from accuracy_plan import METHODS, PAIRS, Cell, Plan, cell_path, teacher_json
from common import ROOT, full_versions, keep_result, read_history, relative, run_cwkd, saved_config, write_json


def teacher_command(plan: Plan, data_root: Path) -> list[str]:
    """The `cwkd train` command line that trains the teacher."""
    return [sys.executable, "-m", "cwkd", "train", "--model", plan.teacher, "--data", "fashion-mnist",
            "--data-root", str(data_root), "--input-size", str(plan.input_size), "--in-chans", "1",
            "--epochs", str(plan.teacher_epochs), "--batch-size", str(plan.batch_size), "--workers", "0",
            "--seed", "0", "--device", plan.device, "--out", str(plan.runs / "teacher"), "--overwrite", "--quiet"]


def teacher_trained(plan: Plan) -> bool:
    """Whether the teacher's checkpoint is there with all its epochs (then only its result JSON may be missing)."""
    out = plan.runs / "teacher"
    return (out / "last.safetensors").is_file() and (
        teacher_json(plan).is_file() or len(read_history(out)) >= plan.teacher_epochs)


def train_teacher(plan: Plan, data_root: Path) -> dict:
    """Train the teacher with `cwkd train` unless its checkpoint and result are there already."""
    out, result_path = plan.runs / "teacher", teacher_json(plan)
    if result_path.is_file() and (out / "last.safetensors").is_file():
        return json.loads(result_path.read_text())
    command = teacher_command(plan, data_root)
    if not teacher_trained(plan):
        run_cwkd(command[3:], threads="1")
    history = read_history(out)
    result = {
        "model": plan.teacher, "input_size": plan.input_size, "in_chans": 1, "epochs": plan.teacher_epochs,
        "train_images": plan.teacher_subset, "test_images": plan.test_subset or 10000,
        "top1": history[-1]["val_top1"], "history": [h["val_top1"] for h in history],
        "wall_s": round(sum(h["epoch_s"] for h in history), 1),
        "command": "cwkd " + " ".join(command[3:]).replace(str(ROOT) + "/", ""),
        "checkpoint": relative(out / "last.safetensors"), "versions": full_versions(),
    }
    write_json(result_path, result)
    return result


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
                  "diverged": True, "error": str(exc), "history": [h["val_top1"] for h in read_history(out)],
                  "config": cfg.to_dict(), "versions": full_versions()}
        return keep_result(cell_path(plan, cell), record, out)
    wall = time.perf_counter() - started
    history = read_history(out)
    saved = saved_config(out)  # for `auto`, the number the run picked
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
        "config": cfg.to_dict(), "versions": full_versions(),
    }
    return keep_result(cell_path(plan, cell), record, out)


def teacher_normalization(teacher: str, input_size: int) -> dict:
    """The teacher's input mean/std (what `cwkd train` used for it), given to every student run.

    cwkd now remaps a batch to a teacher's own statistics itself; the benchmark still normalises every cell,
    baselines included, with the teacher's statistics (via --mean/--std) so that all runs of a student see
    identical input tensors. For mobilenetv3_small_050 these are its own defaults; mobilenetv1_100's timm
    defaults (0.5/0.5) differ, and the cells run before the fix used these same statistics.
    """
    import timm

    from cwkd.data.transforms import data_config

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
