"""A loaded data set, whatever the task: :class:`DataSpec`."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from cwkd.data.images import ModeCount


@dataclass
class DataSpec:
    """A loaded data set: train/val splits of ``(PIL.Image, int)`` plus what the transforms need to know."""

    name: str
    train: Dataset
    val: Dataset
    classes: list[str]
    channels: int
    native_size: int | None
    modes: ModeCount | None = None  # image folders: what the header scan that chose ``channels`` found

    @property
    def num_classes(self) -> int:
        return len(self.classes)
