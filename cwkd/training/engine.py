"""The training engine: one loop for ``cwkd train`` (method none) and ``cwkd distill``.

Read :func:`run` top to bottom, as nanoGPT's ``train.py``: it builds the pieces once
(:func:`cwkd.training.build.build_pieces`), restores a resumed run's :class:`TrainState` (or starts a fresh
one), then loops over the epochs (:func:`_epochs`): train one (:func:`train_one_epoch`), evaluate, save through
the :class:`RunDir` (whose writes do nothing off rank 0), and print the epoch's line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cwkd.data.loading import set_epoch
from cwkd.errors import DataError, NonfiniteLoss, RunInterrupted, TrainingError
from cwkd.evaluation import evaluate
from cwkd.runtime import (
    main_rank_warnings,
    precision_warning,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
    setup_distributed,
)
from cwkd.training import signals
from cwkd.training.build import Pieces, RunContext, build_pieces, seed_all
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
    run_dir = RunDir(path, resuming=resume is not None, writes=rank.main)
    with run_dir as out, main_rank_warnings(rank):  # the run directory is locked until any exit
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
        started = time.perf_counter()
        if state.pending:  # its steps all ran before a validation file could not be read: validate it now
            train = {k: v for k, v in state.pending.items() if k != "train_s"}
            started -= state.pending.get("train_s", 0.0)
        else:
            set_epoch(p.train_loader, cfg.seed, epoch, skip * cfg.batch_size)
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
        val = _validate(p, cfg, ctx, stop, state, {**train, "train_s": time.perf_counter() - started})
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


def _validate(p: Pieces, cfg: TrainConfig, ctx: RunContext, stop, state: TrainState, train: dict) -> dict:
    """The epoch's val scores. A val file that cannot be read (:class:`DataError`) must not cost the epoch's
    training: it is saved with ``train`` as ``state.pending``, and ``--resume`` validates it once the data is fixed."""
    try:
        return evaluate(p.distiller.student, p.val_loader, ctx.device, cfg.precision, p.channels_last, ctx.rank,
                        task=p.task.name)
    except DataError as exc:
        state.pending = train
        with stop.saving():
            ctx.dir.save_interrupted(p.distiller, p.stepper, p.meta, state)
        raise DataError(f"{exc}; epoch {state.epoch + 1}'s training is saved: once the data is fixed, continue "
                        f"with --resume {ctx.dir.path}") from exc


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
    params = sum(t.numel() for t in distiller.aligners.parameters())
    cost = f" (aligners {params / 1e6:.2f}M parameters, training only)" if params else ""
    what = (f"method {cfg.method.value}{options}, alpha {alpha}{kd}, pairs: {pairs}{cost}" if cfg.uses_teacher
            else "plain training (no teacher)")
    return (f"{cfg.student} on {spec.name} ({spec.num_classes} classes, input {tuple(dcfg.input_size)}), "
            f"{what}; device {ctx.device}, precision {cfg.precision.value}, {ctx.rank.world} process(es), "
            f"{workers} loader worker(s){' (auto)' if cfg.workers == 'auto' else ''}{stats}")


def _fmt_stats(values) -> str:
    return "/".join(f"{v:.3g}" for v in values)
