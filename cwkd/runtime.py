"""Where a model runs: the device, the distributed setup, autocast, the CPU allocator, and which precision is
fast where (native-bf16 detection, ``--precision auto``, precision advice).

bf16 autocast is only a speed-up where the hardware computes bf16. On a CPU without it (AVX2 only,
no AVX-512 or AMX) oneDNN falls back to slow reference kernels: on a 2-core AMD EPYC with AVX2
only, the paper's pair (resnet50 -> mobilenetv1, batch 32, 224 px) took 8.5x longer per student
train step, 29.6x per teacher forward and 20.4x per cwkd step than in fp32 (issue 15). So every
message that recommends a precision asks :func:`fast_precisions` what is fast on its device.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cwkd.choices import Precision
from cwkd.errors import ConfigError, DataSetWarning

#: Where Linux names the CPU's model.
CPUINFO = Path("/proc/cpuinfo")
#: The slowdown of bf16 autocast against fp32 measured on a CPU without native bf16 (issue 15).
SLOW_BF16 = "8-30x"


def device_name(device: torch.device) -> str:
    """What a run ran on, for config.json and ``cwkd compare``: ``cuda (NVIDIA H100 80GB HBM3)``, or the CPU's
    model and the instruction set torch's kernels use on it, ``cpu (AMD EPYC, AVX512)``: the same seed trains to
    other numbers on another CPU, because its kernels round differently (docs/benchmarks.md)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()})"
    return device.type


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows of it."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 in hardware, as oneDNN sees it (AVX-512, AMX or Arm bf16).

    Asked once per process; False where torch cannot tell.

    Example:
        >>> cpu_bf16_native()  # doctest: +SKIP
        True
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def fast_precisions(device: torch.device) -> tuple[Precision, ...]:
    """The precisions that run at full speed on ``device``, the one ``auto`` picks first.

    CPU: bf16 then fp32 where bf16 is native, else fp32 only (fp16 needs CUDA). CUDA: bf16,
    fp16, fp32 on GPUs with native bf16 (Ampere and newer), else fp16 (with a GradScaler), fp32.

    Example:
        >>> fast_precisions(torch.device("cpu"))  # doctest: +SKIP
        (<Precision.bf16: 'bf16'>, <Precision.fp32: 'fp32'>)
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision.bf16, Precision.fp16, Precision.fp32
        return Precision.fp16, Precision.fp32
    return (Precision.bf16, Precision.fp32) if cpu_bf16_native() else (Precision.fp32,)


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """``auto`` becomes the fastest precision of ``device``; any other precision is kept as asked."""
    return fast_precisions(device)[0] if precision is Precision.auto else precision


def precision_advice(device: torch.device, instead_of: Precision) -> str:
    """``--precision X or Y``: what to use on ``device`` instead of ``instead_of``, fast ones only.

    Every message that recommends a precision builds it here, so none steers a user to bf16 on
    a CPU that emulates it.
    """
    choices = [p.value for p in fast_precisions(device) if p is not instead_of]
    return "--precision " + " or ".join(choices)


def precision_warning(precision: Precision, device: torch.device) -> str | None:
    """One line to print before a run when ``precision`` is slow on ``device``, else None."""
    if precision in (Precision.fp32, Precision.auto) or precision in fast_precisions(device):
        return None
    if device.type == "cpu":
        return (f"--precision {precision.value}: this CPU has no native bf16 (no AVX-512 or AMX), so bf16 "
                f"autocast is emulated and runs {SLOW_BF16} slower than fp32 (measured on an AVX2-only AMD "
                f"EPYC); use {precision_advice(device, precision)}")
    return (f"--precision {precision.value}: this GPU has no native {precision.value} and emulates it "
            f"slowly; use {precision_advice(device, precision)}")


@dataclass
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes."""
        return self.rank == 0


@contextmanager
def main_rank_warnings(rank: Dist) -> Iterator[None]:
    """Warnings about the data set itself (:class:`~cwkd.errors.DataSetWarning`) from rank 0 alone: under
    ``torchrun`` every process loads the same data and would print the same lines once each. Other warnings
    (a file skipped on one process's shard) still come from whichever process meets them."""
    with warnings.catch_warnings():
        if not rank.main:
            warnings.simplefilter("ignore", DataSetWarning)
        yield


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group ``torchrun`` describes (nccl on GPU, gloo on CPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, precision: Precision) -> torch.device:
    """``auto`` picks CUDA when present; asking for what is not there is an error, not a fallback."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        device = torch.device(name if ":" in name else f"cuda:{local_rank}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered from 0; use --device cuda:0 or --device cpu")
    elif name == "cpu":
        device = torch.device("cpu")
    else:
        raise ConfigError(f"unknown --device '{name}'; use auto, cpu, cuda or cuda:N")
    if precision is Precision.fp16 and device.type == "cpu":
        raise ConfigError(f"--precision fp16 needs a CUDA GPU; on this CPU use {precision_advice(device, precision)}")
    return device


# glibc's mallopt(3) parameters, and their defaults for putting them back.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024}
_USER_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


@contextmanager
def reuse_freed_memory(device: torch.device) -> Iterator[bool]:
    """While training on the CPU, keep freed memory in the process for the next step (glibc only).

    glibc hands every block above its mmap threshold (32 MiB at most) back to the kernel when it is
    freed, so each training step at ImageNet sizes page-faults its activations in again: on a
    2-core machine that made a MobileNetV1 train step (batch 32, 224 px) twice as slow, 1.48 s
    against 0.72 s (``benchmarks/speed.py --system-malloc``). Inside this context freed memory stays
    in the heap (``M_MMAP_MAX=0``, trimming only above 2 GiB), for 4-8 % more step memory; on exit
    glibc's defaults come back and the spare memory is returned. Yields whether it applied:
    not on CUDA, not on other C libraries, and not when glibc's ``MALLOC_*`` variables or an
    ``LD_PRELOAD``-ed allocator (jemalloc, tcmalloc, mimalloc) say you chose the allocator yourself.

    Example:
        >>> with reuse_freed_memory(torch.device("cpu")):  # doctest: +SKIP
        ...     train()
    """
    chosen = any(os.environ.get(k) for k in _USER_MALLOC_ENV) or "malloc" in os.environ.get("LD_PRELOAD", "")
    libc = _glibc() if device.type == "cpu" and not chosen else None
    if libc is None:
        yield False
        return
    try:  # set inside the try: a Ctrl-C between the two calls still restores glibc's defaults
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        yield True
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype for a precision (None for fp32); resolve ``auto`` first (cwkd.runtime)."""
    if precision is Precision.auto:
        raise ValueError("Precision.auto has no dtype; pass resolve_precision(precision, device)")
    return {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}.get(precision)


def autocast(device: torch.device, precision: Precision) -> Callable[[], torch.autocast]:
    """The autocast context for ``precision`` on ``device``, built once: call it to enter a forward pass.

    Example:
        >>> amp = autocast(torch.device("cpu"), Precision.fp32)
        >>> with amp():
        ...     pass
    """
    amp = autocast_dtype(precision)
    return functools.partial(torch.autocast, device.type, dtype=amp or torch.float32, enabled=amp is not None)
