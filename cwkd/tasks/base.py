"""The interface a task implements: what the engine, the distiller, eval and export ask of it.

A detector fits it too: its ``batch_to`` moves a list of images and target dicts, its ``loss`` reads
the loss dict its model returns in train mode, and its ``feature_prefix`` points at the FPN outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from cwkd.choices import ExportFormat, MgdMask, Optimizer, Precision, Task
from cwkd.core.distilltask import DistillTask
from cwkd.data.spec import DataSpec
from cwkd.runtime import autocast

if TYPE_CHECKING:  # loaders imports timm's data helpers; the interface needs only the type
    from cwkd.data.transforms import DataConfig


@dataclass(frozen=True)
class ExportIO:
    """An exported graph's signature: its input and output names, their dynamic axes, and both in words.

    ``batch`` is the graph's fixed batch size (None: any, a dynamic axis); ``shapes`` describes the outputs
    and ``values`` the input's values, as ``cwkd export`` prints them. ``rows_unordered``: every output is one
    row per found object (a detector's boxes, labels, scores, masks), ranked by a score on which two runtimes
    may break near-ties differently, so verifying pairs each PyTorch row with the closest exported row.
    """

    input: str
    outputs: tuple[str, ...]
    shapes: str
    dynamic_axes: dict[str, dict[int, str]]
    batch: int | None = None
    values: str = "normalised"
    rows_unordered: bool = False

    @classmethod
    def batched(cls, input: str, output: str, shape: str) -> ExportIO:
        """One input and one output tensor, both with a dynamic batch axis (a classifier's, a segmenter's)."""
        return cls(input, (output,), f"'{output}' {shape}", {input: {0: "batch"}, output: {0: "batch"}})

    def input_shape(self, size: tuple[int, ...]) -> str:
        """The input's shape for an input ``size`` of ``(C, H, W)``: its fixed sizes, and names where dynamic."""
        axes = self.dynamic_axes.get(self.input, {})
        return "[" + ", ".join(str(axes.get(i, n)) for i, n in enumerate((self.batch or 1, *size))) + "]"


class Scorer:
    """One evaluation's running sums: :meth:`TaskSpec.evaluate` adds each batch, sums them over DDP ranks, reads
    the scores. A task's :meth:`TaskSpec.scorer` makes one per evaluation."""

    def running(self) -> AbstractContextManager:
        """What the whole loop over the loader runs in (a detector's: a fixed seed); by default nothing."""
        return nullcontext()

    def add(self, model: nn.Module, inputs, targets, amp: Callable[[], AbstractContextManager]) -> None:
        """Run ``model`` (in eval mode) on one batch on the device, under ``amp()``, and add what it scores."""
        raise NotImplementedError

    def reduce(self) -> None:
        """Sum what every DDP rank added (called only under DDP)."""
        raise NotImplementedError

    def result(self) -> dict:
        """``loss``, each of the task's metrics (percent) and ``images``, and any per-class scores."""
        raise NotImplementedError


class TaskSpec(DistillTask):
    """One task. Subclasses set the class attributes and implement the methods marked as required.

    It is what :class:`~cwkd.core.distiller.FeatureDistiller` asks of a task (``task=``): :meth:`loss`,
    :attr:`logits`, :meth:`kd_positions`, :meth:`forward`, :meth:`feature_prefix` and :meth:`feature_taps`
    (the last four default to :class:`~cwkd.core.distilltask.DistillTask`'s).
    """

    name: Task
    #: The metric (a key of :meth:`evaluate`'s dict) that picks ``best.safetensors``; higher is better.
    best_metric: str
    #: The metrics written to metrics.jsonl as ``val_<name>`` (after ``val_loss``), with their labels.
    metrics: dict[str, str]
    #: The exported graph's input and outputs (ONNX names, dynamic axes).
    export_io: ExportIO = ExportIO.batched("input", "output", "[batch, ...]")
    #: The class logits that logit KD (``--kd-weight``) matches, per image or per pixel, classes on dim 1: a
    #: method ``logits(outputs)`` in a task whose models have them; None where they have none (a detector's).
    logits: Callable[[Any], torch.Tensor] | None = None
    #: Whether the models are timm classifiers: built to the shape of a weights file's head (a teacher's
    #: ``--teacher-weights``, ``cwkd eval --weights``), pretrained with their own head, and rebuilt by
    #: ``timm.create_model`` from a Hugging Face folder (``cwkd export --format hf``, refused otherwise).
    timm_models: bool = False
    #: The export formats the task's models cannot take, each with what to use instead (``cwkd export`` refuses
    #: them; ``hf`` needs :attr:`timm_models`).
    refused_exports: dict[ExportFormat, str] = {}
    #: Whether DDP must look for parameters a step leaves unused (a detector's heads on an image without objects).
    ddp_find_unused: bool = False
    #: Whether every training step allocates tensors of the same sizes, so that keeping freed memory for the
    #: next step (:func:`cwkd.runtime.reuse_freed_memory`, on the CPU) pays. A detector's sizes vary
    #: with its proposals and objects, and with freed memory kept the heap fragments: a Mask R-CNN
    #: run grew until it was killed.
    steady_shapes: bool = True
    #: How the loaders batch items (None: torch's default stacking).
    collate: Callable | None = None
    #: The peak learning rate per optimizer when ``--lr`` is not given; one not here
    #: takes :data:`cwkd.training.config.OPTIMIZER_DEFAULTS`. Read once, when the config is
    #: resolved (config.json keeps the number).
    default_lr: dict[Optimizer, float] = {}

    def load_data(self, data: str, *, root: str | None = None, download: bool = False,
                  skip_corrupt: bool = False) -> DataSpec:
        """The data set ``data`` names, as train/val items and class names (required)."""
        raise NotImplementedError

    def resolve_name(self, name: str) -> str:
        """The model name a user typed, checked (and de-aliased); an unknown one is a ModelNotFoundError (required)."""
        raise NotImplementedError

    def build_model(self, name: str, *, num_classes: int | None = None, in_chans: int = 3,
                    pretrained: bool = False, weights: str | None = None, new_head: bool = False,
                    input_size: int | None = None, backbone_weights: str | None = None) -> nn.Module:
        """A model of this task by name (required). ``model.num_classes`` and ``model.cwkd_name`` are set.

        ``input_size`` is for models that resize their own input (a detector's ``min_size``); others ignore it.
        ``pretrained`` and ``backbone_weights`` start a dense model's backbone from ImageNet's or a classifier
        file's weights (:mod:`cwkd.tasks.bodies`, reported as ``model.cwkd_body``); ``weights`` loads the whole model.
        """
        raise NotImplementedError

    def default_input_size(self, spec: DataSpec) -> int | None:
        """The training input size when ``--input-size`` is not given (None: the model's own)."""
        return None

    def datasets(self, spec: DataSpec, dcfg: DataConfig) -> tuple[Dataset, Dataset]:
        """The train and val data sets transformed to tensors for a data config (required).

        Items must accept ``(index, seed)`` keys from :class:`~cwkd.data.loading.EpochSampler`.
        """
        raise NotImplementedError

    def batch_to(self, batch, device: torch.device, memory_format: torch.memory_format) -> tuple:
        """``(inputs, targets)`` of a loader batch on ``device``; ``len(inputs)`` is the batch size."""
        images, targets = batch[0], batch[1]
        return (images.to(device, non_blocking=True, memory_format=memory_format),
                targets.to(device, non_blocking=True))

    def loss(self, outputs, targets, *, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
        """The task's loss parts: ``task_loss`` (what is optimised) and any parts it sums (required)."""
        raise NotImplementedError

    def mgd_defaults(self, model: str) -> tuple[MgdMask, float]:
        """MGD's mask kind and ratio for a student ``model`` of this task, as MGD's reference configs set them; here
        its classification config (cls/mmcls/distillation/losses/mgd.py and its ImageNet configs): 15 % of the
        channels."""
        return MgdMask.channel, 0.15

    def scorer(self, loader, device: torch.device) -> Scorer:
        """An empty :class:`Scorer` for one :meth:`evaluate` over ``loader`` on ``device`` (required)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: Precision = Precision.fp32,
                 channels_last: bool = False, rank=None) -> dict:
        """``loss``, each of :attr:`metrics` (percent) and ``images`` of ``model`` over ``loader``, as its
        :meth:`scorer` adds them up; the model is left in the mode it was in.

        Under DDP each rank scores its shard and the sums are added; the distributed sampler may pad a few
        duplicates so shards are equal.
        """
        was_training = model.training
        model.eval()
        amp = autocast(device, precision)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        scorer = self.scorer(loader, device)
        with scorer.running():
            for batch in loader:
                inputs, targets = self.batch_to(batch, device, memory_format)
                scorer.add(model, inputs, targets, amp)
        model.train(was_training)
        if rank is not None and rank.enabled:
            scorer.reduce()
        return scorer.result()

    def chance(self, num_classes: int) -> float:
        """The :attr:`best_metric` (percent) at or below which a model is taken to have learnt nothing (a teacher
        that low is refused): for classification 1.5 times the top-1 of guessing among ``num_classes``."""
        return 150.0 / num_classes

    @contextmanager
    def as_taught(self, teacher: nn.Module, student: nn.Module, teacher_input: nn.Module | None) -> Iterator[nn.Module]:
        """The teacher as distillation feeds it, for :meth:`evaluate`: the student's batch, remapped by
        ``teacher_input`` (to the teacher's statistics) when given."""
        # In eval mode: evaluate() puts a model back in the mode it found it in, and the teacher stays in eval.
        yield teacher if teacher_input is None else nn.Sequential(teacher_input, teacher).eval()

    def per_class_counter(self, num_classes: int):
        """What records per-class scores during :meth:`evaluate` for ``cwkd eval --per-class``, when the task's
        :meth:`evaluate` does not return them itself (a classifier's confusion matrix); None: it does."""
        return None

    def export_model(self, model: nn.Module) -> nn.Module:
        """The model as a graph of tensors: :attr:`export_io`'s input in, its outputs out (ONNX, TorchScript)."""
        return model
