"""The ``grids`` step of benchmarks/gpu_check.py: the detection grid and an alpha sweep on one GPU, side by side.

In order, inside the step's budget:

1. ``detection.py --step-cost`` alone on the machine (its JSON lands in the detection results);
2. then two subprocesses at once, each with its own deadline: the detection grid (``--jobs 6``, methods
   none, cwt, linear and mgd) and alpha.py's sweep of mobilenetv1_100 (``--jobs 10``, alphas 0.5-200, plus the
   baselines and ``auto`` cells alpha.py always runs);
3. every ~20 s while they run, and once at the end (also after a timeout kill),
   ``--out``/grids_results.tar.gz is rewritten atomically with both results folders and each grid's log.

Both benchmarks resume from their result JSONs, so a grid cut short keeps every finished cell. The data are
carried in (see benchmarks/gpu_carry.sh): the composited detection sets under ``benchmarks/runs/gpu_carry``
are linked into the step's runs folder, and the accuracy teacher and student subset are read where
accuracy.py keeps them (``benchmarks/runs``). With ``--dry-run`` both grids run their ``--quick`` plans on the CPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common import BENCH, write_tarball

#: Composited detection sets carried to the GPU machine (only their COCO part), one folder per set.
DETECTION_CARRY = BENCH / "runs" / "gpu_carry" / "detection"
TARBALL = "grids_results.tar.gz"
SNAPSHOT_S = 20    # seconds between two rewrites of the tarball
STEP_COST_S = 90   # at most this much of the step (and a third of it) for --step-cost
#: Cells at a time (detection, alpha) on the GPU, and in the dry run on a small CPU.
JOBS = {"gpu": ("6", "10"), "dry-run": ("2", "2")}
END_MARGIN_S = 10  # kept back at the end of the step for the last tarball and the report


def grids(check, limit: float, describe) -> dict:
    """Run the step on ``check`` (a gpu_check.Check) within ``limit`` seconds; return its report entry.

    ``describe(commands)`` says why the first failed command failed (gpu_check's ``_failed_command``).
    """
    stop = time.monotonic() + limit - END_MARGIN_S
    work, device = check.work, check.plan.device
    results = {"detection": work / "results" / "detection", "alpha": work / "results" / "accuracy_gpu"}
    runs = work / "runs" / "detection"
    linked = _link_carried_data(runs / "data")
    quick = ["--quick"] if check.dry_run else []
    jobs = JOBS["dry-run" if check.dry_run else "gpu"]
    detection = [sys.executable, str(BENCH / "detection.py"), *quick, "--device", device,
                 "--results", str(results["detection"]), "--runs", str(runs)]
    env = {"detection": {**check.env, "CWKD_BENCH_THREADS": "2"}, "alpha": {**check.env, "CWKD_BENCH_THREADS": "1"}}
    cost = check.run("grids_step_cost", [*detection, "--step-cost", *(["--rounds", "1"] if check.dry_run else [])],
                     min(STEP_COST_S, (stop - time.monotonic()) / 3), env["detection"])
    commands = {
        "detection": [*detection, "--jobs", jobs[0], "--methods", "none", "cwt", "linear", "mgd"],
        "alpha": [sys.executable, str(BENCH / "alpha.py"), *quick, "--device", device, "--jobs", jobs[1],
                  "--results", str(results["alpha"])]
                 + ([] if check.dry_run else ["--students", "mobilenetv1_100", "--alphas", "0.5,2,7,20,50,200"]),
    }
    running = {name: check.spawn(f"grids_{name}", cmd, env[name]) for name, cmd in commands.items()}
    check.wait(list(running.values()), stop, lambda: _snapshot(check, results), SNAPSHOT_S)
    done = {name: check.collect(job, stop - time.monotonic()) for name, job in running.items()}
    _snapshot(check, results)
    counts = {name: _result_files(folder) for name, folder in results.items()}
    entry = {"commands": [cost, *done.values()], "results": TARBALL, "result_files": counts,
             "carried_data": [str(p) for p in linked],
             "grids": {name: {k: d[k] for k in ("rc", "timed_out", "wall_s", "log")} for name, d in done.items()},
             "step_cost": {k: cost[k] for k in ("rc", "timed_out", "wall_s", "log")}}
    broken = [name for name, d in done.items() if d["rc"] != 0 and not d["timed_out"]]
    if cost["rc"] != 0 or broken:
        what = describe([cost, *(done[n] for n in broken)])
        return {"status": "failed", "reason": what, **entry}
    if not all(counts.values()):
        return {"status": "failed", "reason": f"a grid wrote no result file: {counts}", **entry}
    return {"status": "passed", **entry}


def _link_carried_data(data: Path) -> list[Path]:
    """Link every carried composited set (a folder with ``done``) into ``data``, where detection.py looks."""
    linked = []
    for source in sorted(DETECTION_CARRY.glob("*/done")):
        target = data / source.parent.name
        if not target.exists():
            data.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source.parent, target_is_directory=True)
        linked.append(target)
    return linked


def _result_files(folder: Path) -> int:
    """Result JSONs a grid wrote (the cells, the teacher's, the step cost, the summaries)."""
    return sum(1 for _ in folder.rglob("*.json")) if folder.is_dir() else 0


def _snapshot(check, results: dict[str, Path]) -> None:
    """Rewrite --out/grids_results.tar.gz with both results folders and the grids' logs, atomically."""
    folders = [(folder, f"results/{folder.name}") for folder in results.values() if folder.is_dir()]
    logs = [(log, f"logs/{log.name}") for log in sorted(check.logs.glob("grids_*.log"))]
    write_tarball(check.out / TARBALL, folders + logs)
