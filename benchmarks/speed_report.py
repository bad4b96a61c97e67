"""What speed.py prints and records besides the timings: a config's tables on the console, the docs' markdown
tables, and the versions and machine behind the numbers."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch
from rich.table import Table
from speed_timing import TARGET_RATIO, console
from speed_variants import VARIANTS, Settings

from cwkd.choices import Precision
from cwkd.runtime import fast_precisions


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def bf16_note(results: dict) -> str:
    """What the bf16 autocast rows add to their description: whether bf16 was native (else nothing).

    Emulated bf16 is 8-30x slower than fp32 (issue 15), so a bf16 row means little without it.
    Result files written before ``bf16_native`` was recorded count as native when their CPU flags
    list avx512_bf16 or amx_bf16, and get no note otherwise.
    """
    machine = results.get("machine", {})
    flags = set(machine.get("cpu_flags", ())) & {"avx512_bf16", "amx_bf16"}
    native = machine.get("bf16_native", True if flags else None)
    if results.get("settings", {}).get("amp") != "bf16" or native is None:
        return ""
    return ", bf16 native" if native else ", bf16 NOT native (emulated)"


def print_config(result: dict, note: str = "") -> None:
    """A rich table of one config's variants (``note`` added to the autocast rows: :func:`bf16_note`), then its
    aligners and target checks."""
    cfg = result["config"]
    table = Table(title=f"{cfg['label']}: {cfg['teacher']} -> {cfg['student']}, batch {cfg['batch']}, "
                        f"{cfg['input_size']} px", title_justify="left")
    for column in ("variant", "what", "median ms", "IQR ms", "c/(a+b)", "per-round IQR", "CPU-time c/(a+b)",
                   "step MiB", "peak MiB"):
        table.add_column(column, justify="left" if column in ("variant", "what") else "right")
    for name, row in result["variants"].items():
        ratio = result["ratios"].get(name)
        mem = result["memory"].get(name, {})
        table.add_row(
            name, VARIANTS[name].what + (note if VARIANTS[name].amp else ""), _ms(row["median"]), _ms(row["iqr"]),
            f"{ratio['ratio']:.3f}" if ratio else "",
            f"{ratio['per_round']['q1']:.3f}-{ratio['per_round']['q3']:.3f}" if ratio else "",
            f"{ratio['cpu_ratio']:.3f}" if ratio else "",
            f"{mem['step_mib']:,.0f}" if "step_mib" in mem else mem.get("error", "")[:30],
            f"{mem['peak_mib']:,.0f}" if "peak_mib" in mem else "",
        )
    console.print(table)
    for name, error in result["errors"].items():
        console.print(f"[yellow]{name} could not be set up: {error}")
    aligners = Table(title="aligner forward + loss + backward alone, per pair (pairs=all)", title_justify="left")
    for column in ("pair", "student CxHxW", "teacher CxHxW", "params", "MMAC/img", "median ms", "% of a+b"):
        aligners.add_column(column, justify="left" if column == "pair" else "right")
    for row in result["aligners"]:
        aligners.add_row(row["pair"], "x".join(map(str, row["student"])), "x".join(map(str, row["teacher"])),
                         f"{row['params']:,}", f"{row['macs_per_image'] / 1e6:,.1f}", _ms(row["median"]),
                         f"{100 * row['share_of_a_plus_b']:.1f}")
    console.print(aligners)
    load = result["load_1min_per_round"]
    console.print(f"load average (1 min) over the rounds: {min(load):.2f}-{max(load):.2f}")
    checks = result["checks"]
    verdict = {True: "[green]PASS", False: "[red]FAIL", None: "[dim]n/a"}
    ratio = f"{checks['cwkd_ratio']:.3f}" if checks["cwkd_ratio"] is not None else "n/a"
    console.print(f"target: cwkd ratio {ratio} <= {TARGET_RATIO}: "
                  f"{verdict[checks['ratio_within_target']]}[/]; no worse than any peer "
                  f"(best: {checks['best_peer']}): {verdict[checks['no_worse_than_any_peer']]}[/]\n")


def environment(settings: Settings) -> dict:
    """Versions, machine and load: what a reader needs to trust or reproduce the numbers."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "timm", "cwkd", "torchdistill", "torchvision"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cpu = "unknown"
    flags: list[str] = []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == "unknown":
                cpu = value.strip()
            if key.strip() == "flags" and not flags:
                flags = sorted(f for f in value.split() if f.startswith(("avx512_bf16", "amx", "avx2")))
    machine = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
               "load_average_start": list(os.getloadavg()), "platform": platform.platform(),
               "bf16_native": Precision.bf16 in fast_precisions(torch.device(settings.device))}
    if settings.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    return {"versions": versions, "machine": machine}


def markdown(results: dict) -> str:
    """The docs tables: variants (time, ratio, memory) and per-pair aligner cost, per config."""
    lines, note = [], bf16_note(results)
    for res in results["configs"]:
        cfg = res["config"]
        lines += [f"\n**{cfg['label']}**: {cfg['teacher']} -> {cfg['student']}, batch {cfg['batch']}, "
                  f"{cfg['input_size']} px\n",
                  "| variant | median ms | IQR ms | c/(a+b) | per-round ratio (IQR) | CPU-time ratio | step MiB |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in res["variants"].items():
            ratio, mem = res["ratios"].get(name), res["memory"].get(name, {})
            rounds = ratio["per_round"] if ratio else {}
            cells = [f"{name}: {VARIANTS[name].what}{note if VARIANTS[name].amp else ''}", _ms(row["median"]),
                     _ms(row["iqr"]),
                     f"{ratio['ratio']:.3f}" if ratio else "",
                     f"{rounds['median']:.3f} ({rounds['q1']:.3f}-{rounds['q3']:.3f})" if ratio else "",
                     f"{ratio['cpu_ratio']:.3f}" if ratio else "",
                     f"{mem['step_mib']:,.0f}" if "step_mib" in mem else ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "| aligner pair (pairs=all) | student | teacher | params | MMAC/img | median ms | % of a+b |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for row in res["aligners"]:
            lines.append(f"| {row['pair']} | {'x'.join(map(str, row['student']))} | "
                         f"{'x'.join(map(str, row['teacher']))} | {row['params']:,} | "
                         f"{row['macs_per_image'] / 1e6:,.1f} | {_ms(row['median'])} | "
                         f"{100 * row['share_of_a_plus_b']:.1f} |")
    return "\n".join(lines)
