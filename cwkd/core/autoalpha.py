"""``alpha="auto"``: pick the feature-loss weight from the gradients of the first few batches.

The rule
--------
Before the first optimizer step, on ``batches`` training batches (default 5; model in train mode,
no weight, gradient or BatchNorm statistic changed), measure on the student's *shared* parameters
(those the feature loss reaches: the layers up to each distilled one; never the aligners, never the
head) the gradient norm of the task loss, ``g_task``, and of the feature loss at alpha 1, ``g_feat``.
Then::

    alpha = RATIO * median over batches of (g_task / g_feat)

so that, at the start, the feature term pulls on the layers both terms train ``RATIO`` (0.5) times as
hard as the task term.

``g_feat`` is measured through a *fitted* map, not through the run's own aligners: per pair, the
least-squares 1x1 linear map (with a bias, a tiny ridge, in float64) from the student's pixels (resized
as the distiller does) to the teacher's, fitted on the other probe batches (so it cannot memorise the
one it is measured on; a single batch is measured as two halves, each through the map the other half
fits), with the run's loss reduction. An
untrained aligner says little about its pull once it has adapted (MGD's generator starts with ~40x
less gradient on the student than CWT's, so a rule through it picked an alpha that diverged), while
the best linear aligner is the same for every method: cwt, linear and MGD get the same alpha. A
gradient ratio does not care about the loss form (``mean`` or the paper's ``sum``: both scale
``g_feat`` alike) or the task. Three guards keep it sane:

- the weighted fitted feature loss may start at most :data:`MAX_LOSS_RATIO` (7.5) times the task loss
  (the benchmark's sweeps in these units: 4.5x and 7.4x trained best, 9.7x lost 4 points, 18x diverged),
  and alpha is capped there with a printed reason (a student whose task gradient is huge at init hits it).
  It bounds alpha times the loss through the *fitted* map, over the task loss, on the probe batches: not the
  feature loss a run reports, which goes through the run's own aligners. Those start untrained and report
  more (many times more on a detector) until they fit; the printed line gives both ratios. The cap stays
  in fitted units because the sweeps that set it were measured in them, and an untrained aligner's loss
  depends on its random start and its method, which the rule keeps out;
- a loss that still goes non-finite in the first epoch starts the run again from its first step at
  alpha / :data:`BACK_OFF` (4), at most :data:`MAX_BACK_OFFS` (3) times (:class:`BackOff`; not under DDP):
  MGD takes less alpha than cwt and linear on some students, and no measure before training told which;
- a feature loss that puts no finite gradient on the student (the fitted map reproduces the teacher,
  or the distilled layer is frozen), or a non-finite task gradient, is one
  :class:`~cwkd.errors.TrainingError` asking for ``--alpha`` by hand, never a non-finite alpha.

The measurement behind :data:`RATIO` is ``benchmarks/alpha.py --probe`` (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cwkd.core.losses import feature_loss
from cwkd.errors import TrainingError

#: alpha = RATIO * median(g_task / g_feat): the feature term pulls RATIO times as hard as the task term.
#: 0.5: the best alpha of the benchmark's sweep (50 for cwt, linear and MGD alike, mobilenetv3_small_050) is 0.48x
#: the equal-pull alpha (104) the rule measures there (benchmarks/results/alpha_probe.json; docs/method.md).
RATIO = 0.5
#: Training batches the rule measures.
BATCHES = 5
#: The weighted (fitted) feature loss may start at most this many times the task loss. The sweeps, in these units:
#: mobilenetv3_small_050 trained best at alpha 50 (4.5x) and diverged at 200 (18x: linear, MGD, 1 cwt seed of 3);
#: mobilenetv1_100 (task loss 6.6 at init) trained best with cwt and linear at 200 (7.4x), and the capped picks at
#: 10x (255-273) lost 4 points with cwt (one seed of 3 fell to 69%) and diverged with MGD.
MAX_LOSS_RATIO = 7.5
#: With ``--alpha auto``, a loss that goes non-finite before the first epoch ends starts the run again from its first
#: step with alpha divided by BACK_OFF, at most MAX_BACK_OFFS times (:class:`BackOff`). Every divergence of the
#: benchmark's sweeps came within the first 50 steps; MGD on mobilenetv1_100 diverged at alpha 50 and trained at 20.
BACK_OFF = 4.0
MAX_BACK_OFFS = 3
#: The fitted maps' ridge, relative to the student pixels' mean square (keeps dead channels solvable).
RIDGE = 1e-8
#: A fitted feature loss at most this share of the teacher maps' own loss is an exact fit: nothing to teach.
EXACT = 1e-6


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
    halves: bool = False  # one batch alone, measured as two halves (``batches`` counts them)
    own_loss: float = math.nan  # median feature loss through the run's own (untrained) aligners: what a run reports

    def line(self) -> str:
        """The one line a run prints: the pick, and the weighted feature loss over the task loss it starts at,
        through the fitted map (what the cap bounds) and through the run's own untrained aligners (what the
        first steps report, until the aligners fit)."""
        cap = "; capped there" if self.capped else ""
        own = (f", {self.alpha * self.own_loss / self.task_loss:.3g}x through this run's untrained aligners"
               if math.isfinite(self.own_loss) and self.task_loss > 0 else "")
        return (f"alpha auto: picked {self.alpha:.4g} (task grad {self.grad_task:.4g}, feature grad "
                f"{self.grad_feat:.4g}, over {self._measured()}); the weighted feature loss starts at "
                f"{self.alpha * self.feat_loss / self.task_loss:.3g}x the task loss through a fitted linear map "
                f"(at most {MAX_LOSS_RATIO:g}x{cap}){own}")

    def _measured(self) -> str:
        """What was measured: ``5 batches``, or ``1 batch, as two halves`` (a train set of one batch)."""
        return "1 batch, as two halves" if self.halves else f"{self.batches} batches"


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
    """Per batch (or half of a lone batch): ``grad_task``, ``grad_feat`` (alpha 1, through the fitted maps) on the
    shared parameters, ``task_loss``, ``feat_loss`` (the fitted map's), ``own_loss`` (through the run's own
    aligners, as the run reports it) and ``half`` (1 for a half).

    The weights, their ``.grad`` and every buffer (BatchNorm statistics) are as before; the mode is restored.
    """
    if not distiller.pairs:
        raise TrainingError("alpha auto needs a feature loss, and this run distils no layer pair (method none); "
                            "drop --alpha auto")
    batches = list(batches)  # two passes: the fit, then the gradients
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    saved = {name: b.detach().clone() for name, b in distiller.named_buffers()}
    was_training = distiller.training
    rows = []
    try:
        distiller.train()
        for index, part, fits in _fit_maps(distiller, batches, autocast):
            images, targets = batches[index]
            with autocast() if autocast is not None else contextlib.nullcontext():
                outputs, maps, own = distiller.paired_maps(images, targets)
                task = distiller.task_loss(outputs, targets)["task_loss"]
            feat, scale = _fitted_loss([(s[part], t[part]) for s, t in maps], fits, distiller.reduction)
            row = _grad_norms(task, feat, params)
            row["half"], row["own_loss"] = float(part != slice(None)), own
            if row["feat_loss"] <= EXACT * scale:  # the fitted map reproduces the teacher: float noise is left
                row["grad_feat"] = 0.0
            rows.append(row)
    finally:
        with torch.no_grad():
            for name, b in distiller.named_buffers():
                b.copy_(saved[name])
        distiller.train(was_training)
    if not rows:
        raise TrainingError("alpha auto: the training data gave no batch to measure; set --alpha by hand")
    return rows


def _fit_maps(distiller, batches: list[tuple], autocast: Callable[[], contextlib.AbstractContextManager] | None
              ) -> list[tuple[int, slice, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """What to measure: per part, ``(batch index, samples, per pair the ridge least-squares 1x1 map (W, b))``.

    A part is a batch, or with one batch alone each half of it. Each part's map is fitted on the *other*
    parts, so a map with more channels than pixels cannot memorise what it is measured on (a near-zero loss,
    then a refusal or a huge alpha). One batch of one sample has nothing to hold out, and halves with fewer
    pixels than a map has unknowns (for every pair) fit nothing that carries over: a TrainingError each.
    """
    parts = [(index, slice(None)) for index in range(len(batches))]
    if len(batches) == 1:
        size = _batch_size(batches[0])
        if size < 2:
            raise TrainingError("alpha auto: the training data gave one batch of one sample, and the probe map "
                                "must be fitted on other samples than it is measured on; add training images, or "
                                "set --alpha by hand")
        parts = [(0, slice(0, size // 2)), (0, slice(size // 2, None))]
    stats: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per part, per pair: (X^T X, X^T Y), float64
    smallest: dict[int, tuple[int, int]] = {}  # per pair: (pixels, unknowns) of its smallest part
    with torch.no_grad():
        for index, images_targets in enumerate(batches):
            with autocast() if autocast is not None else contextlib.nullcontext():
                _, maps, _ = distiller.paired_maps(*images_targets)
            for _, part in (p for p in parts if p[0] == index):
                stats.append([])
                for i, (s, t) in enumerate(maps):
                    x, y = _pixels(s[part]), _pixels(t[part])
                    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # the bias column
                    stats[-1].append((x.T @ x, x.T @ y))
                    smallest[i] = min(smallest.get(i, tuple(x.shape)), tuple(x.shape))
    if len(batches) == 1 and all(pixels < unknowns for pixels, unknowns in smallest.values()):
        _too_few_pixels(distiller, smallest[0])
    totals = [(sum(b[i][0] for b in stats), sum(b[i][1] for b in stats)) for i in range(len(distiller.pairs))]
    return [(index, part, [_solve(xtx - own[0], xty - own[1]) for (xtx, xty), own in zip(totals, fit, strict=True)])
            for (index, part), fit in zip(parts, stats, strict=True)]


def _too_few_pixels(distiller, shape: tuple[int, int]) -> None:
    """One lone batch whose halves are too small to fit a map on one and measure it on the other: say so."""
    pair, (pixels, unknowns) = distiller.pairs[0], shape
    others = " (every other pair's half is too small as well)" if len(distiller.pairs) > 1 else ""
    raise TrainingError(f"alpha auto: the training data gave one batch, so the probe map is fitted on one half of "
                        f"it and measured on the other, and a half holds {pixels} pixel(s) of {pair.student.name}'s "
                        f"{unknowns - 1}-channel maps, fewer than the {unknowns} such a map needs{others}; add "
                        "training images or raise --input-size, or set --alpha by hand")


def _batch_size(batch: tuple) -> int:
    """The samples in one ``(images, targets)`` batch (a tensor, or a list of images as detectors take)."""
    return len(batch[0])


def _pixels(m: torch.Tensor) -> torch.Tensor:
    """A ``(B, C, H, W)`` map as ``(B*H*W, C)`` float64 rows (on the CPU unless it is on a GPU)."""
    device = m.device if m.device.type == "cuda" else torch.device("cpu")
    return m.detach().to(device, torch.float64).permute(0, 2, 3, 1).reshape(-1, m.shape[1])


def _solve(xtx: torch.Tensor, xty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` of the ridge regression (a small ridge on the weights, none on the bias)."""
    ridge = torch.zeros_like(xtx)
    channels = xtx.shape[0] - 1
    ridge.diagonal()[:channels] = RIDGE * float(xtx.diagonal()[:channels].mean().clamp_min(1e-30))
    solution = torch.linalg.solve(xtx + ridge, xty)
    return solution[:channels], solution[channels]


def _fitted_loss(maps: list[tuple[torch.Tensor, torch.Tensor]], fits: list[tuple[torch.Tensor, torch.Tensor]],
                 reduction) -> tuple[torch.Tensor, float]:
    """The feature loss through the fitted maps (in fp32, graph kept on the student) and the teacher maps' own
    loss against zero (the scale an exact fit is judged against)."""
    total, scale = 0.0, 0.0
    for (s, t), (w, b) in zip(maps, fits, strict=True):
        w, b = w.to(s.device, torch.float32), b.to(s.device, torch.float32)
        predicted = torch.einsum("bchw,cd->bdhw", s.float(), w) + b.view(1, -1, 1, 1)
        total = total + feature_loss(predicted, t, reduction)
        scale += float(feature_loss(torch.zeros_like(t), t, reduction))
    return total, scale  # type: ignore[return-value]


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
        raise TrainingError("alpha auto: the feature loss puts no gradient on the student (a linear map of the "
                            "student's maps already gives the teacher's, or the distilled layer is frozen); set "
                            "--alpha by hand")
    if med["grad_task"] <= 0:
        raise TrainingError("alpha auto: the task loss puts no gradient on the distilled layers (is the task "
                            "loss already zero?); set --alpha by hand")
    alpha = ratio * med["grad_task"] / med["grad_feat"]
    cap = MAX_LOSS_RATIO * med["task_loss"] / med["feat_loss"] if med["feat_loss"] > 0 else math.inf
    return AutoAlpha(alpha=min(alpha, cap), grad_task=med["grad_task"], grad_feat=med["grad_feat"],
                     task_loss=med["task_loss"], feat_loss=med["feat_loss"], batches=len(rows), capped=alpha > cap,
                     halves=any(r.get("half") for r in rows),
                     own_loss=statistics.median(r.get("own_loss", math.nan) for r in rows))


class BackOff:
    """``--alpha auto``'s answer to a loss that goes non-finite in the first epoch: the same run again, alpha / 4.

    Keeps the student's and aligners' starting weights and buffers (the distiller's state dict; the frozen teacher
    is not in it); :meth:`lower` puts them back in place (the optimizer's references stay valid) and divides
    ``distiller.alpha``.

    Example:
        >>> back_off = BackOff(distiller)       # doctest: +SKIP
        >>> back_off.lower(distiller)           # after a NonfiniteLoss: 272.9 -> 68.2  # doctest: +SKIP
        68.225
    """

    def __init__(self, distiller) -> None:
        self.start = {k: v.detach().clone() for k, v in distiller.state_dict().items()}
        self.left = MAX_BACK_OFFS

    def lower(self, distiller) -> float:
        """The starting weights back, one back-off fewer left, and the new alpha."""
        with torch.no_grad():
            state = distiller.state_dict()
            for key, value in self.start.items():
                state[key].copy_(value)
        self.left -= 1
        distiller.alpha /= BACK_OFF
        return distiller.alpha


def _plain(values: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in values.items())


def _broadcast(picked: AutoAlpha, device: torch.device) -> AutoAlpha:
    """Rank 0's pick on every rank."""
    values = torch.tensor([picked.alpha, picked.grad_task, picked.grad_feat, picked.task_loss, picked.feat_loss,
                           float(picked.capped), picked.own_loss], dtype=torch.float64, device=device)
    dist.broadcast(values, src=0)
    a, gt, gf, tl, fl, capped, own = values.tolist()
    return dataclasses.replace(picked, alpha=a, grad_task=gt, grad_feat=gf, task_loss=tl, feat_loss=fl,
                               capped=bool(capped), own_loss=own)
