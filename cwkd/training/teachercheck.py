"""The teacher, checked before any student trains: scored once on the validation split as distillation feeds it.

A teacher that sees its input wrongly (another normalisation, another size, other data) still runs, and the
student learns from noise without anyone being told: a benchmark of ours once fed a teacher the student's
statistics and its score fell from 84 % to 21 %. So :func:`check_teacher` scores the teacher on exactly what it
will see (the student's validation batches, remapped to the teacher's own statistics, at the student's input
size), prints the score, and refuses a teacher near chance or far below what its own checkpoint recorded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cwkd.choices import Precision
from cwkd.errors import ConfigError
from cwkd.files.checkpoint import read_metadata
from cwkd.tasks import can_teach, get_task, infer_task
from cwkd.training.config import TrainConfig

if TYPE_CHECKING:
    from cwkd.core.distiller import FeatureDistiller
    from cwkd.runtime import Dist
    from cwkd.tasks.base import TaskSpec
    from cwkd.training.console import RunConsole

#: How many points below its checkpoint's own record a teacher may score before it is refused.
MAX_DROP = 10.0


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher's weights came from, and the input statistics it expects (config.json's "teacher")."""

    model: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint: str | None = None  # a cwkd checkpoint given as --teacher
    weights: str | None = None     # else a --teacher-weights file, "pretrained" or "random"
    metric: str | None = None      # the teacher's score on val as distilled (check_teacher): its name
    score: float | None = None

    def to_dict(self) -> dict:
        """The JSON layout config.json has always had (the keys that apply, means as lists; its score as
        ``val_<metric>``)."""
        values = {"checkpoint": self.checkpoint, "model": self.model, "weights": self.weights,
                  "mean": list(self.mean), "std": list(self.std)}
        if self.metric is not None:
            values[f"val_{self.metric}"] = self.score
        return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class TeacherScore:
    """A teacher's score on the validation split (``value``, percent, of its task's ``metric``), and its bounds.

    ``chance``: the score at or below which it is taken to have learnt nothing; ``recorded``: what its own
    checkpoint recorded for the same metric (None: not a cwkd checkpoint).
    """

    metric: str
    label: str
    value: float
    chance: float
    recorded: float | None = None

    def line(self) -> str:
        """``teacher: 83.9 % top-1 on val``."""
        recorded = f" (its checkpoint recorded {self.recorded:.1f} %)" if self.recorded is not None else ""
        return f"teacher: {self.value:.1f} % {self.label} on val{recorded}"

    def problem(self) -> str | None:
        """Why the teacher is refused, or None when it is fine."""
        if self.recorded is not None and self.value < self.recorded - MAX_DROP:
            return (f"{self.recorded - self.value:.1f} points below the {self.recorded:.1f} % its own "
                    "checkpoint recorded")
        if self.value <= self.chance:
            return f"near chance (a teacher must score above {self.chance:.3g} % here)"
        return None

    @property
    def never_learnt(self) -> bool:
        """Its own checkpoint recorded a score near chance too: the teacher is weak, not fed wrongly."""
        return self.recorded is not None and self.recorded <= self.chance


def check_teacher(cfg: TrainConfig, task: TaskSpec, distiller: FeatureDistiller, source: TeacherSource | None,
                  val_loader, num_classes: int, device: torch.device, rank: Dist,
                  console: RunConsole) -> TeacherSource | None:
    """Score the teacher on ``val_loader`` (``num_classes`` classes) as ``distiller`` feeds it, print it, and
    refuse a bad one.

    Returns ``source`` with the score recorded (config.json and the checkpoint metadata keep it). Not done
    for plain training, a random teacher (``allow_random_teacher``: at chance by construction) or
    ``cfg.teacher_check`` off. Under DDP every rank scores its shard and the sums are shared, so every rank
    takes the same decision.
    """
    if source is None or distiller.teacher is None:
        return source
    if not cfg.teacher_check:
        console.info("teacher: not checked (--no-teacher-check)")
        return source
    if source.weights == "random":
        console.info("teacher: random weights (--allow-random-teacher), not checked")
        return source
    own = _teacher_task(task, source)
    if own.name is not task.name:  # a teacher of another task: its own scores need data of its task
        console.info(f"teacher: not checked: it is a {own.name.value} model and this run is {task.name.value} (its "
                     f"{own.metrics[own.best_metric]} needs {own.name.value} data)")
        return source
    score = measure(own, distiller, source, val_loader, num_classes, device, cfg.precision, rank, console)
    console.info(score.line())
    if (problem := score.problem()) is not None:
        size = "x".join(str(v) for v in distiller.input_size)
        fix = (f"its own checkpoint recorded only {score.recorded:.1f} %, so the teacher itself learnt little: "
               "train it longer or use a stronger one" if score.never_learnt else
               f"check its normalisation (it is given mean {_fmt(source.mean)} std {_fmt(source.std)}), the "
               f"input size ({size}) and the data")
        raise ConfigError(
            f"the teacher {source.checkpoint or source.model} scores {score.value:.1f} % {score.label} on "
            f"{cfg.data}'s val split as distillation feeds it, {problem}: {fix}; --no-teacher-check trains anyway")
    return dataclasses.replace(source, metric=score.metric, score=score.value)


def measure(task: TaskSpec, distiller: FeatureDistiller, source: TeacherSource, val_loader, num_classes: int,
            device: torch.device, precision: Precision, rank: Dist, console: RunConsole) -> TeacherScore:
    """The teacher's :class:`TeacherScore` on ``val_loader`` (of ``task``, the teacher's own): the student's
    batches, remapped as in distillation."""
    recorded = read_metadata(source.checkpoint).scores.get(task.best_metric) if source.checkpoint else None
    console.info(f"teacher: scoring {source.model} on {len(val_loader.dataset)} val image(s) as distillation "
                 "feeds it (--no-teacher-check skips this)")
    with task.as_taught(distiller.teacher, distiller.student, distiller.teacher_input) as teacher:
        scores = task.evaluate(teacher, val_loader, device, precision, device.type == "cuda", rank)
    return TeacherScore(metric=task.best_metric, label=task.metrics[task.best_metric], value=scores[task.best_metric],
                        chance=task.chance(num_classes), recorded=recorded)


def recorded_score(out: Path, source: TeacherSource | None) -> TeacherSource | None:
    """``source`` with the score a run's config.json recorded when it started (a resumed run is not checked again)."""
    if source is None or not (out / "config.json").is_file():
        return source
    try:
        teacher = json.loads((out / "config.json").read_text()).get("teacher") or {}
    except (OSError, ValueError):
        return source
    found = [(k.removeprefix("val_"), v) for k, v in teacher.items() if k.startswith("val_")
             and isinstance(v, int | float) and not isinstance(v, bool)]
    return dataclasses.replace(source, metric=found[0][0], score=float(found[0][1])) if found else source


def _teacher_task(task: TaskSpec, source: TeacherSource) -> TaskSpec:
    """The task the teacher's own model does, which may differ from the run's (:func:`cwkd.tasks.can_teach`)."""
    if source.checkpoint is not None:
        return get_task(read_metadata(source.checkpoint).task)
    named = infer_task(source.model)
    return get_task(named) if named is not task.name and can_teach(named, task.name) else task


def _fmt(values) -> str:
    return "/".join(f"{v:.3g}" for v in values)
