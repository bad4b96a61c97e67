"""The training engine: one loop for ``cwkd train`` (method none) and ``cwkd distill``.

Read :func:`run` top to bottom, as nanoGPT's ``train.py``: it builds the pieces once
(:func:`build_pieces`), restores a resumed run's :class:`TrainState` (or starts a fresh
one), then loops over the epochs (:func:`_epochs`): train one (:func:`train_one_epoch`), evaluate, save through
the :class:`RunDir` (whose writes do nothing off rank 0), and print the epoch's line.
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
from cwkd.data.spec import DataSpec
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
from cwkd.training import signals
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
from cwkd.training.resume import TrainState, load_config, restore
from cwkd.training.rundir import RunDir
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


@dataclass(frozen=True)
class Steps:
    """The steps one :func:`train_one_epoch` call takes: ``count`` of them from step ``first`` of ``epoch``."""

    label: str                       # what the progress bar and a non-finite loss's error call them
    count: int
    epoch: int = 0
    first: int = 0


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
    path = Path(resume) if resume is not None else Path(cfg.out or cfg.default_out(time.strftime("%Y%m%d-%H%M%S")))
    with RunDir(path, resuming=resume is not None, writes=rank.main) as out:  # locked until any exit
        out.prepare(cfg, check_only=True)  # refuse a taken --out now; write nothing until data and models load
        ctx = RunContext(out, device, rank, console)
        seed_all(cfg.seed)
        p = build_pieces(cfg, ctx)
        if out.resuming:
            state = restore(out.path, p.distiller, p.stepper, p.task.best_metric)
            out.truncate_metrics(state.epoch)  # the lines of epochs state.pt had not saved (a kill right after)
            console.info(f"resuming {out.path} at epoch {state.epoch + 1}"
                         + (f", step {state.step}" if state.step else ""))
        else:
            state = TrainState.start(p.task.best_metric)
        console.info(_describe(cfg, p, ctx))
        keep_freed = reuse_freed_memory(device) if p.task.steady_shapes else contextlib.nullcontext(False)
        with signals.StopSignals() as stop, keep_freed, \
                Tracking(cfg.log, out=out.path, config=cfg.to_dict(), enabled=rank.main) as p.tracking:
            out.check_space(p.distiller, p.stepper.optimizer)
            state = _train(p, cfg, ctx, stop, state)
    best = state.best
    console.table("cwkd run summary", [f"best val {p.task.metrics[p.task.best_metric]}", "at epoch", "run directory"],
                  [[f"{best['value']:.2f}%", best["epoch"] + 1, str(out.path)]])
    return RunResult(out=out.path, best_metric=p.task.best_metric, best_value=best["value"],
                     best_epoch=best["epoch"] + 1, last=state.last, student=p.distiller.student)


def _train(p: Pieces, cfg: TrainConfig, ctx: RunContext, stop, state: TrainState) -> TrainState:
    """The epochs; under ``--alpha auto`` a loss gone non-finite in the first epoch starts them again at alpha / 4."""
    from cwkd.core.autoalpha import BackOff

    start = dataclasses.replace(state)  # where a back-off starts again
    fresh = cfg.alpha_auto and not (state.epoch or state.step or ctx.rank.enabled)  # no back-off under DDP
    back_off = BackOff(p.distiller) if fresh else None
    while True:
        try:
            return _epochs(p, cfg, ctx, stop, state)
        except NonfiniteLoss:
            if back_off is None or not back_off.left or state.best["epoch"] >= 0:
                raise
            before, cfg.alpha = cfg.alpha, back_off.lower(p.distiller)
            p = dataclasses.replace(p, stepper=Stepper.build(p.distiller, cfg, len(p.train_loader), ctx.device),
                                    meta=dataclasses.replace(p.meta, alpha=cfg.alpha))
            state = dataclasses.replace(start)
            ctx.dir.update_config(alpha=cfg.alpha)
            ctx.console.warn(f"alpha auto: the loss went non-finite in the first epoch at alpha {before:.4g}; "
                             f"starting again from the first step at alpha {cfg.alpha:.4g} ({back_off.left} more "
                             "back-off(s) left)")


def _epochs(p: Pieces, cfg: TrainConfig, ctx: RunContext, stop, state: TrainState) -> TrainState:
    """Each epoch: train, stop-and-save if asked, evaluate, save, print its line; returns the state after the last."""
    out = ctx.dir
    if state.epoch >= cfg.epochs:
        ctx.console.info(f"{out.path} already finished {state.epoch} epochs; resume with a larger --epochs to go on")
    steps_per_epoch, reported_bad = len(p.train_loader), 0
    while state.epoch < cfg.epochs:
        epoch, skip = state.epoch, state.step  # skip: the steps of this epoch done before a stop
        set_epoch(p.train_loader, cfg.seed, epoch, skip * cfg.batch_size)
        started = time.perf_counter()
        train = train_one_epoch(p, cfg, ctx, stop,
                                Steps(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch - skip, epoch, skip))
        state.step = skip + train["batches"]
        if stop.requested and state.step < steps_per_epoch:
            with stop.saving():  # a second Ctrl-C waits: last.safetensors without state.pt is no resume
                out.save_interrupted(p.distiller, p.stepper, p.meta, state)
            raise RunInterrupted(out.path, stop.signal_number)
        if train["batches"] and not train["steps"]:
            raise TrainingError(f"every step of epoch {epoch + 1} had a non-finite loss (all skipped under "
                                f"--skip-nonfinite); lower --lr{fp16_advice(cfg, ctx.device, ' or ')}")
        val = evaluate(p.distiller.student, p.val_loader, ctx.device, cfg.precision, p.channels_last, ctx.rank,
                       task=p.task.name)
        record = _epoch_record(p, epoch, train, val, time.perf_counter() - started)
        check_diverged(p.distiller, record, cfg, out)  # poisoned weights never become last or best
        state.end_epoch(record)
        with stop.saving():
            out.save_epoch(p.distiller, p.stepper, p.meta, state)
        p.tracking.epoch(record, (epoch + 1) * steps_per_epoch)
        ctx.console.info(epoch_line(record, cfg.epochs, p.task.metrics))
        bad = sum(getattr(split, "skipped", 0) for split in (p.spec.train, p.spec.val))
        if bad > reported_bad:
            ctx.console.warn(f"skipped {bad} unreadable image(s) so far (--skip-corrupt); their paths are above")
            reported_bad = bad
        if stop.requested and epoch + 1 < cfg.epochs:  # the signal came after the last step: epoch saved
            raise RunInterrupted(out.path, stop.signal_number)
    return state


def train_one_epoch(p: Pieces, cfg: TrainConfig, ctx: RunContext, stop, steps: Steps) -> dict:
    """Train on up to ``steps.count`` batches, starting at step ``steps.first`` of epoch ``steps.epoch``.

    Returns the mean loss parts, images/s, the optimizer ``steps`` done, the ``batches`` used (a
    skipped non-finite step uses a batch but is no step) and ``data_wait``: the share of the epoch's time
    this process spent waiting for the loader's next batch (host clock around the fetch; no device sync).
    Each step reseeds the RNG from (seed, epoch, step, rank), so a run resumed mid-epoch draws what an
    uninterrupted run would. ``stop.requested`` is read before each batch: a stop never waits on data.
    """
    device, console, label = ctx.device, ctx.console, steps.label
    p.distiller.train()
    memory_format = torch.channels_last if p.channels_last else torch.contiguous_format
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    watch = None if _checks_each_step(cfg, device) else NonfiniteWatch(device)
    why = {"distiller": p.distiller, "saved": saved_checkpoints(steps.epoch, steps.first)}  # for a non-finite loss
    done = used = images_seen = skipped = 0
    waited = 0.0  # seconds spent in the loader (a GPU may still work through queued steps meanwhile)
    started = time.perf_counter()
    console.start(label, steps.count)
    batches = iter(p.train_loader)
    while used < steps.count and not stop.requested:
        fetch = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - fetch
        if batch is None:
            break
        step, used = steps.first + used, used + 1
        seed_all(cfg.seed, steps.epoch, step, ctx.rank.rank)
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
        if done % 10 == 0 or used == steps.count:  # done > 0 here: this step counted
            if watch is not None:
                watch.check(cfg, device, label, **why)
            running = {k: sums[k].item() / done for k in ("loss", "task_loss", "feat_loss", "kd_loss") if k in sums}
            parts = {k.removesuffix("_loss") if k != "loss" else k: v for k, v in running.items()}
            console.advance(used, {**parts, "img/s": images_seen / (time.perf_counter() - started)})
            if p.tracking:  # a loader measured step by step (benchmarks/throughput.py) may have no length
                p.tracking.step(steps.epoch * len(p.train_loader) + step + 1, running)
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


def _epoch_record(p: Pieces, epoch: int, train: dict, val: dict, seconds: float) -> dict:
    """metrics.jsonl's line for an epoch: its train loss parts, val scores, learning rate and speed."""
    record = {"epoch": epoch + 1}
    main = ("loss", "task_loss", "feat_loss", "kd_loss")
    counts = ("steps", "batches", "images_per_s", "data_wait")
    for key in (*main, *sorted(k for k in train if k not in main and k not in counts)):
        if key in train:
            record[f"train_{key}"] = train[key]
    record.update({
        "val_loss": val["loss"], **{f"val_{name}": val[name] for name in p.task.metrics},
        "lr": p.stepper.optimizer.param_groups[0]["lr"], "images_per_s": train["images_per_s"], "epoch_s": seconds,
        "data_wait": train["data_wait"],
    })
    return record


def _describe(cfg: TrainConfig, p: Pieces, ctx: RunContext) -> str:
    """The line a run starts with: student, data, method and its settings, layer pairs, where it runs, input."""
    distiller, spec, dcfg, workers = p.distiller, p.spec, p.dcfg, p.train_loader.num_workers
    pairs = ", ".join(
        f"{s.name} ({s.channels}x{s.height}x{s.width}) -> {t.name} ({t.channels}x{t.height}x{t.width})"
        for s, t in ((pair.student, pair.teacher) for pair in distiller.pairs)
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
            f"{what}; device {ctx.device}, precision {cfg.precision.value}, {ctx.rank.world} process(es), "
            f"{workers} loader worker(s){' (auto)' if cfg.workers == 'auto' else ''}{stats}")


def _fmt_stats(values) -> str:
    return "/".join(f"{v:.3g}" for v in values)


@dataclass(frozen=True)
class RunContext:
    """Where a run happens: its directory (written by rank 0 only), its device, its process and its console."""

    dir: RunDir
    device: torch.device
    rank: Dist
    console: RunConsole


@dataclass
class Pieces:
    """Everything a run's loop uses, built once by :func:`build_pieces` (the nanoGPT-style setup block)."""

    task: TaskSpec
    spec: DataSpec                   # the task's data (splits, classes, channels)
    dcfg: DataConfig                 # the student's input: size, mean, std, interpolation, crop
    distiller: FeatureDistiller      # student + aligners (+ frozen teacher): the one trainable module
    model: nn.Module                 # the distiller, or its DDP wrapper
    train_loader: object
    val_loader: object
    stepper: Stepper                 # optimizer, schedule, fp16 loss scaler
    autocast: Callable[[], torch.autocast]  # built once per run; call it around a forward pass
    channels_last: bool              # the memory format of batches (on CUDA)
    meta: CheckpointMeta             # checkpoint metadata
    tracking: Tracking = field(default_factory=Tracking)  # --log: TensorBoard, wandb, trackio (none by default)


def build_pieces(cfg: TrainConfig, ctx: RunContext) -> Pieces:
    """Data, models, loaders and optimizer; the run directory is prepared once they all loaded.

    A new run's config.json is written last (``cfg`` then holds what ``--alpha auto`` picked).
    """
    task = get_task(cfg.task)
    if cfg.kd_weight > 0 and not task.kd_logits:
        raise ConfigError(f"--kd-weight {cfg.kd_weight:g}: logit KD needs class logits, and {task.name.value} "
                          "models have none; drop --kd-weight (feature distillation works as it is)")
    spec = task.load_data(cfg.data, root=cfg.data_root, download=cfg.download, skip_corrupt=cfg.skip_corrupt)
    check_split_sizes(spec, ctx.rank.world)
    in_chans = cfg.in_chans or teacher_in_chans(cfg) or spec.channels
    if spec.modes is not None:
        ctx.console.info(spec.modes.describe(in_chans))
    distiller, dcfg, teacher_source = _distiller(cfg, task, spec, in_chans, ctx)
    for who, part in (("student", distiller.student), ("teacher", distiller.teacher)):
        if getattr(part, "cwkd_body", None) is not None:  # a dense model's backbone started from a classifier
            ctx.console.info(f"{who}: {part.cwkd_body.line()}")
    model: nn.Module = distiller
    if ctx.rank.enabled:
        model = DistributedDataParallel(distiller, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                        find_unused_parameters=task.ddp_find_unused)
    train_loader, val_loader = build_loaders(spec, dcfg, batch_size=cfg.batch_size, workers=cfg.workers,
                                             device=ctx.device, distributed=ctx.rank.enabled, seed=cfg.seed,
                                             datasets=task.datasets(spec, dcfg), collate=task.collate)
    teacher_source = recorded_score(ctx.dir.path, teacher_source) if ctx.dir.resuming else check_teacher(
        cfg, task, distiller, teacher_source, val_loader, spec.num_classes, ctx.device, ctx.rank, ctx.console)
    ctx.dir.prepare(cfg)  # after the teacher check: a refused teacher leaves --out as it was
    if cfg.alpha == "auto":  # a resumed run has the number its first start picked, and never probes again
        _auto_alpha(cfg, task, distiller, train_loader, ctx)
    p = Pieces(task=task, spec=spec, dcfg=dcfg, distiller=distiller, model=model, train_loader=train_loader,
               val_loader=val_loader, stepper=Stepper.build(distiller, cfg, len(train_loader), ctx.device),
               autocast=autocast(ctx.device, cfg.precision), channels_last=ctx.device.type == "cuda",
               meta=run_metadata(cfg, distiller, dcfg, spec, in_chans, teacher_source))
    if not ctx.dir.resuming:  # a resumed run keeps the config.json of its first start
        ctx.dir.write_config(cfg, distiller, dcfg, spec, teacher_source)
    return p


def _auto_alpha(cfg: TrainConfig, task: TaskSpec, distiller: FeatureDistiller, loader, ctx: RunContext) -> None:
    """``--alpha auto``: measure the first batches (no weight changes) and run with the number picked.

    ``cfg`` is this run's own copy: the number and ``alpha_auto`` go into config.json and the checkpoints.
    """
    from cwkd.core.autoalpha import BATCHES, pick_alpha

    seed_all(cfg.seed)
    set_epoch(loader, cfg.seed, 0)  # the first batches of epoch 0, whatever the loader drew before
    memory_format = torch.channels_last if ctx.device.type == "cuda" else torch.contiguous_format
    batches = (task.batch_to(b, ctx.device, memory_format) for b in itertools.islice(loader, BATCHES))
    picked = pick_alpha(distiller, batches, autocast=autocast(ctx.device, cfg.precision))
    cfg.alpha, cfg.alpha_auto = picked.alpha, True
    ctx.console.info(picked.line())


def _distiller(cfg: TrainConfig, task: TaskSpec, spec, in_chans: int,
               ctx: RunContext) -> tuple[FeatureDistiller, DataConfig, TeacherSource | None]:
    """Student, teacher and aligners in one module on the run's device; also the input config and teacher source.

    A resumed run that saved a state.pt builds its student without the starting weights: the state replaces them.
    """
    device, restoring = ctx.device, ctx.dir.resuming and (ctx.dir.path / "state.pt").is_file()
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


def seed_all(seed: int, *mix: int) -> None:
    """Seed torch (every device) and Python from ``seed``, mixed with ``mix`` (epoch, step, rank)."""
    for value in mix:
        seed = (seed * 1_000_003 + value) % 2**63
    random.seed(seed)
    torch.manual_seed(seed)
