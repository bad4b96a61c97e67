"""Non-finite losses and weights: detect them, skip a step (``--skip-nonfinite``) or stop with the likely cause.

Skipping a step needs its loss on the host before ``backward`` (a host sync every step), so the engine
checks each step only on a CPU or under ``--skip-nonfinite``; otherwise :class:`NonfiniteWatch` records the
first bad step on the device and the engine asks it every few steps (see docs/training.md).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from cwkd.choices import Precision
from cwkd.errors import NonfiniteLoss, TrainingError
from cwkd.runtime import precision_advice
from cwkd.training.config import TrainConfig

if TYPE_CHECKING:
    from cwkd.core.distiller import FeatureDistiller
    from cwkd.training.rundir import RunDir


#: What a stop in a later epoch leaves: the run directory as the last finished epoch saved it.
KEPT = "the checkpoints of the last finished epoch are kept"


def finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (ranks must agree to skip a step, or DDP would hang)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


class NonfiniteWatch:
    """The first step whose loss was non-finite, and its loss parts, kept on the device (no host sync)."""

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((), -1, dtype=torch.int64, device=device)
        self.keys: list[str] = []
        self.parts: torch.Tensor | None = None

    def see(self, out: dict, step: int) -> None:
        """Record ``step`` if its loss is the first non-finite one."""
        self.keys = [k for k in out if k.endswith("loss")]
        values = torch.stack([out[k].detach().float() for k in self.keys])
        first = (self.step < 0) & ~torch.isfinite(out["loss"].detach())
        self.parts = values if self.parts is None else torch.where(first, values, self.parts)
        self.step = torch.where(first, step, self.step)

    def check(self, cfg: TrainConfig, device: torch.device, label: str, *, distiller: FeatureDistiller | None = None,
              saved: str = KEPT) -> None:
        """Raise the non-finite-loss error if a step went bad (one host sync; ranks agree under DDP).

        ``distiller`` lets the error name the teacher (its maps at the last step, not necessarily the bad one).
        """
        bad = self.step.clone()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        step = int(bad.item())
        if step >= 0:
            parts = dict(zip(self.keys, self.parts, strict=True)) if self.parts is not None else {}
            raise_nonfinite(parts, step, cfg.skip_nonfinite + 1, cfg, device, label, distiller=distiller, saved=saved)


def saved_checkpoints(epoch: int, first_step: int) -> str:
    """What the run directory holds when epoch ``epoch`` (from 0), begun at ``first_step``, stops: no file it lacks."""
    if epoch > 0:
        return KEPT
    if first_step > 0:
        return "the checkpoints saved when the run was stopped are kept"
    return "no checkpoint was written (no epoch had finished)"


def raise_nonfinite(out: dict, step: int, count: int, cfg: TrainConfig, device: torch.device,
                    label: str = "this epoch", *, distiller: FeatureDistiller | None = None, saved: str = KEPT) -> None:
    """Stop on a NaN/inf loss unless ``--skip-nonfinite`` still allows skipping this step.

    ``distiller`` (its teacher's weights and last maps) lets the error name the teacher as the cause;
    ``saved`` says what the run directory keeps (:func:`saved_checkpoints`).
    """
    if count <= cfg.skip_nonfinite:
        return
    parts = ", ".join(f"{k}={v.item():.4g}" for k, v in out.items() if k.endswith("loss"))
    cause = likely_cause(out, cfg, getattr(distiller, "teacher", None), getattr(distiller, "teacher_finite", None))
    cause = f"{cause}; otherwise " if cause else ""
    raise NonfiniteLoss(
        f"non-finite loss in {label}, step {step + 1} ({parts}); {cause}lower --lr (it was {cfg.lr:g}), "
        f"{fp16_advice(cfg, device, end=', ')}"
        f"add --clip-grad 1.0, or allow a few skipped steps with --skip-nonfinite N; {saved}"
    )


def fp16_advice(cfg: TrainConfig, device: torch.device, start: str = "", end: str = "") -> str:
    """Under fp16, whose range overflows first: the fast precisions to use instead (else nothing)."""
    if cfg.precision is not Precision.fp16:
        return ""
    return f"{start}use {precision_advice(device, Precision.fp16)} instead of fp16{end}"


def check_diverged(distiller: FeatureDistiller, record: dict, cfg: TrainConfig, out: RunDir) -> None:
    """Stop, keeping the last good checkpoints, when the weights or the val loss went non-finite this epoch.

    The epoch's metrics line is still written to ``out`` (its non-finite values as null), so the user can see it.
    Every rank sees the same weights and the all-reduced val loss, so ranks stop together.
    """
    poisoned = [name for name, t in distiller.state_dict().items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not poisoned and math.isfinite(record["val_loss"]):
        return
    out.append_metrics(record)
    what = (f"{len(poisoned)} weight tensor(s) became non-finite (e.g. {poisoned[0]})" if poisoned
            else f"the validation loss is {record['val_loss']}")
    parts = {"feat_loss": math.inf} if poisoned and all(n.startswith("aligners.") for n in poisoned) else {}
    cause = likely_cause(parts, cfg, distiller.teacher, distiller.teacher_finite) or (
        f"the task loss or the weights blew up: --lr {cfg.lr:g} is likely too large; lower it or add --clip-grad 1.0")
    kept = ("the checkpoints of the last finished epoch are kept (not overwritten with these weights)"
            if record["epoch"] > 1 else "no checkpoint was written")
    raise TrainingError(f"training diverged in epoch {record['epoch']}/{cfg.epochs}: {what}; {cause}; {kept}")


def likely_cause(parts: dict, cfg: TrainConfig, teacher: nn.Module | None = None,
                 teacher_finite: torch.Tensor | None = None) -> str | None:
    """Which loss term went non-finite, as advice: the teacher, the feature loss (alpha) or logit KD.

    ``teacher_finite``: whether the teacher's maps were all finite (:attr:`FeatureDistiller.teacher_finite`).
    None when none of those explains it: then the task loss did, and the learning rate is the likely cause.
    """
    def bad(key: str) -> bool:
        value = parts.get(key)
        return value is not None and not math.isfinite(float(value))

    if teacher is not None and any(t.is_floating_point() and not bool(torch.isfinite(t).all())
                                   for t in teacher.state_dict().values()):
        return "the teacher's weights are non-finite, so its outputs are: check --teacher / --teacher-weights"
    if teacher_finite is not None and not bool(teacher_finite):
        return ("the teacher's outputs are non-finite, though its weights are finite (they overflow on this "
                "input): check --teacher / --teacher-weights and the input statistics (--mean, --std)")
    if bad("feat_loss") and not bad("task_loss"):
        return (f"the feature loss went non-finite while the task loss did not: --alpha {cfg.alpha:g} is likely "
                "too large (or the teacher's outputs are non-finite or huge); lower --alpha")
    if bad("kd_loss") and not bad("task_loss"):
        return f"the logit-KD loss went non-finite first: lower --kd-weight (it was {cfg.kd_weight:g})"
    return None
