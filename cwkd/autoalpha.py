"""``alpha="auto"``: pick the feature-loss weight from the gradients of the first few batches.

The rule
--------
Before the first optimizer step, on ``batches`` training batches (default 5; model in train mode,
no weight, gradient or BatchNorm statistic changed), measure on the student's *shared* parameters
(those the feature loss reaches: the layers up to each distilled one; never the aligners, never the
head) the gradient norm of the task loss, ``g_task``, and of the feature loss at alpha 1, ``g_feat``.
Then::

    alpha = RATIO * median over batches of (g_task / g_feat)

so that, at the start, the feature term pulls on the layers both terms train ``RATIO`` (4) times as
hard as the task term. A gradient ratio does not care about the loss form (``mean`` or the paper's
``sum``: both scale ``g_feat`` alike), the aligner or the task, which is why it is used rather than a
loss ratio. Two guards keep it sane:

- the weighted feature loss may start at most :data:`MAX_LOSS_RATIO` (50) times the task loss (the
  one divergence of the benchmark's alpha sweep came at 160x; 40x trained best), and alpha is
  capped there with a printed reason (a student whose task gradient is huge at init, or MGD, whose
  generator starts near zero, hits this cap);
- a feature loss that puts no finite gradient on the student (or a non-finite task gradient) is one
  :class:`~cwkd.errors.TrainingError` asking for ``--alpha`` by hand, never a non-finite alpha.

The measurement behind :data:`RATIO` is ``benchmarks/alpha.py --probe`` (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cwkd.errors import TrainingError

#: alpha = RATIO * median(g_task / g_feat): the feature term pulls RATIO times as hard as the task term.
#: 4: the best alpha of the benchmark's cwt sweep (50, mobilenetv3_small_050) is 4.1x the equal-pull alpha
#: (12.3) the rule measures there (benchmarks/results/alpha_probe.json; docs/method.md).
RATIO = 4.0
#: Training batches the rule measures.
BATCHES = 5
#: The weighted feature loss may start at most this many times the task loss (the sweep: 40x trained best,
#: 160x diverged in one seed of three).
MAX_LOSS_RATIO = 50.0


@dataclass(frozen=True)
class AutoAlpha:
    """The alpha the rule picked and the medians it was picked from."""

    alpha: float
    grad_task: float     # median task-gradient norm on the shared parameters
    grad_feat: float     # median feature-gradient norm at alpha 1 on the same parameters
    task_loss: float     # median task loss
    feat_loss: float     # median feature loss
    batches: int
    capped: bool = False  # alpha was lowered to MAX_LOSS_RATIO * task_loss / feat_loss

    def line(self) -> str:
        """The one line a run prints."""
        cap = (f"; capped so the weighted feature loss starts at most {MAX_LOSS_RATIO:g}x the task loss"
               if self.capped else "")
        return (f"alpha auto: picked {self.alpha:.4g} (task grad {self.grad_task:.4g}, feature grad "
                f"{self.grad_feat:.4g}, over {self.batches} batches{cap})")


def pick_alpha(distiller, batches: Iterable[tuple], *, ratio: float = RATIO,
               autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> AutoAlpha:
    """Measure ``batches`` (``(images, targets)`` on the distiller's device), set ``distiller.alpha``, return the pick.

    Under DDP, rank 0's pick is broadcast, so every rank trains with the same alpha.

    Example:
        >>> d = FeatureDistiller(teacher, student, alpha="auto")  # doctest: +SKIP
        >>> pick_alpha(d, [(images, labels)]).alpha               # doctest: +SKIP
        11.7
    """
    rows = measure(distiller, batches, autocast=autocast)
    picked = choose(rows, ratio=ratio)
    if dist.is_initialized():
        picked = _broadcast(picked, next(distiller.parameters()).device)
    distiller.alpha = picked.alpha
    return picked


def measure(distiller, batches: Iterable[tuple], *,
            autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> list[dict[str, float]]:
    """Per batch: ``grad_task``, ``grad_feat`` (alpha 1) on the shared parameters, ``task_loss``, ``feat_loss``.

    The weights, their ``.grad`` and every buffer (BatchNorm statistics) are as before; the mode is restored.
    """
    if not distiller.pairs:
        raise TrainingError("alpha auto needs a feature loss, and this run distils no layer pair (method none); "
                            "drop --alpha auto")
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    saved = {name: b.detach().clone() for name, b in distiller.named_buffers()}
    was_training, alpha = distiller.training, distiller.alpha
    rows = []
    try:
        distiller.train()
        distiller.alpha = 1.0  # the forward needs a number; the measured parts do not depend on it
        for images, targets in batches:
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = distiller(images, targets, detach=False)
            rows.append(_grad_norms(out["task_loss"], out["feat_loss"], params))
    finally:
        with torch.no_grad():
            for name, b in distiller.named_buffers():
                b.copy_(saved[name])
        distiller.train(was_training)
        distiller.alpha = alpha
    if not rows:
        raise TrainingError("alpha auto: the training data gave no batch to measure; set --alpha by hand")
    return rows


def _grad_norms(task: torch.Tensor, feat: torch.Tensor, params: list[torch.Tensor]) -> dict[str, float]:
    """Gradient norms of both terms on the parameters the feature term reaches (the shared ones)."""
    g_feat = torch.autograd.grad(feat.float(), params, retain_graph=True, allow_unused=True)
    shared = [(p, g) for p, g in zip(params, g_feat, strict=True) if g is not None]
    g_task = torch.autograd.grad(task.float(), [p for p, _ in shared], allow_unused=True) if shared else []
    return {"grad_task": _norm(g_task), "grad_feat": _norm([g for _, g in shared]),
            "task_loss": float(task.detach()), "feat_loss": float(feat.detach())}


def _norm(grads) -> float:
    return math.sqrt(sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None))


def choose(rows: list[dict[str, float]], *, ratio: float = RATIO) -> AutoAlpha:
    """The rule on measured rows (see the module docstring); TrainingError when it cannot give a finite alpha.

    Example:
        >>> choose([{"grad_task": 6.0, "grad_feat": 2.0, "task_loss": 2.3, "feat_loss": 1.0}], ratio=1.0).alpha
        3.0
    """
    med = {k: statistics.median(r[k] for r in rows) for k in ("grad_task", "grad_feat", "task_loss", "feat_loss")}
    if not all(math.isfinite(v) for v in med.values()):
        raise TrainingError(f"alpha auto: the first {len(rows)} batches gave a non-finite loss or gradient "
                            f"({_plain(med)}); fix the input or the teacher, or set --alpha by hand")
    if med["grad_feat"] <= 0:
        raise TrainingError("alpha auto: the feature loss puts no gradient on the student (the teacher's and "
                            "the aligned student's maps already agree, or the distilled layer is frozen); set "
                            "--alpha by hand")
    if med["grad_task"] <= 0:
        raise TrainingError("alpha auto: the task loss puts no gradient on the distilled layers (is the task "
                            "loss already zero?); set --alpha by hand")
    alpha = ratio * med["grad_task"] / med["grad_feat"]
    cap = MAX_LOSS_RATIO * med["task_loss"] / med["feat_loss"] if med["feat_loss"] > 0 else math.inf
    return AutoAlpha(alpha=min(alpha, cap), grad_task=med["grad_task"], grad_feat=med["grad_feat"],
                     task_loss=med["task_loss"], feat_loss=med["feat_loss"], batches=len(rows), capped=alpha > cap)


def _plain(values: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in values.items())


def _broadcast(picked: AutoAlpha, device: torch.device) -> AutoAlpha:
    """Rank 0's pick on every rank."""
    values = torch.tensor([picked.alpha, picked.grad_task, picked.grad_feat, picked.task_loss, picked.feat_loss,
                           float(picked.capped)], dtype=torch.float64, device=device)
    dist.broadcast(values, src=0)
    a, gt, gf, tl, fl, capped = values.tolist()
    return AutoAlpha(alpha=a, grad_task=gt, grad_feat=gf, task_loss=tl, feat_loss=fl, batches=picked.batches,
                     capped=bool(capped))
