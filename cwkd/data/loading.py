"""Loaders: from a data set and its transforms to batches, seeded for exact resume.

:class:`EpochSampler` makes each epoch's order depend on (seed, epoch) alone, and gives every sample its own
augmentation seed. The transforms live in :mod:`cwkd.data.transforms`.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from cwkd.data.feed import DeviceInput, resolve_workers
from cwkd.data.spec import DataSpec
from cwkd.data.transforms import DataConfig, transformed_datasets
from cwkd.errors import ConfigError, DataError


class EpochSampler(DistributedSampler):
    """Shuffle by ``(seed, epoch)`` alone and give every sample its own augmentation seed.

    Why: a resumed run must see the same order and the same random crops as an uninterrupted one,
    whatever the number of loader workers. It yields ``(index, seed)`` keys, which the loaders' datasets
    understand. ``set_epoch(epoch, start)`` also skips the first ``start`` samples of this rank's share,
    to finish an interrupted epoch. Outside a process group pass ``num_replicas=1, rank=0``.

    Example:
        >>> sampler = EpochSampler(dataset, seed=0, num_replicas=1, rank=0)
        >>> sampler.set_epoch(3, start=64)  # epoch 3, from its 65th sample
    """

    def __init__(self, dataset: Dataset, *, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use ``epoch``'s order, beginning at this rank's sample number ``start``."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(super().__iter__())[self.start:]
        gen = torch.Generator().manual_seed((self.seed + 1) * 1_000_003 + self.epoch)
        seeds = torch.randint(0, 2**62, (len(self.dataset),), generator=gen).tolist()  # type: ignore[arg-type]
        return iter([(i, seeds[i]) for i in order])


def _worker_init(_worker_id: int) -> None:
    """Loader workers leave stopping to the main process: they ignore SIGINT and SIGHUP, and SIGTERM
    unless the main process sent it (which is how it ends them).

    Why: Ctrl-C, and a scheduler's SIGTERM, reach every process of the group; a worker that died of it
    would make the main process fail on its next batch instead of stopping cleanly at a step boundary.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # a dropped ssh session: the main process saves and stops
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # Linux; elsewhere torch's own SIGTERM handler stays
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
        threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _exit_on_sigterm_from(parent: int) -> None:
    """Wait for SIGTERMs; exit quietly (status 0, as torch's handler does) on the main process's."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def check_split_sizes(spec: DataSpec, world: int = 1) -> None:
    """Refuse a data set too small to train on: each process needs 2 training images, and val one.

    Why: BatchNorm cannot train on a batch of one image, and an empty val split has no score.
    """
    if math.ceil(len(spec.train) / world) < 2:
        where, fix = (" per process", f" for {world} processes; add images or start fewer processes") \
            if world > 1 else ("", "; add images")
        raise DataError(f"training needs at least 2 training images{where}, and the train split of {spec.name} "
                        f"has {len(spec.train)}{fix} (BatchNorm cannot train on a batch of one)")
    if len(spec.val) == 0:
        raise DataError(f"the val split of {spec.name} has no images; add some, as training scores the model on "
                        "them after every epoch")


#: How a DataLoader worker's failure reads when shared memory (/dev/shm) ran out.
_SHM_ERROR = re.compile(r"shared memory|\bshm\b|bus error|</torch_", re.IGNORECASE)
_SHM_FIX = "pass --workers 0, or give the machine more shared memory (Docker: docker run --shm-size=2g ...)"


class _Loader(DataLoader):
    """A DataLoader whose batches go through ``on_device`` (uint8 images to the model's input on the device), and
    whose workers' shared-memory failures become one :class:`DataError` with the fix."""

    def __init__(self, *args, on_device: Callable | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_device = on_device

    def __iter__(self) -> Iterator:
        try:
            for batch in super().__iter__():
                yield batch if self.on_device is None else self.on_device(batch)
        except RuntimeError as exc:
            if self.num_workers == 0 or not _SHM_ERROR.search(str(exc)):
                raise
            first = str(exc).strip().splitlines()[0].split(". ")[0].rstrip(".")  # torch's own advice follows
            raise DataError(f"the data loader's {self.num_workers} worker process(es) ran out of shared memory "
                            f"(/dev/shm): {first}; {_SHM_FIX}") from exc


def _warn_small_shm(cfg: DataConfig, batch_size: int, workers: int, *, distributed: bool = False,
                    path: str = "/dev/shm", value_bytes: int = 4) -> None:
    """Warn when /dev/shm looks too small for the batches ``workers`` hand over (about 2 in flight each).

    Under torchrun every process on the machine shares /dev/shm: local rank 0 alone warns, for all of them.
    ``value_bytes``: 1 for uint8 images, 4 for float ones.
    """
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed else 1
    if distributed and os.environ.get("LOCAL_RANK", "0") != "0":
        return
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return  # no /dev/shm (not Linux): torch uses another mechanism
    need = value_bytes * batch_size * math.prod(cfg.input_size) * workers * 2 * processes  # prefetch_factor 2
    if free < need:
        each = f" in each of {processes} processes" if processes > 1 else ""
        warnings.warn(f"{path} has {free / 2**20:.0f} MiB free, but {workers} loader worker(s){each} need about "
                      f"{need / 2**20:.0f} MiB for batches of {batch_size}; if they crash, {_SHM_FIX}",
                      stacklevel=3)


def build_loaders(
    spec: DataSpec,
    cfg: DataConfig,
    *,
    batch_size: int,
    workers: int | str = "auto",
    device: torch.device | str = "cpu",
    distributed: bool = False,
    seed: int = 0,
    datasets: tuple[Dataset, Dataset] | None = None,
    collate: Callable | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Build the train loader (shuffled, seeded, last partial batch dropped) and the val loader (in order).

    The train loader's sampler is an :class:`EpochSampler` (sharded under ``distributed``): call
    ``train_loader.sampler.set_epoch(epoch)`` each epoch. Its order and augmentations depend on ``seed``
    and the epoch alone. Under ``distributed`` val uses a ``DistributedSampler`` that pads to a multiple of
    the world size, so a few samples may be counted twice. ``datasets`` (a task's transformed train and
    val sets) replace the image transform of :func:`transformed_datasets`; ``collate`` (a task's) batches them.

    Example:
        >>> train_loader, val_loader = build_loaders(spec, cfg, batch_size=64, workers=0)
    """
    workers = resolve_workers(workers)
    if batch_size < 1 or workers < 0:
        raise ConfigError(f"batch_size must be >= 1 and workers >= 0 (got {batch_size} and {workers})")
    train, val = datasets or transformed_datasets(spec, cfg)
    common = {
        "batch_size": batch_size,
        "num_workers": workers,
        "pin_memory": torch.device(device).type == "cuda",
        "persistent_workers": workers > 0,
        "worker_init_fn": _worker_init if workers > 0 else None,
        "collate_fn": collate,
    }
    if workers > 0:
        _warn_small_shm(cfg, batch_size, workers, distributed=distributed, value_bytes=_value_bytes(train))
    common["on_device"] = DeviceInput(cfg.mean, cfg.std, device)
    shard = {} if distributed else {"num_replicas": 1, "rank": 0}
    train_sampler = EpochSampler(train, seed=seed, **shard)
    # The generator only seeds the workers' base RNG, which keeps loading off the global RNG.
    gen = torch.Generator().manual_seed(seed)
    train_loader = _Loader(train, sampler=train_sampler, generator=gen,
                              drop_last=len(train_sampler) >= batch_size, **common)
    val_sampler = DistributedSampler(val, shuffle=False) if distributed else None
    val_loader = _Loader(val, sampler=val_sampler, shuffle=False, **common)
    return train_loader, val_loader


def _value_bytes(dataset: Dataset) -> int:
    """1 for items of :func:`build_transform` with ``uint8``, else 4 (float images, as other tasks give)."""
    transform = getattr(getattr(dataset, "transform", None), "transform", None)
    steps = getattr(transform, "transforms", None) or [None]
    return 1 if isinstance(steps[-1], T.PILToTensor) else 4


def set_epoch(loader, seed: int, epoch: int, start: int = 0) -> None:
    """Make the epoch's order and augmentations depend on (seed, epoch) alone, from sample ``start`` on.

    ``start`` (samples of this rank already trained) needs the :class:`EpochSampler` that
    :func:`build_loaders` gives; a resumed run then finishes the epoch it was stopped in.
    """
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch, start)
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed * 1000 + epoch)
