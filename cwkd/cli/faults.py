"""What a fault of the machine means for the user: out of memory, no C++ compiler for ``--compile``; and
:func:`one_line_errors`, which turns it, or a library error or a Ctrl-C, into one line and an exit code.

Faults come from PyTorch as plain ``RuntimeError``s, ``MemoryError`` or inductor errors, anywhere in a run, an
evaluation or an export. :func:`fault_message` turns one into the line the CLI prints; this module imports nothing
heavy, so the CLI can use it without loading torch.
"""

from __future__ import annotations

import contextlib
import errno
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import typer

from cwkd.errors import CwkdError, RunInterrupted

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


# ----------------------------------------------------------------------------- one line per error

_state = {"debug": False}  # --debug: tracebacks instead of one line (set by the app's callback)


def set_debug(debug: bool) -> None:
    """``--debug``: let :func:`one_line_errors` re-raise, so the full traceback shows."""
    _state["debug"] = debug


@contextlib.contextmanager
def one_line_errors(run_dir: str | None = None, *, training: bool = False) -> Iterator[None]:
    """Library errors and machine faults become ``error: ...`` and exit 1; a stop signal exits 128 + signal.

    ``training``: the command trains, into ``run_dir`` if known; the message after a Ctrl-C says what to do.
    """
    try:  # nothing before this line: a Ctrl-C while torch imports must reach the handlers below
        yield
    except CwkdError as exc:
        if _state["debug"]:
            raise
        # An error raised in a DataLoader worker arrives wrapped in a worker traceback: keep its last line,
        # without the "cwkd.errors.DataError: " that the traceback puts before the message.
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        typer.echo(f"error: {re.sub(r'^cwkd[.]errors[.][A-Za-z]+: ', '', lines[-1])}", err=True)
        raise typer.Exit(1) from None
    except RunInterrupted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:  # Ctrl-C before training started, or a second Ctrl-C: files saved stay
        ignore_sigint()  # a further Ctrl-C while exiting would only print "Exception ignored ..."
        if _state["debug"]:
            raise
        exc.__traceback__ = None  # free the interrupted frames now, so their cleanup runs while SIGINT is ignored
        typer.echo(_interrupted(run_dir) if training else "interrupted; files already written are intact", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # out of memory, no compiler for --compile, a read-only disk: one line too
        message = None if _state["debug"] else fault_message(exc)
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1) from None


def _interrupted(run_dir: str | None) -> str:
    """What a Ctrl-C outside training leaves: suggest --resume only for a run that has something to resume."""
    if run_dir is None:  # a default --out: the engine named it, and printed it if it got that far
        return "interrupted; files already written are intact (a run that finished an epoch continues with --resume)"
    if (Path(run_dir) / "config.json").is_file() and (Path(run_dir) / "state.pt").is_file():
        return f"interrupted; files already written are intact; continue the run with --resume {run_dir}"
    return "interrupted before the first epoch finished; nothing to resume: run the same command again"


def ignore_sigint() -> None:
    """Ignore further SIGINTs (main thread only: signal handlers cannot be set elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
