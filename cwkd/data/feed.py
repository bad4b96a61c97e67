"""Feeding the device: how many loader workers ``--workers auto`` starts, and uint8 batches normalised on the device.

Why: a GPU step on ImageNet-sized images outruns two PIL workers many times over. ``auto`` gives each
process its share of the machine's cores, and image batches cross from the workers to the main process,
and from the host to the GPU, as uint8 (a quarter of the float bytes); :class:`DeviceInput` turns them
into the model's float input on the device, as timm's ``PrefetchLoader`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from cwkd.errors import ConfigError

#: What ``--workers auto`` means in a config.
AUTO = "auto"
#: The most loader workers ``auto`` starts per process. Why 16: a PIL decode, crop and flip of an
#: ImageNet-sized JPEG takes a few milliseconds on one core, so an H100 distilling ResNet-50 into MobileNetV1
#: (about 4,500 images/s in bf16) needs on the order of 10-20 cores; 8 would cap the input below that. Past
#: 16, each further process adds its memory (a Python interpreter with torch, and its prefetched batches in
#: /dev/shm) for less and less: on a machine with more cores per process, give a number.
AUTO_WORKERS_MAX = 16


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def local_processes() -> int:
    """How many training processes share this machine: torchrun's ``LOCAL_WORLD_SIZE``, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_workers(workers: int | str, *, cores: int | None = None, processes: int | None = None) -> int:
    """The loader worker count for ``workers``: a number stays as it is; ``"auto"`` is this process's share.

    ``auto``: the usable cores divided by the processes on this machine, at most :data:`AUTO_WORKERS_MAX`,
    and at least 1; 0 (load in the main process) on a single core, where a worker could only take turns
    with the main process and would add its start-up and a copy of every batch. Why all of the share and
    not one less for the main process: a worker sleeps once its prefetched batches are full, so when the
    model is the bottleneck the workers take little; when the input is, every core decoding counts.

    Example:
        >>> resolve_workers("auto", cores=16, processes=1), resolve_workers("auto", cores=64, processes=2)
        (16, 16)
        >>> resolve_workers("auto", cores=1), resolve_workers("auto", cores=4, processes=8), resolve_workers(3)
        (0, 1, 3)
    """
    if workers != AUTO:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise ConfigError(f"--workers must be a whole number of at least 0, or auto; got {workers!r}")
        return workers
    cores = usable_cores() if cores is None else cores
    if cores <= 1:
        return 0
    share = cores // (local_processes() if processes is None else max(1, processes))
    return max(1, min(share, AUTO_WORKERS_MAX))


class DeviceInput:
    """Turn a batch's uint8 images into the model's float input on ``device``: ``(x / 255 - mean) / std``.

    The same arithmetic as torchvision's ``ToTensor`` + ``Normalize`` (so the model sees what the host path
    gave it), done on the device after a copy of a quarter of the bytes (non-blocking from pinned memory on
    CUDA, and in channels_last there, as the engine's models are). A batch whose first item is not a uint8
    tensor (a task that normalises on the host, a detector's list of images) passes through unchanged.

    Example:
        >>> to_input = DeviceInput((0.5,), (0.25,), "cpu")
        >>> to_input([torch.full((2, 1, 4, 4), 255, dtype=torch.uint8), torch.tensor([0, 1])])[0][0, 0, 0, 0]
        tensor(2.)
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.tensor(tuple(std), dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

    def __call__(self, batch):
        if not isinstance(batch, list | tuple) or not batch:
            return batch
        images = batch[0]
        if not (torch.is_tensor(images) and images.dtype == torch.uint8):
            return batch
        images = images.to(self.device, non_blocking=True)
        if images.dim() == 4:
            images = images.contiguous(memory_format=self.memory_format)
        images = images.float().div_(255).sub_(self.mean).div_(self.std)
        return type(batch)((images, *batch[1:]))
