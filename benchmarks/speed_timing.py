"""How speed.py measures: steady-state step times in interleaved rounds, each variant's peak memory in a fresh
process, each aligner's own cost, and the ratios and target checks computed from them."""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from speed_variants import VARIANTS, Config, Settings, Step, make_bench, make_models, place, selected

from cwkd.core.aligner import aligner_macs
from cwkd.core.distiller import FeatureDistiller
from cwkd.core.losses import feature_loss
from cwkd.runtime import reuse_freed_memory

#: The target: cwkd's c / (a + b) at most this, and no worse than any peer's.
TARGET_RATIO = 1.10
PEERS = ("timm_logit", "timm_feature", "torchdistill_fitnet")
#: Where the live status, the tables and the messages go.
console = Console(width=None if sys.stdout.isatty() else 150)


# --- timing ---

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(step: Step, inner: int, device: torch.device) -> tuple[float, float, float | None]:
    """Wall and process-CPU seconds per step over ``inner`` back-to-back steps, and the last loss.

    CPU time (all threads of this process) is a second opinion when other work shares the cores.
    """
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(inner):
        loss = step()
    _sync(device)
    wall, cpu = (time.perf_counter() - wall) / inner, (time.process_time() - cpu) / inner
    return wall, cpu, (float(loss) if loss is not None else None)


def _time_rounds(steps: dict[str, Step], settings: Settings, label: str) -> dict[str, dict]:
    """Warm up, then time every step once per round, in a fresh random order each round."""
    device = torch.device(settings.device)
    rng = random.Random(settings.seed)
    inner = dict.fromkeys(steps, 1)
    for w in range(settings.warmup):
        for name in steps:
            wall, _, _ = _clock(steps[name], 1, device)
            _progress(f"{label}: warm-up {w + 1}/{settings.warmup}, {name} {wall * 1e3:.1f} ms")
            inner[name] = max(1, math.ceil(settings.min_time / wall)) if w == settings.warmup - 1 else 1
    walls: dict[str, list[float]] = {n: [] for n in steps}
    cpus: dict[str, list[float]] = {n: [] for n in steps}
    losses: dict[str, float | None] = {}
    load: list[float] = []
    with console.status("") as status:
        for r in range(settings.repeats):
            order = list(steps)
            rng.shuffle(order)
            for name in order:
                status.update(f"[dim]{label}: round {r + 1}/{settings.repeats}, {name}")
                wall, cpu, losses[name] = _clock(steps[name], inner[name], device)
                walls[name].append(wall)
                cpus[name].append(cpu)
            load.append(os.getloadavg()[0])
            _progress(f"{label}: round {r + 1}/{settings.repeats} timed")
    return {"load_1min_per_round": load, "variants": {
        n: {**_stats(walls[n]), "cpu_median": statistics.median(cpus[n]), "inner": inner[n],
            "samples_s": walls[n], "cpu_samples_s": cpus[n], "last_loss": losses[n]}
        for n in steps}}


def _progress(message: str) -> None:
    """A plain line where no live status line shows (a log file, a remote run): its tail says how far it got."""
    if not console.is_terminal:
        print(message, file=sys.stderr, flush=True)


def _stats(values: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "iqr": q3 - q1}


# --- memory, one fresh process per variant ---

def _memory(cfg: Config, settings: Settings, names: list[str]) -> dict[str, dict]:
    context = multiprocessing.get_context("spawn")
    results = {}
    for name in names:
        with console.status(f"[dim]{cfg.label}: peak memory of {name} in a fresh process"):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_memory_worker, args=(name, cfg, settings, send))
            process.start()
            send.close()
            results[name] = receive.recv() if receive.poll(600) else {"error": "no answer in 600 s"}
            process.join()
        _progress(f"{cfg.label}: peak memory of {name}: {results[name]}")
    return results


def _memory_worker(name: str, cfg: Config, settings: Settings, send) -> None:
    device = torch.device(settings.device)
    with malloc_policy(settings, device):
        _measure_memory(name, cfg, settings, device, send)


def malloc_policy(settings: Settings, device: torch.device):
    """What cwkd's engine does for a CPU run (keep freed memory), unless --system-malloc."""
    return nullcontext(False) if settings.system_malloc else reuse_freed_memory(device)


def _measure_memory(name: str, cfg: Config, settings: Settings, device: torch.device, send) -> None:
    try:
        torch.set_num_threads(settings.threads)
        bench = make_bench(name, cfg, settings, make_models(cfg, settings), fresh=True)
        step = VARIANTS[name].build(bench)
        gc.collect()
        static = _reset_peak(device)
        for _ in range(settings.memory_steps):
            step()
        _sync(device)
        peak = _read_peak(device)
        send.send({"static_mib": static, "peak_mib": peak, "step_mib": peak - static,
                   "measure": "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM - VmRSS"})
    except Exception as exc:  # reported in the results, never fatal for the run
        send.send({"error": f"{type(exc).__name__}: {exc}"})


def _reset_peak(device: torch.device) -> float:
    """Reset the peak counter; return what is resident now (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux)
    return _proc_status("VmRSS")


def _read_peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status("VmHWM")


def _proc_status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} is not in /proc/self/status")


# --- per-pair aligner cost ---

def _aligner_steps(cfg: Config, settings: Settings, models: tuple) -> tuple[dict[str, Step], list[dict]]:
    """One step per pair of ``pairs=all``: aligner forward + feature loss + backward, on random maps."""
    bench = make_bench("cwkd_all", cfg, settings, models)
    distiller = place(FeatureDistiller(bench.teacher, bench.student, pairs="all",
                                        input_size=cfg.input_size), bench).train()
    steps, rows = {}, []
    for index, pair in enumerate(distiller.pairs):
        raw = torch.randn(cfg.batch, *pair.student.shape, device=bench.device, requires_grad=True)
        target = torch.randn(cfg.batch, pair.teacher.channels, pair.teacher.height, pair.teacher.width,
                             device=bench.device)
        steps[pair.key] = _one_aligner_step(distiller, index, raw, target)
        s, t = pair.student, pair.teacher
        rows.append({"pair": pair.key, "student": [s.channels, s.height, s.width],
                     "teacher": [t.channels, t.height, t.width],
                     "params": sum(p.numel() for p in distiller.aligners[f"pair{index}"].parameters()),
                     "macs_per_image": aligner_macs(distiller.method, s.channels, t.channels, s.height, s.width)})
    return steps, rows


def _one_aligner_step(distiller: FeatureDistiller, index: int, raw: torch.Tensor, target: torch.Tensor) -> Step:
    def step():
        loss = feature_loss(distiller.align(index, raw), target, distiller.reduction)
        loss.backward()
        raw.grad = None
        distiller.aligners.zero_grad(set_to_none=True)
        return loss.detach()
    return step


# --- one config, end to end ---

def run_config(cfg: Config, settings: Settings) -> dict:
    """Time, size and compare every variant for one teacher/student pair."""
    models = make_models(cfg, settings)
    names = selected(settings)
    steps, errors = {}, {}
    for name in names:
        try:
            steps[name] = VARIANTS[name].build(make_bench(name, cfg, settings, models))
        except Exception as exc:  # a peer that cannot be set up is recorded, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}"
    rounds = _time_rounds(steps, settings, cfg.label)
    timing = rounds["variants"]
    for row in timing.values():
        row["images_per_s"] = cfg.batch / row["median"]
    aligner_steps, aligners = _aligner_steps(cfg, settings, models)
    aligner_timing = _time_rounds(aligner_steps, settings, f"{cfg.label} aligners")["variants"]
    base = timing["student"]["median"] + timing["teacher"]["median"]
    for row in aligners:
        row.update({k: aligner_timing[row["pair"]][k] for k in ("median", "q1", "q3", "iqr", "inner")})
        row["share_of_a_plus_b"] = row["median"] / base
    memory = _memory(cfg, settings, [n for n in settings.memory if n in steps])
    result = {"config": asdict(cfg), "variants": timing, "errors": errors, "aligners": aligners,
              "memory": memory, "ratios": _ratios(timing), "load_1min_per_round": rounds["load_1min_per_round"]}
    result["checks"] = _checks(result["ratios"])
    return result


def _ratios(timing: dict[str, dict]) -> dict[str, dict]:
    """c / (a + b) for every distillation variant: of medians, and per round (same-round samples)."""
    ratios = {}
    for name, row in timing.items():
        if name in ("student", "teacher", "student_amp", "teacher_amp"):
            continue
        a, b = ("student_amp", "teacher_amp") if VARIANTS[name].amp else ("student", "teacher")
        if a not in timing or b not in timing:
            continue
        per_round = [c / (x + y) for c, x, y in
                     zip(row["samples_s"], timing[a]["samples_s"], timing[b]["samples_s"], strict=True)]
        ratios[name] = {"ratio": row["median"] / (timing[a]["median"] + timing[b]["median"]),
                        "per_round": _stats(per_round),
                        "cpu_ratio": row["cpu_median"] / (timing[a]["cpu_median"] + timing[b]["cpu_median"])}
    return ratios


def _checks(ratios: dict[str, dict]) -> dict:
    ours = ratios["cwkd"]["ratio"] if "cwkd" in ratios else None  # absent when --variants left (c) out
    peers = {n: ratios[n]["ratio"] for n in PEERS if n in ratios}
    return {"target_ratio": TARGET_RATIO, "cwkd_ratio": ours,
            "ratio_within_target": ours <= TARGET_RATIO if ours is not None else None,
            "best_peer": min(peers, key=peers.get) if peers else None,
            "no_worse_than_any_peer": all(ours <= r for r in peers.values()) if peers and ours is not None else None}
