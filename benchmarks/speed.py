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
import copy
import gc
import json
import logging
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from cwkd.choices import Precision
from cwkd.core.aligner import aligner_macs
from cwkd.core.distiller import FeatureDistiller
from cwkd.core.features import probe
from cwkd.core.losses import feature_loss
from cwkd.core.pairing import Pair, pair_layers
from cwkd.runtime import fast_precisions, reuse_freed_memory
from cwkd.tasks.classification.models import create_model

TARGET_RATIO = 1.10
PEERS = ("timm_logit", "timm_feature", "torchdistill_fitnet")
RESULTS = Path(__file__).resolve().parent / "results"
console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass(frozen=True)
class Config:
    """One teacher/student pair at one batch and input size."""

    label: str
    teacher: str
    student: str
    batch: int
    input_size: int
    num_classes: int


#: What the accuracy benchmark trains: small enough for CPU, so its cost matters too.
SMALL = Config("small", "resnet18", "mobilenetv3_small_050", batch=64, input_size=64, num_classes=100)


@dataclass(frozen=True)
class Settings:
    """How to measure."""

    device: str = "cpu"
    threads: int = 1
    repeats: int = 7
    warmup: int = 2
    min_time: float = 0.3
    amp: str = "bf16"          # extra variants under autocast: bf16, fp16 or none
    memory: tuple[str, ...] = ("student", "teacher", "cwkd", "cwkd_all", "cwkd_hidden_cs", "cwkd_linear", "cwkd_logit",
                               "timm_logit", "timm_feature", "torchdistill_fitnet")
    memory_steps: int = 2
    peers: bool = True
    variants: tuple[str, ...] = ()  # time only these (optional ones included); empty: every default variant
    seed: int = 0
    system_malloc: bool = False  # True: glibc's default policy instead of cwkd's reuse_freed_memory


@dataclass
class Bench:
    """What a variant is built from: fresh models, one batch, the device and precision."""

    cfg: Config
    settings: Settings
    teacher: nn.Module
    student: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    amp: bool = False
    owners: list = field(default_factory=list)  # keeps built modules alive

    @property
    def device(self) -> torch.device:
        return self.x.device

    def autocast(self):
        """Autocast in the chosen half precision for ``*_amp`` variants, else nothing."""
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=_amp_dtype(self.settings))

    def updater(self, params) -> Callable[[torch.Tensor], None]:
        """backward + SGD step + zero_grad, with a GradScaler only for fp16."""
        opt = torch.optim.SGD(list(params), lr=1e-4, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and _amp_dtype(self.settings)
                                      is torch.float16)
        self.owners.append(opt)

        def update(loss: torch.Tensor) -> None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        return update


def _amp_dtype(settings: Settings) -> torch.dtype:
    return torch.float16 if settings.amp == "fp16" else torch.bfloat16


# --- the variants: each builder returns one step, a callable that returns its loss (or None) ---

Step = Callable[[], "torch.Tensor | None"]


def _student_step(b: Bench) -> Step:
    student = b.student.train()
    update = b.updater(student.parameters())

    def step():
        with b.autocast():
            loss = F.cross_entropy(student(b.x).float(), b.y)
        update(loss)
        return loss.detach()
    return step


def _teacher_step(b: Bench) -> Step:
    teacher = b.teacher.eval().requires_grad_(False)

    def step():
        with torch.inference_mode(), b.autocast():
            teacher(b.x)
    return step


def _cwkd_step(b: Bench, **options) -> Step:
    distiller = FeatureDistiller(b.teacher, b.student, input_size=b.cfg.input_size, **options)
    distiller = _place(distiller, b).train()
    return _loss_step(b, distiller, distiller.parameters())


def _loss_step(b: Bench, module: nn.Module, params, check: Callable[[torch.Tensor], bool] | None = None) -> Step:
    """A train step for any module whose forward(x, y) returns a dict with "loss".

    ``check(loss)``, when given, runs between forward and backward as the engine's non-finite check does;
    a False skips the update, as the engine skips a non-finite step.
    """
    update = b.updater(params)
    b.owners.append(module)

    def step():
        with b.autocast():
            loss = module(b.x, b.y)["loss"]
        if check is None or check(loss):
            update(loss)
        return loss.detach()
    return step


def _cwkd_sync_step(b: Bench) -> Step:
    """(c) with the engine's own per-step non-finite check, which reads the loss on the host."""
    from cwkd.training import nonfinite

    check = nonfinite.finite_everywhere  # looked up now: a renamed check is a setup error, not a crash mid-run
    distiller = _place(FeatureDistiller(b.teacher, b.student, input_size=b.cfg.input_size, pairs="last"), b).train()
    return _loss_step(b, distiller, distiller.parameters(), check=check)


def _timm_step(b: Bench, kind: str) -> Step:
    from timm.task import FeatureDistillationTask, LogitDistillationTask

    common = dict(criterion=nn.CrossEntropyLoss(), distill_loss_weight=1.0, task_loss_weight=1.0,
                  device=b.device, verbose=False)
    if kind == "logit":
        task = LogitDistillationTask(b.student, b.teacher, temperature=4.0, **common)
    else:  # pooled pre-logits MSE, with a Linear projection when the widths differ
        task = FeatureDistillationTask(b.student, b.teacher, **common)
    # the models are already placed (channels_last on CUDA); moving the task itself to channels_last failed on
    # an H100 ("required rank 4 tensor to use channels_last format")
    task = task.train()
    return _loss_step(b, task, task.trainable_module.parameters())


def _torchdistill_step(b: Bench) -> Step:
    """FitNets on torchdistill: a 1x1 conv hint regressor on the layers cwkd pairs, CE + MSE."""
    from torchdistill.core.distillation import DistillationBox

    logging.getLogger("torchdistill").setLevel(logging.WARNING)
    pair = _last_pair(b)
    s_path = f"student_model.{pair.student.name}"
    connector = {"io": "output", "path": s_path, "conv2d_kwargs": {
        "in_channels": pair.student.channels, "out_channels": pair.teacher.channels, "kernel_size": 1}}
    wrap = {"key": "SimpleLossWrapper", "kwargs": {}}
    ce = {"input": {"is_from_teacher": False, "module_path": ".", "io": "output"}, "target": {"uses_label": True}}
    hint = {"input": {"is_from_teacher": False, "module_path": "connector_dict.hint", "io": "output"},
            "target": {"is_from_teacher": True, "module_path": pair.teacher.name, "io": "output"}}
    config = {
        "num_epochs": 1,
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False,
                    "forward_hook": {"input": [], "output": [pair.teacher.name]}},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True,
                    "auxiliary_model_wrapper": {"key": "Connector4DAB",
                                                "kwargs": {"connectors": {"hint": connector}}},
                    "forward_hook": {"input": [], "output": [s_path, "connector_dict.hint"]}},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 1e-4, "momentum": 0.9, "weight_decay": 1e-4}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {
            "ce": {"criterion": {"key": "CrossEntropyLoss", "kwargs": {}}, "weight": 1.0,
                   "criterion_wrapper": {**wrap, "kwargs": ce}},
            "hint": {"criterion": {"key": "MSELoss", "kwargs": {"reduction": "mean"}}, "weight": 1.0,
                     "criterion_wrapper": {**wrap, "kwargs": hint}}}}},
    }
    # DistillationBox never switches the teacher's mode; hand it over in eval mode like the others.
    box = DistillationBox(b.teacher.eval(), b.student, {}, config, b.device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    b.owners.append(box)

    def step():
        loss = box.forward_process(b.x, b.y, {})
        box.post_forward_process(loss=loss)
        return loss.detach()
    return step


def _last_pair(b: Bench) -> Pair:
    size = b.cfg.input_size
    return pair_layers(probe(b.student, size), probe(b.teacher, size), "last")[-1]


def _place(module: nn.Module, b: Bench) -> nn.Module:
    module = module.to(b.device)
    return module.to(memory_format=torch.channels_last) if b.device.type == "cuda" else module


@dataclass(frozen=True)
class Variant:
    what: str
    build: Callable[[Bench], Step]
    amp: bool = False
    peer: bool = False
    optional: bool = False  # timed only when --variants names it


VARIANTS: dict[str, Variant] = {
    "student": Variant("(a) student train step alone", _student_step),
    "teacher": Variant("(b) teacher inference alone", _teacher_step),
    "cwkd": Variant("(c) cwkd, cwt aligner, pairs=last", lambda b: _cwkd_step(b, pairs="last")),
    "cwkd_all": Variant("cwkd, cwt aligner, pairs=all", lambda b: _cwkd_step(b, pairs="all")),
    "cwkd_hidden_cs": Variant("cwkd, cwt aligner, pairs=last, --hidden = student channels",
                              lambda b: _cwkd_step(b, pairs="last", hidden=_last_pair(b).student.channels)),
    "cwkd_linear": Variant("cwkd, linear (FitNets) aligner, pairs=last",
                           lambda b: _cwkd_step(b, pairs="last", method="linear")),
    "cwkd_logit": Variant("cwkd, logit KD only (method=none)",
                          lambda b: _cwkd_step(b, method="none", kd_weight=1.0)),
    "timm_logit": Variant("timm LogitDistillationTask", lambda b: _timm_step(b, "logit"), peer=True),
    "timm_feature": Variant("timm FeatureDistillationTask (pooled)", lambda b: _timm_step(b, "feature"),
                            peer=True),
    "torchdistill_fitnet": Variant("torchdistill DistillationBox, FitNets hint", _torchdistill_step,
                                   peer=True),
    "student_amp": Variant("(a) student, autocast", _student_step, amp=True),
    "teacher_amp": Variant("(b) teacher, autocast", _teacher_step, amp=True),
    "cwkd_amp": Variant("(c) cwkd pairs=last, autocast", lambda b: _cwkd_step(b, pairs="last"), amp=True),
    "cwkd_sync": Variant("(c) + the engine's non-finite check (host sync)", _cwkd_sync_step, optional=True),
    "cwkd_amp_sync": Variant("(c) autocast + the engine's non-finite check (host sync)", _cwkd_sync_step,
                             amp=True, optional=True),
    "timm_logit_amp": Variant("timm LogitDistillationTask, autocast", lambda b: _timm_step(b, "logit"), amp=True,
                              peer=True, optional=True),
}


def _selected(settings: Settings) -> list[str]:
    if settings.variants:
        return [n for n in VARIANTS if n in settings.variants and (settings.peers or not VARIANTS[n].peer)]
    return [n for n, v in VARIANTS.items()
            if (settings.peers or not v.peer) and (settings.amp != "none" or not v.amp) and not v.optional]


def _models(cfg: Config, settings: Settings) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """Randomly initialised teacher and student (weights do not change speed), and one batch."""
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    teacher = create_model(cfg.teacher, num_classes=cfg.num_classes).to(device)
    student = create_model(cfg.student, num_classes=cfg.num_classes).to(device)
    x = torch.randn(cfg.batch, 3, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), device=device)
    if device.type == "cuda":  # the fast layout for convolutions under autocast on tensor cores
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
        x = x.contiguous(memory_format=torch.channels_last)
    return teacher, student, x, y


def _bench(name: str, cfg: Config, settings: Settings, models: tuple, fresh: bool = False) -> Bench:
    teacher, student, x, y = models
    if not fresh:  # every variant gets its own copies: no shared hooks, optimizer or BN state
        teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    return Bench(cfg, settings, teacher, student, x, y, amp=VARIANTS[name].amp)


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
    with _malloc_policy(settings, device):
        _measure_memory(name, cfg, settings, device, send)


def _malloc_policy(settings: Settings, device: torch.device):
    """What cwkd's engine does for a CPU run (keep freed memory), unless --system-malloc."""
    return nullcontext(False) if settings.system_malloc else reuse_freed_memory(device)


def _measure_memory(name: str, cfg: Config, settings: Settings, device: torch.device, send) -> None:
    try:
        torch.set_num_threads(settings.threads)
        bench = _bench(name, cfg, settings, _models(cfg, settings), fresh=True)
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
    bench = _bench("cwkd_all", cfg, settings, models)
    distiller = _place(FeatureDistiller(bench.teacher, bench.student, pairs="all",
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
    models = _models(cfg, settings)
    names = _selected(settings)
    steps, errors = {}, {}
    for name in names:
        try:
            steps[name] = VARIANTS[name].build(_bench(name, cfg, settings, models))
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


# --- reporting ---

def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def _bf16_note(results: dict) -> str:
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


def print_config(result: dict, bf16_note: str = "") -> None:
    """A rich table of one config's variants, then its aligners and target checks."""
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
            name, VARIANTS[name].what + (bf16_note if VARIANTS[name].amp else ""), _ms(row["median"]), _ms(row["iqr"]),
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
    lines, note = [], _bf16_note(results)
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
    with _malloc_policy(settings, torch.device(args.device)) as kept:
        results["freed_memory_kept"] = kept
        for cfg in configs:
            result = run_config(cfg, settings)
            results["configs"].append(result)
            print_config(result, _bf16_note(results))
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - start
    suffix = ("_system_malloc" if args.system_malloc else "") + ("_quick" if args.quick else "")
    out = args.out or RESULTS / f"speed_{args.device}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    load = results["machine"]["load_average_start"][0], results["machine"]["load_average_end"][0]
    console.print(f"load average (1 min) {load[0]:.2f} -> {load[1]:.2f} on {os.cpu_count()} cores; "
                  f"{results['wall_s']:.0f} s; wrote {out}")
    if args.markdown:
        console.print(markdown(results), markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
