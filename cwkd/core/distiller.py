"""FeatureDistiller: the student, its aligners, and a frozen teacher, as one trainable module."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cwkd.core.aligner import Method, MgdMask, build_aligner
from cwkd.core.distilltask import DistillTask
from cwkd.core.features import FeatureHooks, LayerInfo, as_size, probe, to_map
from cwkd.core.losses import Reduction, channel_divergence, feature_loss, kd_loss
from cwkd.core.modelinfo import default_input_size, model_name
from cwkd.core.pairing import Pair, pair_layers
from cwkd.core.settings import LossSettings
from cwkd.errors import ConfigError


class FeatureDistiller(nn.Module):
    """Train ``student`` to mimic ``teacher`` through channel-wise aligned features.

    Everything trainable (the student and one aligner per pair) is a registered submodule, so
    one DDP wrap, one optimizer and one ``state_dict`` see exactly that. The teacher is held
    outside the module tree (``None`` for plain training): it is frozen, always in eval mode,
    absent from ``parameters()``, and still follows ``.to(device)``.

    ``teacher_input`` (optional, e.g. a :class:`Renormalize`) maps each batch before the teacher sees
    it, for a teacher that was trained on other input statistics than the student's; it is held
    outside the module tree like the teacher.

    ``task`` says what the distiller asks of a task (:class:`~cwkd.core.distilltask.DistillTask`): its loss
    parts (a dict whose ``task_loss`` is optimised, given ``label_smoothing``), the logits logit KD matches (None:
    the task has none, and ``kd_weight`` must be 0) and which positions of them count (a segmenter's labelled
    pixels), how the student is called on a batch (a detector takes its targets too), where ``pairs="last"``/
    ``"all"`` look for stages (a segmentation model's ``"backbone."``; explicit pairs may name any layer), and
    any feature capture of its own (a detector's FPN levels, see :class:`~cwkd.core.distilltask.FeatureTaps`).
    None is a plain classifier: cross-entropy on the student's output, which is its logits. Pass a task of
    :mod:`cwkd.tasks` for the others: ``task=cwkd.tasks.get_task("segmentation")``.

    ``mgd_mask``/``mgd_ratio`` set MGD's mask (default: its classification config, 15 % of the channels; a
    task's own: ``task.mgd_defaults(student_name)``); ``cwd_tau`` is CWD's temperature.

    ``forward(images, targets)`` returns a dict with ``loss`` (``task + alpha * feat + kd_weight
    * kd``), ``task_loss`` and the task's other parts, ``feat_loss``, ``kd_loss`` when used, one
    ``feat/STUDENT->TEACHER`` entry per pair, and ``outputs`` (the student's own output).

    Example:
        >>> import timm
        >>> d = FeatureDistiller(timm.create_model("test_resnet"), timm.create_model("test_efficientnet"))
        >>> out = d(torch.randn(2, 3, 160, 160), torch.tensor([0, 1]))
        >>> out["loss"].backward()
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        *,
        pairs: str | list[tuple[str, str]] = "last",
        method: Method | str = Method.cwt,
        alpha: float | str = 1.0,
        hidden: int | None = None,
        input_size: int | Iterable[int] | None = None,
        reduction: Reduction | str = Reduction.mean,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
        label_smoothing: float = 0.0,
        teacher_input: nn.Module | None = None,
        task: DistillTask | None = None,
        mgd_mask: MgdMask | str = MgdMask.channel,
        mgd_ratio: float = 0.15,
        cwd_tau: float = 1.0,
    ) -> None:
        super().__init__()
        LossSettings(method=Method(method), alpha=alpha, hidden=hidden, reduction=reduction, kd_weight=kd_weight,
                     kd_temperature=kd_temperature, label_smoothing=label_smoothing, mgd_mask=MgdMask(mgd_mask),
                     mgd_ratio=mgd_ratio, cwd_tau=cwd_tau).validate(flags=False)
        self.method = Method(method)
        self.cwd_tau = float(cwd_tau)
        # "auto": cwkd.core.autoalpha.pick_alpha sets the number from the first batches (cwkd.run does).
        self.alpha: float | None = None if alpha == "auto" else float(alpha)
        self.reduction = Reduction(reduction)
        self.kd_weight = float(kd_weight)
        self.kd_temperature = float(kd_temperature)
        self.label_smoothing = float(label_smoothing)
        self.task = task if task is not None else DistillTask()  # none: a plain classifier, as before tasks existed
        if self.kd_weight > 0 and self.task.logits is None:
            raise ConfigError(f"logit KD (kd_weight {kd_weight:g}) needs class logits, and this task's model "
                              "has none; set kd_weight 0 and distil features")
        size = as_size(input_size, default_input_size(student)[0]) if input_size is not None \
            else default_input_size(student)
        self.input_size = size
        self.student = student
        if teacher is None and (self.method is not Method.none or self.kd_weight > 0):
            raise ConfigError("feature distillation and logit KD need a teacher; pass one, or method='none'")
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained, never saved
        object.__setattr__(self, "teacher_input", teacher_input)
        # Whether the teacher's maps of the last training step were all finite (on the device: no host sync);
        # a non-finite loss names the teacher when they were not (cwkd.training.nonfinite).
        self.teacher_finite: torch.Tensor | None = None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.pairs: list[Pair] = []
        self._taps = self.task.feature_taps(teacher, student, size, pairs) if self.method is not Method.none else None
        if self._taps is not None:
            self.pairs = list(self._taps.pairs)
            self._taps.attach()
        elif self.method is not Method.none:
            within = self.task.feature_prefix(student) if isinstance(pairs, str) and pairs in ("last", "all") else ""
            s_layers, t_layers = probe(student, size, within=within), probe(teacher, size, within=within)
            self.pairs = pair_layers(
                s_layers, t_layers, pairs,
                student_label=model_name(student), teacher_label=model_name(teacher),
            )
        self.aligners = nn.ModuleDict({
            _key(i): build_aligner(self.method, p.student.channels, p.teacher.channels, hidden,
                                   mgd_mask=mgd_mask, mgd_ratio=mgd_ratio)
            for i, p in enumerate(self.pairs)
        })
        hooked = [] if self._taps is not None else self.pairs  # taps capture their own features
        self._s_hooks = FeatureHooks(student, [p.student.name for p in hooked])
        self._s_hooks.attach()
        self._t_hooks = None
        if teacher is not None:
            self._t_hooks = FeatureHooks(teacher, [p.teacher.name for p in hooked])
            self._t_hooks.attach()

    @property
    def uses_teacher(self) -> bool:
        """Whether a step runs the teacher at all (not for plain training)."""
        return bool(self.pairs) or self.kd_weight > 0

    def train(self, mode: bool = True) -> FeatureDistiller:
        """Switch the student and aligners; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .float() ... reach the teacher too, although it is not a submodule.
        super()._apply(fn, *args, **kwargs)
        for outside in (self.teacher, self.teacher_input):
            if outside is not None:
                outside._apply(fn, *args, **kwargs)
        return self

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        """One distillation step's losses (or just the student's ``outputs`` when ``targets`` is None)."""
        if self.alpha is None and targets is not None and self.pairs:
            raise ConfigError("alpha='auto' is not picked yet: call cwkd.pick_alpha(distiller, batches) "
                              "before training (cwkd's run does it for you)")
        outputs, s_feats, t_feats, t_logits = self._run(images, targets)
        out: dict = {"outputs": outputs}
        if targets is None:
            return out
        parts = self.task_loss(outputs, targets)
        loss = parts["task_loss"]
        out.update({k: v.detach() for k, v in parts.items()})
        if self.pairs:
            feat = self._feature_losses(s_feats, t_feats, out)
            loss = loss + self.alpha * feat
            out["feat_loss"] = feat.detach()
        if self.kd_weight > 0 and t_logits is not None:
            kd = kd_loss(self.task.logits(outputs), t_logits, self.kd_temperature, self.task.kd_positions(targets))
            loss = loss + self.kd_weight * kd
            out["kd_loss"] = kd.detach()
        out["loss"] = loss
        return out

    def task_loss(self, outputs, targets) -> dict[str, torch.Tensor]:
        """The task's loss parts on the student's ``outputs`` (``task_loss`` is optimised), with ``label_smoothing``."""
        return self.task.loss(outputs, targets, label_smoothing=self.label_smoothing)

    def _run(self, images, targets) -> tuple[Any, dict, dict, torch.Tensor | None]:
        """The student's outputs and both sides' raw features of one batch (teacher ones only with ``targets``)."""
        t_feats: dict[str, torch.Tensor] = {}
        t_logits = None
        if self.uses_teacher and targets is not None and self._taps is None:
            with torch.inference_mode():
                t_images = images if self.teacher_input is None else self.teacher_input(images)
                t_outputs = self.teacher(t_images)
                raw = self._t_hooks.pop()
            # Leave inference mode: clones are ordinary tensors that autograd may save.
            t_logits = self.task.logits(t_outputs).clone() if self.kd_weight > 0 else None
            t_feats = {k: v.clone() for k, v in raw.items()}
            del raw, t_outputs
        outputs = self.task.forward(self.student, images, targets)
        s_feats = self._s_hooks.pop()
        if self._taps is not None:  # the teacher runs on what the student's own forward saw
            s_feats, t_feats = self._taps.pop(teacher=targets is not None)
        if t_feats:
            with torch.no_grad():
                self.teacher_finite = torch.stack([torch.isfinite(t).all() for t in t_feats.values()]).all()
        return outputs, s_feats, t_feats, t_logits

    def paired_maps(self, images: torch.Tensor, targets: Any
                    ) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]], float]:
        """The student's outputs; per pair, ``(student map, teacher map)`` of one batch, before any aligner; and
        the feature loss through the run's own aligners (alpha 1, no graph): ``forward``'s ``feat_loss`` now.

        The student map is resized to the teacher's as :meth:`align` would (it keeps its graph); the teacher map
        has none. ``cwkd.core.autoalpha`` fits its own map between the two. Random draws of the aligners (MGD's
        masks) are undone, so a probe leaves the random state as it found it.
        """
        outputs, s_feats, t_feats, _ = self._run(images, targets)
        maps = [(self._resize(i, to_map(s_feats[p.student.name], p.student)),
                 to_map(t_feats[p.teacher.name], p.teacher)) for i, p in enumerate(self.pairs)]
        cuda = [m.device for m, _ in maps[:1] if m.device.type == "cuda"]
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            own = float(self._feature_losses(s_feats, t_feats, {}))
        return outputs, maps, own

    def _feature_losses(self, s_feats: dict, t_feats: dict, out: dict) -> torch.Tensor:
        total = 0.0
        for i, pair in enumerate(self.pairs):
            aligned = self.align(i, s_feats[pair.student.name])
            target = to_map(t_feats[pair.teacher.name], pair.teacher)
            part = channel_divergence(aligned, target, self.cwd_tau) if self.method is Method.cwd \
                else feature_loss(aligned, target, self.reduction)
            out[f"feat/{pair.key}"] = part.detach()
            total = total + part
        return total  # type: ignore[return-value]

    def align(self, index: int, raw: torch.Tensor) -> torch.Tensor:
        """Map one raw student output into pair ``index``'s teacher space (resized if needed)."""
        pair = self.pairs[index]
        return self._resize(index, self.aligners[_key(index)](to_map(raw, pair.student)))

    def _resize(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """A student-side map at pair ``index``'s teacher size (bilinear; unchanged when the sizes agree)."""
        pair = self.pairs[index]
        if not pair.needs_resize:
            return x
        return F.interpolate(x, size=(pair.teacher.height, pair.teacher.width), mode="bilinear", align_corners=False)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's weights alone, without the aligners: what an export ships."""
        return self.student.state_dict()

    def describe(self) -> list[dict]:
        """The layer pairs, with shapes, as JSON-ready dicts."""
        return [p.to_dict() for p in self.pairs]


class Renormalize(nn.Module):
    """Turn images normalised with one (mean, std) into images normalised with another.

    ``x * (std_from / std_to) + (mean_from - mean_to) / std_to`` per channel: exactly what
    normalising the raw image with ``(mean_to, std_to)`` would give.

    Example:
        >>> remap = Renormalize((0.5,), (0.5,), (0.25,), (0.25,))
        >>> remap(torch.zeros(1, 1, 2, 2)).flatten().tolist()  # raw 0.5 -> (0.5 - 0.25) / 0.25
        [1.0, 1.0, 1.0, 1.0]
    """

    def __init__(self, mean_from, std_from, mean_to, std_to) -> None:
        super().__init__()
        m0, s0, m1, s1 = (torch.as_tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1)
                          for v in (mean_from, std_from, mean_to, std_to))
        self.register_buffer("scale", s0 / s1)
        self.register_buffer("shift", (m0 - m1) / s1)

    @classmethod
    def between(cls, student: tuple, teacher: tuple) -> Renormalize | None:
        """The remap from the student's ``(mean, std)`` to the teacher's, or None when they agree."""
        same = all(len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b, strict=True))
                   for a, b in zip(student, teacher, strict=True))
        return None if same else cls(*student, *teacher)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale.to(images.dtype) + self.shift.to(images.dtype)


def _key(index: int) -> str:
    return f"pair{index}"


__all__ = ["FeatureDistiller", "LayerInfo", "Renormalize"]
