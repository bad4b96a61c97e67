"""Start-up time of the ``cwkd`` command line: ``--help``, every ``COMMAND --help`` and ``--version``.

Issue 10, section 6. ``cwkd --help`` used to import torch and timm (7.1 s, over twice a bare
``import torch``); the CLI now imports the library inside each command. Target: every line below
under 0.5 s on the 2-core reference machine. This is a measurement, not a unit test: the unit test
(tests/test_startup.py) only checks that ``--help`` imports no torch, which is what made it slow.

How it measures: each case is a fresh ``python -m cwkd ...`` subprocess, timed wall-clock from
spawn to exit, with its output discarded. Cases run in rounds, each round every case once in a
fresh random order, so drift of a shared machine hits them alike; reported are the median, the
fastest run and the interquartile range. Baselines in the same rounds: a bare interpreter
(``python -c pass``) and ``python -c "import torch"``. Each cwkd case is also run once under
``python -X importtime`` to record whether it imported torch or timm. The load average before and
after is recorded: numbers from a busy machine are upper bounds.

Usage:
    python benchmarks/startup.py                   # 7 rounds, writes benchmarks/results/startup.json
    python benchmarks/startup.py --rounds 15 --out /tmp/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

TARGET_S = 0.5
HEAVY = ("torch", "timm", "torchvision")


def cases() -> dict[str, list[str]]:
    """Name -> argv after the interpreter: the baselines, then every cwkd case."""
    import typer.main

    from cwkd.cli.app import app

    commands = sorted(typer.main.get_command(app).commands)
    cwkd = {"cwkd --help": ["--help"], "cwkd --version": ["--version"]}
    cwkd.update({f"cwkd {c} --help": [c, "--help"] for c in commands})
    return {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"],
            **{name: ["-m", "cwkd", *args] for name, args in cwkd.items()}}


def time_once(argv: list[str]) -> float:
    """Seconds from spawn to exit of ``python argv``; a failed run is an error, not a number."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"error: `python {' '.join(argv)}` exited {result.returncode}: {result.stderr[-500:]!r}")
    return elapsed


def heavy_imports(argv: list[str]) -> list[str]:
    """Which of torch/timm/torchvision one run imports (from ``-X importtime``)."""
    result = subprocess.run([sys.executable, "-X", "importtime", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    return [m for m in HEAVY if m in names]


def summarise(samples: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    return {"median_s": round(statistics.median(samples), 3), "min_s": round(min(samples), 3),
            "iqr_s": [round(q1, 3), round(q3, 3)], "samples_s": [round(s, 3) for s in samples]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="runs of each case (default 7)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "startup.json")
    args = parser.parse_args()

    import cwkd

    todo = cases()
    load_before = os.getloadavg()
    samples: dict[str, list[float]] = {name: [] for name in todo}
    for argv in todo.values():  # one untimed warm-up each: the first run pays for cold disk caches
        time_once(argv)
    for _ in range(args.rounds):
        for name in random.sample(list(todo), len(todo)):
            samples[name].append(time_once(todo[name]))
    load_after = os.getloadavg()

    torch_s = statistics.median(samples["python -c 'import torch'"])
    results = {}
    for name, argv in todo.items():
        row = summarise(samples[name])
        if name.startswith("cwkd"):
            row["imports"] = heavy_imports(argv)
            row["vs_import_torch"] = round(row["median_s"] / torch_s, 3)
        results[name] = row
    cwkd_rows = {k: v for k, v in results.items() if k.startswith("cwkd")}
    worst = max(v["median_s"] for v in cwkd_rows.values())
    report = {
        "benchmark": "startup", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rounds": args.rounds, "target_s": TARGET_S, "worst_cwkd_median_s": worst,
        "meets_target": worst < TARGET_S and not any(v["imports"] for v in cwkd_rows.values()),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"cwkd": cwkd.__version__, **{p: metadata.version(p) for p in ("torch", "timm", "typer", "rich")}},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{'case':32} {'median':>8} {'min':>7} {'IQR':>15}  imports")
    for name, row in results.items():
        iqr = f"{row['iqr_s'][0]:.2f}-{row['iqr_s'][1]:.2f}"
        extra = ", ".join(row.get("imports", [])) or ("-" if "imports" in row else "")
        print(f"{name:32} {row['median_s']:7.2f}s {row['min_s']:6.2f}s {iqr:>15}  {extra}")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} CPUs); "
          f"slowest cwkd case {worst:.2f} s, target < {TARGET_S} s: {'met' if report['meets_target'] else 'NOT met'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
