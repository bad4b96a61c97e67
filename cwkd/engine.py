"""The training engine: one loop for ``cwkd train`` (method none) and ``cwkd distill``.

Read it top to bottom: :func:`run` builds the pieces, then each epoch trains
(:func:`train_one_epoch`), evaluates (:func:`evaluate`) and saves (:mod:`cwkd.rundir`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cwkd import rundir
from cwkd.build import (
    Dist,
    autocast_dtype,
    build_student,
    build_teacher,
    resolve_device,
    reuse_freed_memory,
    setup_distributed,
    teacher_in_chans,
)
from cwkd.checkpoint import append_jsonl
from cwkd.config import Precision, TrainConfig
from cwkd.console import RunConsole
from cwkd.distiller import FeatureDistiller, Renormalize
from cwkd.errors import ConfigError, TrainingError
from cwkd.loaders import EpochSampler, build_loaders, check_split_sizes, data_config
from cwkd.precision import precision_advice, precision_warning, resolve_precision
from cwkd.runlock import RunLock
from cwkd.tasks import get_task
from cwkd.tasks.base import TaskSpec


@dataclass
class RunResult:
    """Where a finished run's files are, and how good its best checkpoint is (``best_metric``: its task's)."""

    out: Path
    best_metric: str
    best_value: float
    best_epoch: int
    last: dict
    student: nn.Module


def run(cfg: TrainConfig, *, resume: str | Path | None = None, console: RunConsole | None = None) -> RunResult:
    """Train or distill as ``cfg`` says, writing a run directory; ``resume`` continues one.

    Example:
        >>> cfg = TrainConfig(data="fashion-mnist-mini", student="test_resnet", method="none", epochs=1)
        >>> result = run(cfg)  # doctest: +SKIP
    """
    if resume is not None:
        cfg = rundir.load_config(resume, options=cfg.extra.get("resume_options"))
    device = resolve_device(cfg.device, cfg.precision)
    rank = setup_distributed(device)
    console = console or RunConsole(quiet=cfg.quiet, enabled=rank.main)
    # `auto` becomes what is fast on this device; config.json saves the result, so a resume keeps it.
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    if rank.main and (warning := precision_warning(cfg.precision, device)):
        console.warn(warning)
    out = Path(resume) if resume is not None else Path(cfg.out or cfg.default_out(time.strftime("%Y%m%d-%H%M%S")))
    with RunLock(out, enabled=rank.main) as lock:  # one process per run directory, released on every exit
        return _run(cfg, out, resume, device, rank, console, lock)


def _run(cfg: TrainConfig, out: Path, resume: str | Path | None, device: torch.device, rank: Dist,
         console: RunConsole, lock: RunLock) -> RunResult:
    """The run itself; ``prepare`` takes ``lock`` as soon as ``out`` exists, before anything is deleted."""
    if rank.main:  # refuse a taken --out now; write nothing until data and models have loaded
        rundir.prepare(out, resume=resume is not None, overwrite=cfg.overwrite, check_only=True, cfg=cfg, lock=lock)
    _seed_all(cfg.seed)

    # Data, student, teacher, and the one trainable module that holds student + aligners.
    task = get_task(cfg.task)
    if cfg.kd_weight > 0 and not task.has_logits:
        raise ConfigError(f"--kd-weight {cfg.kd_weight:g}: logit KD needs class logits, and {task.name.value} "
                          "models have none; drop --kd-weight (feature distillation works as it is)")
    spec = task.load_data(cfg.data, root=cfg.data_root, download=cfg.download, skip_corrupt=cfg.skip_corrupt)
    check_split_sizes(spec, rank.world)
    in_chans = cfg.in_chans or teacher_in_chans(cfg) or spec.channels
    if spec.modes is not None:
        console.info(spec.modes.describe(in_chans))
    student = build_student(cfg, spec.num_classes, in_chans)
    teacher, teacher_source = build_teacher(cfg, spec.num_classes, in_chans) if cfg.uses_teacher else (None, {})
    dcfg = data_config(student, input_size=cfg.input_size or task.default_input_size(spec),
                       in_chans=in_chans, native_size=spec.native_size, mean=cfg.mean, std=cfg.std)
    # Batches are normalised for the student; a teacher trained on other statistics gets them remapped.
    teacher_input = Renormalize.between((dcfg["mean"], dcfg["std"]), (teacher_source["mean"], teacher_source["std"])) \
        if teacher is not None else None
    distiller = FeatureDistiller(
        teacher, student, pairs=cfg.pairs, method=cfg.method, alpha=cfg.alpha, hidden=cfg.hidden,
        input_size=dcfg["input_size"], reduction=cfg.reduction, kd_weight=cfg.kd_weight,
        kd_temperature=cfg.kd_temperature, label_smoothing=cfg.label_smoothing, teacher_input=teacher_input,
        task_loss=task.loss_fn(cfg.label_smoothing), logits_of=task.logits if task.has_logits else None,
        feature_prefix=task.feature_prefix(student),
    )
    channels_last = device.type == "cuda"
    distiller.to(device, memory_format=torch.channels_last) if channels_last else distiller.to(device)
    if cfg.compile:  # compile in place: the module objects stay, so the feature hooks still fire
        distiller.student.compile()
        if teacher is not None:
            teacher.compile()
    model: nn.Module = distiller
    if rank.enabled:
        model = DistributedDataParallel(distiller, device_ids=[device.index] if device.type == "cuda" else None)
    if rank.main:
        rundir.prepare(out, resume=resume is not None, overwrite=cfg.overwrite, cfg=cfg, lock=lock)
    train_loader, val_loader = build_loaders(spec, dcfg, batch_size=cfg.batch_size, workers=cfg.workers,
                                             device=device, distributed=rank.enabled, seed=cfg.seed,
                                             datasets=task.datasets(spec, dcfg))

    # Optimizer, schedule and loss scaler; then the saved state when resuming.
    steps_per_epoch = len(train_loader)
    optimizer = _optimizer(distiller, cfg)
    scheduler = _scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision is Precision.fp16)
    meta = rundir.checkpoint_metadata(cfg, distiller, dcfg, spec, in_chans, teacher_source)
    start_epoch, start_step, best = 0, 0, rundir.no_best(task.best_metric)
    if resume is not None:
        start_epoch, start_step, best = rundir.restore(out, distiller, optimizer, scheduler, scaler, device,
                                                       task.best_metric)
        console.info(f"resuming {out} at epoch {start_epoch + 1}" + (f", step {start_step}" if start_step else ""))
    elif rank.main:
        rundir.write_config(out, cfg, distiller, dcfg, spec, teacher_source)
    console.info(_describe(cfg, distiller, spec, dcfg, device, rank))

    last: dict = {}
    with rundir.StopSignals() as stop, reuse_freed_memory(device):
        if rank.main:
            rundir.check_space(out, distiller, optimizer)
        if start_epoch >= cfg.epochs:
            console.info(f"{out} already finished {start_epoch} epochs; resume with a larger --epochs to go on")
        reported_bad = 0
        for epoch in range(start_epoch, cfg.epochs):
            skip = start_step if epoch == start_epoch else 0  # steps of this epoch done before a stop
            _set_epoch(train_loader, cfg.seed, epoch, skip * cfg.batch_size)
            started = time.perf_counter()
            train = train_one_epoch(model, distiller, train_loader, optimizer, scheduler, scaler, cfg, device,
                                    steps=steps_per_epoch - skip, stop=stop, console=console,
                                    label=f"epoch {epoch + 1}/{cfg.epochs}", epoch=epoch, first_step=skip,
                                    rank=rank.rank)
            if stop.requested and skip + train["batches"] < steps_per_epoch:
                if rank.main:
                    rundir.save_interrupted(out, distiller, optimizer, scheduler, scaler, meta, epoch,
                                            skip + train["batches"], best)
                raise rundir.RunInterrupted(out, stop.signal_number)
            if train["batches"] and not train["steps"]:
                raise TrainingError(f"every step of epoch {epoch + 1} had a non-finite loss (all skipped under "
                                    f"--skip-nonfinite); lower --lr{_fp16_advice(cfg, device, ' or ')}")
            val = evaluate(distiller.student, val_loader, device, cfg.precision, channels_last, rank, task=task.name)
            last = _epoch_record(epoch, train, val, optimizer, time.perf_counter() - started, task)
            _check_diverged(distiller, last, cfg, out, rank.main)  # poisoned weights never become last or best
            if rank.main:
                best = rundir.save_epoch(out, distiller, optimizer, scheduler, scaler, meta, last, best)
            console.info(_epoch_line(last, cfg.epochs, task))
            bad = sum(getattr(split, "skipped", 0) for split in (spec.train, spec.val))
            if bad > reported_bad:
                console.warn(f"skipped {bad} unreadable image(s) so far (--skip-corrupt); their paths are above")
                reported_bad = bad
            if stop.requested and epoch + 1 < cfg.epochs:  # the signal came after the last step: epoch saved
                raise rundir.RunInterrupted(out, stop.signal_number)
    console.table("cwkd run summary", [f"best val {task.metrics[task.best_metric]}", "at epoch", "run directory"],
                  [[f"{best['value']:.2f}%", best["epoch"] + 1, str(out)]])
    return RunResult(out=out, best_metric=task.best_metric, best_value=best["value"], best_epoch=best["epoch"] + 1,
                     last=last, student=distiller.student)


def train_one_epoch(model: nn.Module, distiller: FeatureDistiller, loader, optimizer, scheduler, scaler,
                    cfg: TrainConfig, device: torch.device, *, steps: int, stop, console: RunConsole,
                    label: str, epoch: int = 0, first_step: int = 0, rank: int = 0) -> dict:
    """Train on up to ``steps`` batches of ``loader``, which starts at step ``first_step`` of ``epoch``.

    Returns the mean loss parts, images/s, the optimizer ``steps`` done and the ``batches`` used (a
    skipped non-finite step uses a batch but is no step). Each step reseeds the RNG from (seed, epoch,
    step, rank), so a run resumed mid-epoch draws what an uninterrupted run would.
    """
    distiller.train()
    task = get_task(cfg.task)
    amp = autocast_dtype(cfg.precision)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    done = used = images_seen = skipped = 0
    started = time.perf_counter()
    console.start(label, steps)
    batches = iter(loader)
    while used < steps and not stop.requested:  # asked before fetching, so a stop never waits on data
        batch = next(batches, None)
        if batch is None:
            break
        step, used = first_step + used, used + 1
        _seed_all(cfg.seed, epoch, step, rank)
        images, targets = task.batch_to(batch, device, memory_format)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(images, targets)
        loss = out["loss"]
        optimizer.zero_grad(set_to_none=True)
        if not _finite_everywhere(loss):
            skipped += 1
            _nonfinite(out, step, skipped, cfg, device, label)  # raises once past --skip-nonfinite
            continue
        scaler.scale(loss).backward()
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(distiller.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        for key in ("loss", "task_loss", "feat_loss", "kd_loss"):
            if key in out:
                sums[key] += out[key].detach()
        done += 1
        images_seen += len(images)
        if done % 10 == 0 or used == steps:  # done > 0 here: this step counted
            seconds = time.perf_counter() - started
            parts = {k.removesuffix("_loss") if k != "loss" else k: v.item() / done for k, v in sums.items()}
            console.advance(used, {**parts, "img/s": images_seen / seconds})
    console.stop()
    means = _reduce_means(sums, done)
    seconds = time.perf_counter() - started
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {**means, "steps": done, "batches": used, "images_per_s": images_seen * world / max(seconds, 1e-9)}


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (ranks must agree to skip a step, or DDP would hang)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def evaluate(model: nn.Module, loader, device: torch.device, precision: Precision = Precision.fp32,
             channels_last: bool = False, rank: Dist | None = None, *, task: str | None = None) -> dict:
    """The task's validation scores of ``model`` over ``loader`` (its loss, metrics and image count).

    ``task`` defaults to classification (top-1, top-5 and mean cross-entropy). Under DDP each rank
    scores its shard and the sums are added.
    """
    return get_task(task).evaluate(model, loader, device, precision, channels_last, rank)


def _optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on biases and norm weights."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer.value == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Linear warmup, then cosine decay to zero, stepped every optimizer step."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _nonfinite(out: dict, step: int, count: int, cfg: TrainConfig, device: torch.device,
               label: str = "this epoch") -> None:
    """Stop on a NaN/inf loss unless ``--skip-nonfinite`` still allows skipping this step."""
    if count <= cfg.skip_nonfinite:
        return
    parts = ", ".join(f"{k}={v.item():.4g}" for k, v in out.items() if k.endswith("loss"))
    cause = _likely_cause(out, cfg)
    cause = f"{cause}; otherwise " if cause else ""
    raise TrainingError(
        f"non-finite loss in {label}, step {step + 1} ({parts}); {cause}lower --lr (it was {cfg.lr:g}), "
        f"{_fp16_advice(cfg, device, end=', ')}"
        "add --clip-grad 1.0, or allow a few skipped steps with --skip-nonfinite N; the checkpoints of the "
        "last finished epoch are kept"
    )


def _fp16_advice(cfg: TrainConfig, device: torch.device, start: str = "", end: str = "") -> str:
    """Under fp16, whose range overflows first: the fast precisions to use instead (else nothing)."""
    if cfg.precision is not Precision.fp16:
        return ""
    return f"{start}use {precision_advice(device, Precision.fp16)} instead of fp16{end}"


def _check_diverged(distiller: FeatureDistiller, record: dict, cfg: TrainConfig, out: Path, main: bool) -> None:
    """Stop, keeping the last good checkpoints, when the weights or the val loss went non-finite this epoch.

    The epoch's metrics line is still written (its non-finite values as null), so the user can see it.
    Every rank sees the same weights and the all-reduced val loss, so ranks stop together.
    """
    poisoned = [name for name, t in distiller.state_dict().items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not poisoned and math.isfinite(record["val_loss"]):
        return
    if main:
        append_jsonl(out / "metrics.jsonl", record)
    what = (f"{len(poisoned)} weight tensor(s) became non-finite (e.g. {poisoned[0]})" if poisoned
            else f"the validation loss is {record['val_loss']}")
    parts = {"feat_loss": math.inf} if poisoned and all(n.startswith("aligners.") for n in poisoned) else {}
    cause = _likely_cause(parts, cfg, distiller.teacher) or (
        f"the task loss or the weights blew up: --lr {cfg.lr:g} is likely too large; lower it or add --clip-grad 1.0")
    kept = ("the checkpoints of the last finished epoch are kept (not overwritten with these weights)"
            if record["epoch"] > 1 else "no checkpoint was written")
    raise TrainingError(f"training diverged in epoch {record['epoch']}/{cfg.epochs}: {what}; {cause}; {kept}")


def _likely_cause(parts: dict, cfg: TrainConfig, teacher: nn.Module | None = None) -> str | None:
    """Which loss term went non-finite, as advice: the teacher, the feature loss (alpha) or logit KD.

    None when none of those explains it: then the task loss did, and the learning rate is the likely cause.
    """
    def bad(key: str) -> bool:
        value = parts.get(key)
        return value is not None and not math.isfinite(float(value))

    if teacher is not None and any(t.is_floating_point() and not bool(torch.isfinite(t).all())
                                   for t in teacher.state_dict().values()):
        return "the teacher's weights are non-finite, so its outputs are: check --teacher / --teacher-weights"
    if bad("feat_loss") and not bad("task_loss"):
        return (f"the feature loss went non-finite while the task loss did not: --alpha {cfg.alpha:g} is likely "
                "too large (or the teacher's outputs are non-finite or huge); lower --alpha")
    if bad("kd_loss") and not bad("task_loss"):
        return f"the logit-KD loss went non-finite first: lower --kd-weight (it was {cfg.kd_weight:g})"
    return None


def _reduce_means(sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    keys = sorted(sums)
    if not keys:
        return {}
    packed = torch.stack([sums[k] for k in keys] + [torch.tensor(float(steps), device=sums[keys[0]].device)])
    if dist.is_initialized():
        dist.all_reduce(packed)
    count = max(packed[-1].item(), 1.0)
    return {k: v / count for k, v in zip(keys, packed[:-1].tolist(), strict=True)}


def _epoch_record(epoch: int, train: dict, val: dict, optimizer, seconds: float, task: TaskSpec) -> dict:
    record = {"epoch": epoch + 1}
    for key in ("loss", "task_loss", "feat_loss", "kd_loss"):
        if key in train:
            record[f"train_{key}"] = train[key]
    record.update({
        "val_loss": val["loss"], **{f"val_{name}": val[name] for name in task.metrics},
        "lr": optimizer.param_groups[0]["lr"], "images_per_s": train["images_per_s"], "epoch_s": seconds,
    })
    return record


def _epoch_line(rec: dict, epochs: int, task: TaskSpec) -> str:
    feat = f" feat {rec['train_feat_loss']:.4f}" if "train_feat_loss" in rec else ""
    kd = f" kd {rec['train_kd_loss']:.4f}" if "train_kd_loss" in rec else ""
    scores = " ".join(f"{label} {rec[f'val_{name}']:.2f}%" for name, label in task.metrics.items())
    return (f"epoch {rec['epoch']}/{epochs}  train loss {rec['train_loss']:.4f} (task "
            f"{rec['train_task_loss']:.4f}{feat}{kd})  val {scores} loss {rec['val_loss']:.4f}  "
            f"{rec['images_per_s']:.0f} img/s "
            f"{rec['epoch_s']:.1f}s")


def _describe(cfg: TrainConfig, distiller: FeatureDistiller, spec, dcfg: dict, device, rank: Dist) -> str:
    pairs = ", ".join(
        f"{p.student.name} ({p.student.channels}x{p.student.height}x{p.student.width}) -> {p.teacher.name} "
        f"({p.teacher.channels}x{p.teacher.height}x{p.teacher.width})" for p in distiller.pairs
    ) or "none"
    kd = f", kd weight {cfg.kd_weight} T={cfg.kd_temperature}" if cfg.kd_weight else ""
    remap = distiller.teacher_input
    stats = (f"; input mean {_fmt_stats(dcfg['mean'])} std {_fmt_stats(dcfg['std'])}"
             + (" (remapped to the teacher's own statistics before it sees them)" if remap is not None else ""))
    what = (f"method {cfg.method.value}, alpha {cfg.alpha}{kd}, pairs: {pairs}" if cfg.uses_teacher
            else "plain training (no teacher)")
    return (f"{cfg.student} on {spec.name} ({spec.num_classes} classes, input {tuple(dcfg['input_size'])}), "
            f"{what}; device {device}, precision {cfg.precision.value}, {rank.world} process(es){stats}")


def _fmt_stats(values) -> str:
    return "/".join(f"{v:.3g}" for v in values)


def _seed_all(seed: int, *mix: int) -> None:
    """Seed torch (every device) and Python from ``seed``, mixed with ``mix`` (epoch, step, rank)."""
    for value in mix:
        seed = (seed * 1_000_003 + value) % 2**63
    random.seed(seed)
    torch.manual_seed(seed)


def _set_epoch(loader, seed: int, epoch: int, start: int = 0) -> None:
    """Make the epoch's order and augmentations depend on (seed, epoch) alone, from sample ``start`` on.

    ``start`` (samples of this rank already trained) needs the :class:`~cwkd.loaders.EpochSampler` that
    :func:`~cwkd.loaders.build_loaders` gives; a resumed run then finishes the epoch it was stopped in.
    """
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch, start)
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed * 1000 + epoch)
