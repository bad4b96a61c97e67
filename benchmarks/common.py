"""What the benchmarks share, kept in one place instead of a copy per script.

Where results and run directories go, running ``cwkd`` in a subprocess, a run's metrics history, result files
written atomically (JSON, and the tarballs gpu_check's steps bring back), the versions a result records, mean ±
std, and the name of a dense benchmark's cell.

The scripts import it by name (``benchmarks/`` is on ``sys.path`` when a script runs). It imports only the
standard library when it loads, because ``benchmarks/gpu_check.py`` loads it in a process that may have no
cwkd or torch to import.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"  # committed
RUNS = BENCH / "runs"        # git-ignored: data, checkpoints and run directories


def relative(path: Path) -> str:
    """``path`` relative to the checkout when it lies inside it, so saved results and printed lines name no
    machine's folders; a path outside the checkout (``--results /elsewhere``) as it is."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ----------------------------------------------------------------------------- running cwkd


def run_cwkd(args: list, threads: str | None = None) -> None:
    """``python -m cwkd ARGS`` from the checkout, with ``threads`` OpenMP threads (default: $CWKD_BENCH_THREADS,
    else 2); a non-zero exit raises."""
    env = {**os.environ, "OMP_NUM_THREADS": threads or os.environ.get("CWKD_BENCH_THREADS", "2")}
    subprocess.run([sys.executable, "-m", "cwkd", *map(str, args)], check=True, cwd=ROOT, env=env)


def run_in(out: Path, args: list) -> list[dict]:
    """``cwkd ARGS`` into the run directory ``out`` (resumed where a stop left its state); its metrics history."""
    resume = ["--resume", out] if (out / "state.pt").is_file() else ["--out", out, "--overwrite"]
    run_cwkd([*args, *resume])
    return read_history(out)


def read_history(out: Path) -> list[dict]:
    """The per-epoch records of a run directory's ``metrics.jsonl`` (empty when it has none)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def saved_config(out: Path) -> dict:
    """The resolved config a run saved in ``out/config.json`` (for ``--alpha auto``, the alpha it picked)."""
    return json.loads((out / "config.json").read_text())["config"]


# ----------------------------------------------------------------------------- result files


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON at ``path``, atomically: a stopped run never leaves half a file that would
    count as done. What JSON cannot hold (a path) is written as its ``str``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def keep_result(path: Path, result: dict, run_dir: Path) -> dict:
    """Write ``result`` to ``path`` and delete the run directory it came from (its checkpoints are not needed
    once the result is saved); return ``result``."""
    write_json(path, result)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def cell_tail(history: list[dict], started: float, config: dict) -> dict:
    """The fields a dense benchmark's cell result ends with: the last epoch's train losses, each epoch's seconds,
    the wall time since ``started`` (a ``time.perf_counter()`` reading), the run's config and the versions."""
    return {"last_train": {k: v for k, v in history[-1].items() if k.startswith("train_")},
            "epoch_s": [h["epoch_s"] for h in history], "wall_s_this_call": round(time.perf_counter() - started, 1),
            "config": config, "versions": versions()}


def write_tarball(path: Path, members: list[tuple[Path, str]]) -> None:
    """A gzipped tar at ``path`` of ``members`` (a file or folder, and its name in the archive), replaced
    atomically, so a reader never finds half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for source, name in members:
            tar.add(source, arcname=name)
    os.replace(tmp, path)


def versions() -> dict:
    """The versions a dense benchmark's result records: Python, torch, timm, the CPU's model and the
    instruction set torch's CPU kernels use on it (``AVX512``, ``AVX2``...). Two machines can train the same
    seed to different numbers: their kernels round differently and training grows the difference."""
    import timm
    import torch

    from cwkd.runtime import cpu_model

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def full_versions() -> dict:
    """The versions accuracy.py's results record: cwkd, torch, timm, numpy, Python, the machine and its cores."""
    import numpy as np
    import timm
    import torch

    import cwkd

    return {"cwkd": cwkd.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count()}


# ----------------------------------------------------------------------------- numbers and names


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and sample standard deviation (0 for a single value) of one or more values."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_mean_std(values: list[float], signed: bool = False) -> str:
    """``mean ± std`` of ``values`` to two decimals; ``signed``: the mean with its sign (a gain).

    Example:
        >>> fmt_mean_std([1.0, 3.0], signed=True)
        '+2.00 ± 1.41'
    """
    mean, std = mean_std(values)
    return f"{mean:+.2f} ± {std:.2f}" if signed else f"{mean:.2f} ± {std:.2f}"


def key(student: str, method: str, seed: int, auto: bool = False) -> str:
    """A dense benchmark cell's name, also its result file's: ``STUDENT-METHOD-sSEED``, then ``-aauto`` for a
    cell run with ``--alpha auto``."""
    return f"{student}-{method}-s{seed}" + ("-aauto" if auto else "")
