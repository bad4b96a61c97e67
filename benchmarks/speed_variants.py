"""What speed.py times: a teacher/student pair and how to measure it, and the variants, each a builder of one
training step on fresh copies of the models (cwkd's own, and the peers' set up on the same models)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cwkd.core.distiller import FeatureDistiller
from cwkd.core.features import probe
from cwkd.core.pairing import Pair, pair_layers
from cwkd.tasks.classification.models import create_model


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
    distiller = place(distiller, b).train()
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
    distiller = place(FeatureDistiller(b.teacher, b.student, input_size=b.cfg.input_size, pairs="last"), b).train()
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


def place(module: nn.Module, b: Bench) -> nn.Module:
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


def selected(settings: Settings) -> list[str]:
    if settings.variants:
        return [n for n in VARIANTS if n in settings.variants and (settings.peers or not VARIANTS[n].peer)]
    return [n for n, v in VARIANTS.items()
            if (settings.peers or not v.peer) and (settings.amp != "none" or not v.amp) and not v.optional]


def make_models(cfg: Config, settings: Settings) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
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


def make_bench(name: str, cfg: Config, settings: Settings, models: tuple, fresh: bool = False) -> Bench:
    teacher, student, x, y = models
    if not fresh:  # every variant gets its own copies: no shared hooks, optimizer or BN state
        teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    return Bench(cfg, settings, teacher, student, x, y, amp=VARIANTS[name].amp)
