"""Which precision is fast where: native-bf16 detection, ``--precision auto``, and precision advice.

bf16 autocast is only a speed-up where the hardware computes bf16. On a CPU without it (AVX2 only,
no AVX-512 or AMX) oneDNN falls back to slow reference kernels: on a 2-core AMD EPYC with AVX2
only, the paper's pair (resnet50 -> mobilenetv1, batch 32, 224 px) took 8.5x longer per student
train step, 29.6x per teacher forward and 20.4x per cwkd step than in fp32 (issue 15). So every
message that recommends a precision asks :func:`fast_precisions` what is fast on its device.
"""

from __future__ import annotations

import functools

import torch

from cwkd.choices import Precision

#: The slowdown of bf16 autocast against fp32 measured on a CPU without native bf16 (issue 15).
SLOW_BF16 = "8-30x"


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
