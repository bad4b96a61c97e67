"""The training engine: one loop for ``cwkd train`` (method none) and ``cwkd distill``.

Read it top to bottom: :func:`run` builds the pieces, then each epoch trains
(:func:`train_one_epoch`), evaluates (:func:`evaluate`) and saves (:mod:`cwkd.training.rundir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cwkd.core.distiller import FeatureDistiller, Renormalize
from cwkd.data.loading import DataConfig, build_loaders, check_split_sizes, data_config, set_epoch
from cwkd.errors import ConfigError, NonfiniteLoss, RunInterrupted, TrainingError
from cwkd.evaluation import evaluate
from cwkd.files.metadata import CheckpointMeta
from cwkd.runtime import (
    Dist,
    autocast,
    precision_warning,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
    setup_distributed,
)
from cwkd.tasks import get_task
from cwkd.tasks.base import TaskSpec
from cwkd.training import rundir, signals
from cwkd.training.build import build_student, build_teacher, run_metadata, teacher_in_chans
from cwkd.training.config import TrainConfig
from cwkd.training.console import RunConsole, epoch_line
from cwkd.training.nonfinite import (
    NonfiniteWatch,
    check_diverged,
    finite_everywhere,
    fp16_advice,
    raise_nonfinite,
    saved_checkpoints,
)
from cwkd.training.optim import Stepper
from cwkd.training.resume import load_config, no_best, restore
from cwkd.training.runlock import RunLock
from cwkd.training.teachercheck import TeacherSource, check_teacher, recorded_score
from cwkd.training.tracking import Tracking, require


@dataclass
class RunResult:
    """Where a finished run's files are, and how good its best checkpoint is (``best_metric``: its task's)."""

    out: Path
    best_metric: str
    best_value: float
    best_epoch: int
    last: dict
    student: nn.Module


@dataclass
class _Pieces:
    """Everything a run's loop uses, built once by :func:`_build` (the nanoGPT-style setup block)."""

    task: TaskSpec
    spec: object                     # the task's data spec (splits, classes, channels)
    dcfg: DataConfig                 # the student's input: size, mean, std, interpolation, crop
    distiller: FeatureDistiller      # student + aligners (+ frozen teacher): the one trainable module
    model: nn.Module                 # the distiller, or its DDP wrapper
    train_loader: object
    val_loader: object
    stepper: Stepper                 # optimizer, schedule, fp16 loss scaler
    autocast: Callable[[], torch.autocast]  # built once per run; call it around a forward pass
    channels_last: bool              # the memory format of batches (on CUDA)
    meta: CheckpointMeta             # checkpoint metadata
    start_epoch: int = 0
    start_step: int = 0              # steps of start_epoch done before a stop
    best: dict = field(default_factory=dict)
    tracking: Tracking = field(default_factory=Tracking)  # --log: TensorBoard, wandb, trackio (none by default)


def run(cfg: TrainConfig, *, resume: str | Path | None = None, resume_options: dict | None = None,
        console: RunConsole | None = None) -> RunResult:
    """Train or distill as ``cfg`` says, writing a run directory; ``resume`` continues one.

    ``resume_options`` are options given again when resuming (``{"epochs": 20}``): those a resumed run
    may change replace the saved ones, any other must equal the saved value (:func:`cwkd.training.resume.load_config`).

    Example:
        >>> cfg = TrainConfig(data="fashion-mnist-mini", student="test_resnet", method="none", epochs=1)
        >>> result = run(cfg)  # doctest: +SKIP
    """
    if resume is not None:
        cfg = load_config(resume, options=resume_options)
    require(cfg.log)  # a --log tracker that is not installed stops the run before anything loads
    device = resolve_device(cfg.device, cfg.precision)
    rank = setup_distributed(device)
    console = console or RunConsole(quiet=cfg.quiet, enabled=rank.main)
    # `auto` becomes what is fast on this device; config.json saves the result, so a resume keeps it.
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    if rank.main and (warning := precision_warning(cfg.precision, device)):
        console.warn(warning)
    out = Path(resume) if resume is not None else Path(cfg.out or cfg.default_out(time.strftime("%Y%m%d-%H%M%S")))
    with RunLock(out, enabled=rank.main) as lock:  # one process per run directory, released on every exit
        if rank.main:  # refuse a taken --out now; write nothing until data and models have loaded
            rundir.prepare(out, resume=resume is not None, overwrite=cfg.overwrite, check_only=True, cfg=cfg,
                           lock=lock)
        _seed_all(cfg.seed)
        p = _build(cfg, out, resume is not None, device, rank, console, lock)
        console.info(_describe(cfg, p.distiller, p.spec, p.dcfg, device, rank, p.train_loader.num_workers))
        keep_freed = reuse_freed_memory(device) if p.task.steady_shapes else contextlib.nullcontext(False)
        with signals.StopSignals() as stop, keep_freed, \
                Tracking(cfg.log, out=out, config=cfg.to_dict(), enabled=rank.main) as p.tracking:
            if rank.main:
                rundir.check_space(out, p.distiller, p.stepper.optimizer)
            last = _train(p, cfg, out, device, rank, console, stop)
    best = p.best
    console.table("cwkd run summary", [f"best val {p.task.metrics[p.task.best_metric]}", "at epoch", "run directory"],
                  [[f"{best['value']:.2f}%", best["epoch"] + 1, str(out)]])
    return RunResult(out=out, best_metric=p.task.best_metric, best_value=best["value"], best_epoch=best["epoch"] + 1,
                     last=last, student=p.distiller.student)


def _build(cfg: TrainConfig, out: Path, resuming: bool, device: torch.device, rank: Dist, console: RunConsole,
           lock: RunLock) -> _Pieces:
    """Data, models, loaders, optimizer and saved state; ``out`` is prepared once they all loaded."""
    task = get_task(cfg.task)
    if cfg.kd_weight > 0 and not task.kd_logits:
        raise ConfigError(f"--kd-weight {cfg.kd_weight:g}: logit KD needs class logits, and {task.name.value} "
                          "models have none; drop --kd-weight (feature distillation works as it is)")
    spec = task.load_data(cfg.data, root=cfg.data_root, download=cfg.download, skip_corrupt=cfg.skip_corrupt)
    check_split_sizes(spec, rank.world)
    in_chans = cfg.in_chans or teacher_in_chans(cfg) or spec.channels
    if spec.modes is not None:
        console.info(spec.modes.describe(in_chans))
    restoring = resuming and (out / "state.pt").is_file()  # else a resume starts over, from the starting weights
    distiller, dcfg, teacher_source = _distiller(cfg, task, spec, in_chans, device, restoring)
    for who, part in (("student", distiller.student), ("teacher", distiller.teacher)):
        if getattr(part, "cwkd_body", None) is not None:  # a dense model's backbone started from a classifier
            console.info(f"{who}: {part.cwkd_body.line()}")
    model: nn.Module = distiller
    if rank.enabled:
        model = DistributedDataParallel(distiller, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=task.ddp_find_unused)
    train_loader, val_loader = build_loaders(spec, dcfg, batch_size=cfg.batch_size, workers=cfg.workers,
                                             device=device, distributed=rank.enabled, seed=cfg.seed,
                                             datasets=task.datasets(spec, dcfg), collate=task.collate)
    teacher_source = recorded_score(out, teacher_source) if resuming else check_teacher(
        cfg, task, distiller, teacher_source, val_loader, spec.num_classes, device, rank, console)
    if rank.main:  # after the teacher check: a refused teacher leaves --out as it was
        rundir.prepare(out, resume=resuming, overwrite=cfg.overwrite, cfg=cfg, lock=lock)
    if cfg.alpha == "auto":  # a resumed run has the number its first start picked, and never probes again
        _auto_alpha(cfg, task, distiller, train_loader, device, console)
    p = _Pieces(task=task, spec=spec, dcfg=dcfg, distiller=distiller, model=model, train_loader=train_loader,
                val_loader=val_loader, stepper=Stepper.build(distiller, cfg, len(train_loader), device),
                autocast=autocast(device, cfg.precision),
                channels_last=device.type == "cuda", best=no_best(task.best_metric),
                meta=run_metadata(cfg, distiller, dcfg, spec, in_chans, teacher_source))
    if resuming:
        p.start_epoch, p.start_step, p.best = restore(out, distiller, p.stepper, task.best_metric)
        if rank.main:  # the metric lines of epochs state.pt had not saved (a kill just after the line)
            rundir.truncate_metrics(out / "metrics.jsonl", p.start_epoch)
        console.info(f"resuming {out} at epoch {p.start_epoch + 1}"
                     + (f", step {p.start_step}" if p.start_step else ""))
    elif rank.main:
        rundir.write_config(out, cfg, distiller, dcfg, spec, teacher_source)
    return p


def _auto_alpha(cfg: TrainConfig, task: TaskSpec, distiller: FeatureDistiller, loader, device: torch.device,
                console: RunConsole) -> None:
    """``--alpha auto``: measure the first batches (no weight changes) and run with the number picked.

    ``cfg`` is this run's own copy: the number and ``alpha_auto`` go into config.json and the checkpoints.
    """
    from cwkd.core.autoalpha import BATCHES, pick_alpha

    _seed_all(cfg.seed)
    set_epoch(loader, cfg.seed, 0)  # the first batches of epoch 0, whatever the loader drew before
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    batches = (task.batch_to(b, device, memory_format) for b in itertools.islice(loader, BATCHES))
    picked = pick_alpha(distiller, batches, autocast=autocast(device, cfg.precision))
    cfg.alpha, cfg.alpha_auto = picked.alpha, True
    console.info(picked.line())


def _distiller(cfg: TrainConfig, task: TaskSpec, spec, in_chans: int, device: torch.device,
               restoring: bool = False) -> tuple[FeatureDistiller, DataConfig, TeacherSource | None]:
    """Student, teacher and aligners in one module on ``device``; also the input config and teacher source."""
    size = cfg.input_size or task.default_input_size(spec)
    student = build_student(cfg, spec.num_classes, in_chans, input_size=size, restoring=restoring)
    teacher, teacher_source = build_teacher(cfg, spec.num_classes, in_chans) if cfg.uses_teacher else (None, None)
    dcfg = data_config(student, input_size=size, in_chans=in_chans, native_size=spec.native_size, mean=cfg.mean,
                       std=cfg.std)
    # Batches are normalised for the student; a teacher trained on other statistics gets them remapped.
    teacher_input = Renormalize.between((dcfg.mean, dcfg.std), (teacher_source.mean, teacher_source.std)) \
        if teacher is not None else None
    distiller = FeatureDistiller(
        teacher, student, pairs=cfg.pairs, method=cfg.method, alpha=cfg.alpha, hidden=cfg.hidden,
        input_size=dcfg.input_size, reduction=cfg.reduction, kd_weight=cfg.kd_weight,
        kd_temperature=cfg.kd_temperature, label_smoothing=cfg.label_smoothing, teacher_input=teacher_input,
        task_loss=task.loss_fn(cfg.label_smoothing), logits_of=task.logits if task.kd_logits else None,
        feature_prefix=task.feature_prefix(student), student_forward=task.forward, feature_taps=task.feature_taps,
        kd_positions=task.kd_positions, **cfg.method_options,
    )
    if device.type == "cuda":
        distiller.to(device, memory_format=torch.channels_last)
    else:
        distiller.to(device)
    if cfg.compile:  # compile in place: the module objects stay, so the feature hooks still fire
        distiller.student.compile()
        if teacher is not None:
            teacher.compile()
    return distiller, dcfg, teacher_source


def _train(p: _Pieces, cfg: TrainConfig, out: Path, device: torch.device, rank: Dist, console: RunConsole,
           stop: signals.StopSignals) -> dict:
    """The loop; under ``--alpha auto`` a loss gone non-finite in the first epoch starts it again at alpha / 4."""
    from cwkd.core.autoalpha import BackOff

    fresh = cfg.alpha_auto and not (p.start_epoch or p.start_step or rank.enabled)  # no back-off under DDP
    back_off = BackOff(p.distiller) if fresh else None
    while True:
        try:
            return _loop(p, cfg, out, device, rank, console, stop)
        except NonfiniteLoss:
            if back_off is None or not back_off.left or p.best["epoch"] >= 0:
                raise
            before, cfg.alpha = cfg.alpha, back_off.lower(p.distiller)
            p.stepper = Stepper.build(p.distiller, cfg, len(p.train_loader), device)
            p.meta = dataclasses.replace(p.meta, alpha=cfg.alpha)
            if rank.main:
                rundir.update_config(out, alpha=cfg.alpha)
            console.warn(f"alpha auto: the loss went non-finite in the first epoch at alpha {before:.4g}; starting "
                         f"again from the first step at alpha {cfg.alpha:.4g} ({back_off.left} more back-off(s) left)")


def _loop(p: _Pieces, cfg: TrainConfig, out: Path, device: torch.device, rank: Dist, console: RunConsole,
          stop: signals.StopSignals) -> dict:
    """The epochs: train, stop-and-save if asked, evaluate, save; returns the last epoch's record."""
    if p.start_epoch >= cfg.epochs:
        console.info(f"{out} already finished {p.start_epoch} epochs; resume with a larger --epochs to go on")
    last: dict = {}
    steps_per_epoch, reported_bad = len(p.train_loader), 0
    for epoch in range(p.start_epoch, cfg.epochs):
        skip = p.start_step if epoch == p.start_epoch else 0  # steps of this epoch done before a stop
        set_epoch(p.train_loader, cfg.seed, epoch, skip * cfg.batch_size)
        started = time.perf_counter()
        train = train_one_epoch(p, cfg, device, steps=steps_per_epoch - skip, stop=stop, console=console,
                                label=f"epoch {epoch + 1}/{cfg.epochs}", epoch=epoch, first_step=skip,
                                rank=rank.rank)
        if stop.requested and skip + train["batches"] < steps_per_epoch:
            if rank.main:
                with stop.saving():  # a second Ctrl-C waits: last.safetensors without state.pt is no resume
                    rundir.save_interrupted(out, p.distiller, p.stepper, p.meta, epoch,
                                            skip + train["batches"], p.best)
            raise RunInterrupted(out, stop.signal_number)
        if train["batches"] and not train["steps"]:
            raise TrainingError(f"every step of epoch {epoch + 1} had a non-finite loss (all skipped under "
                                f"--skip-nonfinite); lower --lr{fp16_advice(cfg, device, ' or ')}")
        val = evaluate(p.distiller.student, p.val_loader, device, cfg.precision, p.channels_last, rank,
                       task=p.task.name)
        last = _epoch_record(epoch, train, val, p.stepper.optimizer, time.perf_counter() - started, p.task)
        check_diverged(p.distiller, last, cfg, out, rank.main)  # poisoned weights never become last or best
        if rank.main:
            with stop.saving():
                p.best = rundir.save_epoch(out, p.distiller, p.stepper, p.meta, last, p.best)
            p.tracking.epoch(last, (epoch + 1) * steps_per_epoch)
        console.info(epoch_line(last, cfg.epochs, p.task.metrics))
        bad = sum(getattr(split, "skipped", 0) for split in (p.spec.train, p.spec.val))
        if bad > reported_bad:
            console.warn(f"skipped {bad} unreadable image(s) so far (--skip-corrupt); their paths are above")
            reported_bad = bad
        if stop.requested and epoch + 1 < cfg.epochs:  # the signal came after the last step: epoch saved
            raise RunInterrupted(out, stop.signal_number)
    return last


def train_one_epoch(p: _Pieces, cfg: TrainConfig, device: torch.device, *, steps: int, stop,
                    console: RunConsole, label: str, epoch: int = 0, first_step: int = 0, rank: int = 0) -> dict:
    """Train on up to ``steps`` batches, starting at step ``first_step`` of ``epoch``.

    Returns the mean loss parts, images/s, the optimizer ``steps`` done, the ``batches`` used (a
    skipped non-finite step uses a batch but is no step) and ``data_wait``: the share of the epoch's time
    this process spent waiting for the loader's next batch (host clock around the fetch; no device sync).
    Each step reseeds the RNG from (seed, epoch, step, rank), so a run resumed mid-epoch draws what an
    uninterrupted run would.
    """
    p.distiller.train()
    memory_format = torch.channels_last if p.channels_last else torch.contiguous_format
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    watch = None if _checks_each_step(cfg, device) else NonfiniteWatch(device)
    why = {"distiller": p.distiller, "saved": saved_checkpoints(epoch, first_step)}  # for a non-finite loss
    done = used = images_seen = skipped = 0
    waited = 0.0  # seconds spent in the loader (a GPU may still work through queued steps meanwhile)
    started = time.perf_counter()
    console.start(label, steps)
    batches = iter(p.train_loader)
    while used < steps and not stop.requested:  # asked before fetching, so a stop never waits on data
        fetch = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - fetch
        if batch is None:
            break
        step, used = first_step + used, used + 1
        _seed_all(cfg.seed, epoch, step, rank)
        images, targets = p.task.batch_to(batch, device, memory_format)
        with p.autocast():
            out = p.model(images, targets)
        p.stepper.optimizer.zero_grad(set_to_none=True)
        if watch is not None:
            watch.see(out, step)
        elif not finite_everywhere(out["loss"]):
            skipped += 1
            raise_nonfinite(out, step, skipped, cfg, device, label, **why)  # raises once past --skip-nonfinite
            continue
        p.stepper.step(out["loss"], p.distiller, cfg.clip_grad)  # the scaler is a no-op unless fp16
        for key, value in out.items():  # the loss and its parts, the task's own included (a detector's)
            if key != "outputs":  # the per-pair feature losses (feat/S->T) too
                sums[key] += value.detach()
        done, images_seen = done + 1, images_seen + len(images)
        if done % 10 == 0 or used == steps:  # done > 0 here: this step counted
            if watch is not None:
                watch.check(cfg, device, label, **why)
            running = {k: sums[k].item() / done for k in ("loss", "task_loss", "feat_loss", "kd_loss") if k in sums}
            parts = {k.removesuffix("_loss") if k != "loss" else k: v for k, v in running.items()}
            console.advance(used, {**parts, "img/s": images_seen / (time.perf_counter() - started)})
            if p.tracking:  # a loader measured step by step (benchmarks/throughput.py) may have no length
                p.tracking.step(epoch * len(p.train_loader) + step + 1, running)
    console.stop()
    if watch is not None:
        watch.check(cfg, device, label, **why)  # a stop may have come between two progress updates
    means, seconds = _reduce_means(sums, done), time.perf_counter() - started
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {**means, "steps": done, "batches": used, "images_per_s": images_seen * world / max(seconds, 1e-9),
            "data_wait": min(waited / max(seconds, 1e-9), 1.0)}


def _checks_each_step(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether each step's loss is checked on the host before ``backward`` (a host sync every step).

    Skipping a step (``--skip-nonfinite``) needs that, and on a CPU it costs nothing; otherwise the first
    bad step is only recorded on the device and reported at the next progress update (every 10 steps).
    """
    return cfg.skip_nonfinite > 0 or device.type == "cpu"


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
    main = ("loss", "task_loss", "feat_loss", "kd_loss")
    counts = ("steps", "batches", "images_per_s", "data_wait")
    for key in (*main, *sorted(k for k in train if k not in main and k not in counts)):
        if key in train:
            record[f"train_{key}"] = train[key]
    record.update({
        "val_loss": val["loss"], **{f"val_{name}": val[name] for name in task.metrics},
        "lr": optimizer.param_groups[0]["lr"], "images_per_s": train["images_per_s"], "epoch_s": seconds,
        "data_wait": train["data_wait"],
    })
    return record


def _describe(cfg: TrainConfig, distiller: FeatureDistiller, spec, dcfg: DataConfig, device, rank: Dist,
              workers: int) -> str:
    pairs = ", ".join(
        f"{p.student.name} ({p.student.channels}x{p.student.height}x{p.student.width}) -> {p.teacher.name} "
        f"({p.teacher.channels}x{p.teacher.height}x{p.teacher.width})" for p in distiller.pairs
    ) or "none"
    kd = f", kd weight {cfg.kd_weight} T={cfg.kd_temperature}" if cfg.kd_weight else ""
    remap = distiller.teacher_input
    stats = (f"; input mean {_fmt_stats(dcfg.mean)} std {_fmt_stats(dcfg.std)}"
             + (" (remapped to the teacher's own statistics before it sees them)" if remap is not None else ""))
    alpha = f"{cfg.alpha:.4g} (auto)" if cfg.alpha_auto else cfg.alpha
    options = "".join(f", {k.replace('_', ' ')} {getattr(v, 'value', v)}" for k, v in cfg.method_options.items())
    what = (f"method {cfg.method.value}{options}, alpha {alpha}{kd}, pairs: {pairs}" if cfg.uses_teacher
            else "plain training (no teacher)")
    return (f"{cfg.student} on {spec.name} ({spec.num_classes} classes, input {tuple(dcfg.input_size)}), "
            f"{what}; device {device}, precision {cfg.precision.value}, {rank.world} process(es), {workers} loader "
            f"worker(s){' (auto)' if cfg.workers == 'auto' else ''}{stats}")


def _fmt_stats(values) -> str:
    return "/".join(f"{v:.3g}" for v in values)


def _seed_all(seed: int, *mix: int) -> None:
    """Seed torch (every device) and Python from ``seed``, mixed with ``mix`` (epoch, step, rank)."""
    for value in mix:
        seed = (seed * 1_000_003 + value) % 2**63
    random.seed(seed)
    torch.manual_seed(seed)
