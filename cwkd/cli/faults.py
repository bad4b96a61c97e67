"""What a fault of the machine means for the user: out of memory, no C++ compiler for ``--compile``.

These come from PyTorch as plain ``RuntimeError``s, ``MemoryError`` or inductor errors, anywhere in a run, an
evaluation or an export. :func:`fault_message` turns one into the line the CLI prints; it imports nothing
heavy, so the CLI can call it without loading torch.
"""

from __future__ import annotations

import errno
import re

_CPU_OOM = re.compile(r"DefaultCPUAllocator: (can't|not enough memory)|can't allocate memory|not enough memory",
                      re.IGNORECASE)
_CUDA_OOM = re.compile(r"CUDA out of memory|CUDA error: out of memory|HIP out of memory", re.IGNORECASE)
_NO_COMPILER = re.compile(r"InvalidCxxCompiler|C\+\+ compiler|No working C compiler|CppCompileError|"
                          r"(g\+\+|gcc|clang\+\+|cl\.exe)\b.*(not found|No such file)|"
                          r"(command|compiler) not found", re.IGNORECASE)

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def precision_advice(device: str) -> str:
    """The lower precisions to suggest when memory runs out on ``device`` ("cpu", "cuda", ...); "" for none.

    Only precisions that are fast there (:func:`cwkd.runtime.fast_precisions`): bf16 on a CPU or GPU that
    computes it natively, fp16 on CUDA, nothing on a CPU without native bf16, where it is 8-30x slower. torch
    is loaded by the time memory runs out, so asking costs nothing.

    Example:
        >>> precision_advice("cpu")  # doctest: +SKIP
        ' or --precision bf16'
    """
    import torch

    from cwkd.choices import Precision
    from cwkd.runtime import fast_precisions

    try:
        lower = [p.value for p in fast_precisions(torch.device(device)) if p is not Precision.fp32]
    except (RuntimeError, AssertionError):  # a CUDA error message without a usable GPU to ask
        lower = [Precision.fp16.value] if device.startswith("cuda") else []
    return f" or --precision {' or '.join(lower)}" if lower else ""


def fault_message(exc: BaseException) -> str | None:
    """One line naming the cause of ``exc`` and its fix, or None when it is not a known machine fault.

    The exception and its causes (``raise ... from``) are all looked at: a DataLoader worker, a compiler
    backend or cwkd itself may have wrapped the original error.

    Example:
        >>> fault_message(MemoryError())
        'out of memory (MemoryError); use a smaller --batch-size, or a smaller --input-size'
    """
    for err in _chain(exc):
        name, text = type(err).__name__, str(err)
        first = text.strip().splitlines()[0][:200] if text.strip() else name
        if name == "OutOfMemoryError" or _CUDA_OOM.search(text):
            return (f"out of GPU memory ({first}); use a smaller --batch-size{precision_advice('cuda')}, "
                    "or a smaller --input-size")
        if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and _CPU_OOM.search(text)):
            detail = name if isinstance(err, MemoryError) and not text.strip() else first
            return (f"out of memory ({detail}); use a smaller --batch-size{precision_advice('cpu')}, "
                    "or a smaller --input-size")
        if name in ("InvalidCxxCompiler", "CppCompileError") or (
                ("inductor" in type(err).__module__ or name == "BackendCompilerFailed") and _NO_COMPILER.search(text)):
            said = next((ln.strip() for ln in text.splitlines() if _NO_COMPILER.search(ln)), name)[:200]
            return (f"--compile needs a working C++ compiler, and none was found ({said}); run without --compile, "
                    "or install one (e.g. apt install g++; $CXX names the one to use)")
        if isinstance(err, OSError) and err.errno in _DISK_FULL + (errno.EROFS,):
            where = f" {err.filename}" if err.filename else ""
            fix = ("the file system is read-only: remount it read-write or write somewhere else"
                   if err.errno == errno.EROFS else "free some space or write somewhere else")
            return f"could not write{where} ({err.strerror or name}); {fix}; files written before are intact"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first, without cycles."""
    seen: list[BaseException] = []
    while exc is not None and all(exc is not e for e in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen
