"""Training cost of cwkd: how much slower is one distillation step than its parts?

Issue 5, part 2. At a fixed batch, on this machine, it times the steady-state step of

    (a) the student alone: forward + cross-entropy + backward + SGD step
    (b) the teacher alone: inference forward under ``torch.inference_mode``
    (c) a distillation step: ``FeatureDistiller`` forward + backward + SGD step

and reports the overhead ratio ``c / (a + b)``. A ratio of 1.0 means distillation costs exactly
what running the teacher next to plain student training costs; the aligner, the hooks and the
feature loss are what push it above 1. Peers are timed the same way on the same models, inputs
and machine: timm's ``LogitDistillationTask`` and ``FeatureDistillationTask`` (pooled features
only) and torchdistill's ``DistillationBox`` set up as a FitNets hint on the layers cwkd pairs.

How it measures: every variant is built once, warmed up, and then timed in rounds; each round
runs every variant once (in a fresh random order), so slow drift of the machine hits all of them
alike. A sample is the mean of enough back-to-back steps to last ``--min-time`` seconds. Reported
are the median and interquartile range (IQR) of the samples, the ratio of medians, and the
median/IQR of the per-round ratios. Peak memory is measured per variant in a fresh subprocess:
on CPU the growth of the resident set (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus ``VmRSS`` once the models are built), which counts activations,
gradients, optimizer state and allocator slack; on CUDA ``torch.cuda.max_memory_allocated`` minus
the memory allocated once the models are built.

Allocator: every variant, peers included, runs under the memory policy cwkd's engine uses for a CPU
run (``cwkd.runtime.reuse_freed_memory``: glibc keeps freed memory for the next step instead of
unmapping it). Under glibc's default a step page-faults its large activations in again every time,
which made the 224 px student step about twice as slow and the ratios depend on what ran before;
``--system-malloc`` measures that default instead.

Target (checked and printed, not a unit test): cwkd's ratio <= 1.10 and no worse than any peer's.

bf16: the ``*_amp`` rows are only meaningful next to whether the machine computes bf16 natively
(emulated bf16 measured 8-30x slower than fp32, issue 15), so the JSON's ``machine`` section records
``bf16_native`` and the tables print it beside those rows.

The code, by concern: ``speed_variants.py`` (the pair, the settings and every variant's step),
``speed_timing.py`` (timing rounds, memory processes, aligner cost, ratios and checks) and ``speed_report.py``
(the console and docs tables, versions and machine); this file is the command line.

Usage:
    python benchmarks/speed.py                      # resnet50 -> mobilenetv1, batch 32, 224 px, + small
    python benchmarks/speed.py --quick              # the small config only, fewer rounds (< 1 min)
    python benchmarks/speed.py --system-malloc      # the same under glibc's default allocator policy
    python benchmarks/speed.py --device cuda --out benchmarks/results/speed_cuda.json
    python benchmarks/speed.py --variants student,teacher,cwkd,cwkd_sync --memory-of cwkd  # a chosen few

Optional variants run only when ``--variants`` names them: ``cwkd_sync`` and ``cwkd_amp_sync`` add the
engine's per-step non-finite check (``cwkd.training.nonfinite.finite_everywhere``, one host sync a step) to (c), so
their ratio to (c) is what that sync costs on a GPU; ``timm_logit_amp`` is timm's logit task under autocast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import RESULTS, write_json
from speed_report import bf16_note, environment, markdown, print_config
from speed_timing import TARGET_RATIO, console, malloc_policy, run_config
from speed_variants import SMALL, VARIANTS, Config, Settings

# --- command line ---

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--student", default="mobilenetv1")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--small", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also run the small config ({SMALL.teacher} -> {SMALL.student}, {SMALL.input_size} px, "
                        f"batch {SMALL.batch})")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; 1 with --quick)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds one timed sample lasts at least (default 0.3; 0.15 with --quick)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16",
                   help="precision of the autocast variants (fp16 adds a GradScaler)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--no-peers", action="store_true", help="skip timm and torchdistill")
    p.add_argument("--variants", default=None, metavar="NAMES",
                   help="time only these, comma-separated (optional ones too: cwkd_sync, cwkd_amp_sync,\n"
                        "timm_logit_amp); default: every non-optional variant")
    p.add_argument("--memory-of", default=None, metavar="NAMES",
                   help="measure the peak memory of these variants, comma-separated (default: a, b, c, the\n"
                        "other fp32 cwkd variants and the peers)")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default allocator policy for every variant, instead of the one cwkd's\n"
                        "engine uses on the CPU (cwkd.runtime.reuse_freed_memory: freed memory is kept for\n"
                        "the next step); shows what that policy is worth")
    p.add_argument("--quick", action="store_true",
                   help="the small config only, fewer rounds, memory of a, b, c only: < 1 minute")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default: benchmarks/results/speed_DEVICE.json, _quick.json with --quick)")
    p.add_argument("--markdown", action="store_true", help="also print the docs table")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="print the docs tables of a saved result file and exit (measures nothing)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        try:
            saved = json.loads(args.report.read_text())
            console.print(markdown(saved), markup=False, highlight=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            console.print(f"[red]--report {args.report}: not a speed.py result file ({type(exc).__name__}: {exc})",
                          highlight=False)
            return 1
        return 0
    variants = tuple(n for n in (args.variants or "").split(",") if n)
    memory_of = tuple(n for n in (args.memory_of or "").split(",") if n)
    unknown = sorted(set(variants + memory_of) - set(VARIANTS))
    if unknown:
        console.print(f"[red]--variants/--memory-of: unknown variant(s) {', '.join(unknown)}; known: "
                      f"{', '.join(VARIANTS)}", highlight=False)
        return 1
    if args.amp == "none" and any(VARIANTS[n].amp for n in variants):
        console.print("[red]--variants names autocast variants but --amp is none; use --amp bf16 or fp16")
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda: no CUDA device is visible to torch; use --device cpu")
        return 1
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    settings = Settings(device=args.device, threads=args.threads,
                        repeats=args.repeats or (3 if args.quick else 7),
                        warmup=args.warmup or (1 if args.quick else 2),
                        min_time=args.min_time or (0.15 if args.quick else 0.3), amp=args.amp,
                        peers=not args.no_peers, system_malloc=args.system_malloc, variants=variants)
    if args.no_memory or args.quick or memory_of:
        settings = replace(settings, memory=() if args.no_memory else memory_of or ("student", "teacher", "cwkd"))
    main_cfg = Config("main", args.teacher, args.student, args.batch, args.input_size, args.num_classes)
    configs = [SMALL] if args.quick else [main_cfg] + ([SMALL] if args.small else [])
    results = {"command": " ".join(["python", *sys.argv]), "date": datetime.now(timezone.utc).isoformat(),
               **environment(settings), "settings": asdict(settings), "target_ratio": TARGET_RATIO,
               "configs": []}
    start = time.perf_counter()
    if results["machine"]["load_average_start"][0] > 0.5 * (os.cpu_count() or 1):
        console.print(f"[yellow]load average {results['machine']['load_average_start'][0]:.2f} on "
                      f"{os.cpu_count()} cores: other work shares this machine, so timings will be noisy")
    with malloc_policy(settings, torch.device(args.device)) as kept:
        results["freed_memory_kept"] = kept
        for cfg in configs:
            result = run_config(cfg, settings)
            results["configs"].append(result)
            print_config(result, bf16_note(results))
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - start
    suffix = ("_system_malloc" if args.system_malloc else "") + ("_quick" if args.quick else "")
    out = args.out or RESULTS / f"speed_{args.device}{suffix}.json"
    write_json(out, results)
    load = results["machine"]["load_average_start"][0], results["machine"]["load_average_end"][0]
    console.print(f"load average (1 min) {load[0]:.2f} -> {load[1]:.2f} on {os.cpu_count()} cores; "
                  f"{results['wall_s']:.0f} s; wrote {out}")
    if args.markdown:
        console.print(markdown(results), markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
