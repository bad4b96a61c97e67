"""The ``pretrained_detection`` step of benchmarks/gpu_check.py: issue 24's Faster R-CNN protocol on one GPU.

It runs ``benchmarks/pretrained_detection.py --plan gpu --device cuda --jobs 8`` (pretrain the R18 and R50
bodies on the bundled fashion-mnist-mini, the composited canvases made from the same set, a Faster R-CNN R50
teacher, then the R18 students' arms none, cwt, mgd and cwd seed by seed) under the step's deadline. Every
~20 s while it runs, and once at the end (also after a timeout kill), ``--out``/pretrained_detection.tar.gz is
rewritten atomically with the result JSONs, the report and the step's log (no weights). The benchmark resumes
from its result files, so a cut-short run keeps every finished cell. With ``--dry-run`` it runs ``--quick``
on the CPU. The GPU machine has no pycocotools: carry it in ``.gpu_deps`` (benchmarks/gpu_carry.sh step 1).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from common import BENCH, write_tarball

TARBALL = "pretrained_detection.tar.gz"
SNAPSHOT_S = 20    # seconds between two rewrites of the tarball
END_MARGIN_S = 10  # kept back at the end of the step for the last tarball and the report
JOBS = {"gpu": "8", "dry-run": "1"}  # runs at a time
SKIPPED_FILES = (".safetensors", ".pt", ".tmp")  # weights and half-written files stay out of the tarball


def pretrained_detection(check, limit: float, describe) -> dict:
    """Run the step on ``check`` (a gpu_check.Check) within ``limit`` seconds; return its report entry.

    ``describe(commands)`` says why the first failed command failed (gpu_check's ``_failed_command``).
    """
    stop = time.monotonic() + limit - END_MARGIN_S
    probe = subprocess.run([sys.executable, "-c", "import pycocotools"], env=check.env, capture_output=True)
    if probe.returncode != 0:
        return {"status": "skipped", "reason": "pycocotools is not importable here; carry it in .gpu_deps "
                "(bash benchmarks/gpu_carry.sh builds it) or pass --deps FOLDER"}
    results = check.work / "results" / "pretrained_detection"
    plan = ["--quick"] if check.dry_run else ["--plan", "gpu"]
    cmd = [sys.executable, str(BENCH / "pretrained_detection.py"), *plan, "--device", check.plan.device,
           "--jobs", JOBS["dry-run" if check.dry_run else "gpu"], "--results", str(results),
           "--runs", str(check.work / "runs" / "pretrained_detection")]
    job = check.spawn("pretrained_detection", cmd, {**check.env, "CWKD_BENCH_THREADS": "2"})
    check.wait([job], stop, lambda: snapshot(check.out, results, check.logs), SNAPSHOT_S)
    done = check.collect(job, stop - time.monotonic())
    snapshot(check.out, results, check.logs)
    report = results / "report.md"
    cells = sorted(p.stem for p in results.glob("*-s*.json"))
    entry = {"commands": [done], "results": TARBALL, "cells": cells, "timed_out": done["timed_out"],
             "report": report.read_text() if report.is_file() else None}
    if report.is_file():
        entry["decision"] = report.read_text().strip().splitlines()[-1]
    if done["rc"] != 0 and not done["timed_out"]:
        return {"status": "failed", "reason": describe([done]), **entry}
    if not cells:
        return {"status": "failed", "reason": describe([done]) or "no cell finished", **entry}
    return {"status": "passed", **entry}


def snapshot(out: Path, results: Path, logs: Path) -> None:
    """Rewrite ``out``/pretrained_detection.tar.gz with the results folder (no weights) and the step's log."""
    files = sorted(results.rglob("*")) if results.is_dir() else []
    members = [(file, f"results/{file.relative_to(results)}") for file in files
               if file.is_file() and not file.name.endswith(SKIPPED_FILES)]
    log = logs / "pretrained_detection.log"
    write_tarball(out / TARBALL, members + ([(log, f"logs/{log.name}")] if log.is_file() else []))
