"""Files cwkd writes and reads: atomic writes, safetensors checkpoints, weights loaded without running code.

Safetensors files are read by parsing their JSON header; ``.pth`` files go through
``torch.load(weights_only=True)``, which refuses any pickle that names a function or class.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch

from cwkd.errors import CheckpointError, ConfigError
from cwkd.files.metadata import CheckpointMeta
from cwkd.files.strict_json import json_text

_CONTAINER_KEYS = ("state_dict", "model", "model_state", "state_dict_ema")  # first one present wins
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on its JSON header
_NOT_CWKD = "not a cwkd checkpoint; to load plain weights use --weights / a timm name"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temp file next to ``path``, then move it over ``path`` in one step.

    On any failure the temp file is removed and an old ``path`` is untouched. File-system errors become
    :class:`ConfigError`; whatever ``write`` raises otherwise is re-raised as it is.

    Example:
        >>> atomic_write("out/log.txt", lambda f: f.write(b"hello\\n"))  # doctest: +SKIP
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 honours the umask (mkstemp would make every checkpoint 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise ConfigError(f"could not write {path}: {exc}; {_write_advice(exc)}") from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    try:  # make the rename itself durable; some platforms cannot open a directory, which is fine
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _remove_quietly(tmp: Path) -> None:
    """Remove a temp file; where that fails too (a read-only file system), the first error is the one to report."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _write_advice(exc: OSError) -> str:
    """The fix for a failed write, by its cause."""
    if exc.errno == errno.EROFS:
        return "the file system is read-only: remount it read-write or write somewhere else"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space or write somewhere else; the previous file is intact"
    return "check free space and permissions"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def append_jsonl(path: str | Path, record: dict) -> None:
    """Add ``record`` to ``path`` as one JSON line; 0-d tensors become numbers and paths strings.

    The file is rewritten atomically, so a crash never leaves half a line.

    Example:
        >>> append_jsonl("out/metrics.jsonl", {"epoch": 1, "loss": 0.42})  # doctest: +SKIP
    """
    path = Path(path)
    try:
        old = path.read_bytes() if path.is_file() else b""
    except OSError as exc:
        raise ConfigError(f"could not read {path}: {exc}; {_write_advice(exc)}") from exc
    if old and not old.endswith(b"\n"):
        old += b"\n"  # never glue a record onto a line someone else left unfinished
    line = json_text(record).encode("utf-8") + b"\n"
    atomic_write(path, lambda f: f.write(old + line))


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], metadata: CheckpointMeta) -> None:
    """Write ``tensors`` and ``metadata`` to a safetensors checkpoint at ``path``, atomically.

    Tensors go to the CPU, contiguous, and tied weights are copied. ``metadata`` must pass the checks of a
    load (else :class:`CheckpointError`), so an unloadable checkpoint is never written.

    Example:
        >>> save_checkpoint("out/student.safetensors", model.state_dict(), meta)  # doctest: +SKIP
    """
    header = metadata.to_header(path)
    seen: set[int] = set()
    flat: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()  # safetensors refuses tensors that share memory
        seen.add(ptr)
        flat[name] = t.contiguous()
    data = safetensors.torch.save(flat, metadata=header)
    atomic_write(path, lambda f: f.write(data))


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", plain_hint: str | None = None
) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Read a cwkd checkpoint as ``(tensors, metadata)``, checking the file before using anything in it.

    ``plain_hint`` replaces the advice given when the file holds other weights (a ``.pth`` file, plain
    safetensors), where the caller knows the option that loads those.

    Example:
        >>> tensors, meta = load_checkpoint("out/student.safetensors")  # doctest: +SKIP
    """
    meta = read_metadata(path, plain_hint=plain_hint)
    return _load_safetensors(Path(path), device), meta


def read_metadata(path: str | Path, *, plain_hint: str | None = None) -> CheckpointMeta:
    """A cwkd checkpoint's checked metadata, from its header alone (no tensor is read)."""
    path = _existing_file(path)
    not_cwkd = f"not a cwkd checkpoint; {plain_hint}" if plain_hint else _NOT_CWKD
    raw = _read_header(path, other=not_cwkd).get("__metadata__")
    return CheckpointMeta.from_header(raw, path, not_cwkd)


def student_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's own weights from a run checkpoint's tensors (``student.*``, prefix dropped)."""
    return {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read model weights from ``.safetensors`` or ``.pth``/``.pt``/``.bin`` without running any code.

    Training-checkpoint wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ...) are unwrapped.

    Example:
        >>> state = read_state_dict("resnet18_teacher.pth")  # doctest: +SKIP
    """
    path = _existing_file(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        _read_header(path, other="it is not safetensors; rename it to .pth")
        return _load_safetensors(path, "cpu")
    if suffix not in (".pth", ".pt", ".bin"):
        raise CheckpointError(f"cannot read weights from {path}: use a .safetensors, .pth, .pt or .bin file")
    obj, wrapped = _torch_load(path), False
    for _ in range(3):  # wrappers nest a level or two at most: {"model": {"state_dict": ...}}
        key = next((k for k in _CONTAINER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), "")
        if not key:
            break
        obj, wrapped = obj[key], True
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    if wrapped:  # a training checkpoint may keep counters and such beside the weights
        obj = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path} is not a plain state dict: entry {bad[0]!r} is not a named tensor")
    if not obj:
        raise CheckpointError(f"{path} holds no tensors; is it the right file?")
    return obj


def save_state(path: str | Path, state: dict) -> None:
    """Write resumable training state (optimizer, scheduler, scaler, epoch, RNG) to ``path`` atomically.

    ``state`` must load under ``torch.load(weights_only=True)``: tensors, numbers, strings, ``None`` and
    lists, tuples and dicts of them. Optimizer, scheduler and GradScaler state dicts,
    ``torch.get_rng_state()`` and ``random.getstate()`` qualify as they are. ``numpy.random.get_state()``
    does not (it holds an array): store its keys as ``torch.from_numpy(keys.astype("int64"))``.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))


def load_state(path: str | Path) -> dict:
    """Read training state written by :func:`save_state`, onto the CPU and with ``weights_only=True``."""
    obj = _torch_load(_existing_file(path))
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not cwkd training state")
    return obj


def check_writable(directory: str | Path, *, min_free_bytes: int = 50 * 2**20, flag: str = "--output") -> None:
    """Create ``directory`` if needed; raise :class:`ConfigError` unless it takes files and has room.

    ``flag`` is the option the user named the directory with, for the message.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".cwkd-probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        msg = f"cannot write to {directory} ({exc}); fix its permissions or choose another {flag}"
        raise ConfigError(msg) from exc
    free = shutil.disk_usage(directory).free
    if free < min_free_bytes:
        raise ConfigError(
            f"only {free / 2**20:.0f} MiB free on the file system of {directory}, need at least "
            f"{min_free_bytes / 2**20:.0f} MiB; free some space or choose another {flag}"
        )


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is a directory, not a file; give the path of a checkpoint file")
    return path


def _read_header(path: Path, other: str = _NOT_CWKD) -> dict:
    """Parse a safetensors header, or raise :class:`CheckpointError` saying what the file is instead.

    ``other`` ends the message for a PyTorch file, where the fix depends on what the caller wanted.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        body = f.read(n) if 0 < n <= min(size - 8, _MAX_HEADER) else b""
    expected = "expected a .safetensors checkpoint written by cwkd"
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{path} is a PyTorch zip file (torch.save), {other}")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(f"{path} is a Python pickle (old torch.save), {other}")
    if size < 8:
        raise CheckpointError(f"{path} is empty or too short ({size} bytes) to be safetensors; {expected}")
    if size - 8 < n <= _MAX_HEADER:
        raise CheckpointError(f"{path} is truncated: its header needs {n + 8} bytes, the file has {size}")
    try:
        header = json.loads(body.decode("utf-8")) if body.startswith(b"{") else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (empty, unknown or corrupt); {expected}")
    try:
        tensors = [e for k, e in header.items() if k != "__metadata__"]
        end = 8 + n + max((int(e["data_offsets"][1]) for e in tensors), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path} has a corrupt safetensors header; {expected}") from None
    if end > size:
        raise CheckpointError(f"{path} is truncated: it has {size} bytes, its header promises {end}")
    return header


def _load_safetensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device=str(device))
    except Exception as exc:  # SafetensorError (corrupt file) or a device that does not exist
        raise CheckpointError(f"could not read tensors from {path}: {exc}") from exc


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; a pickle that wants to run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise CheckpointError(f"could not read {path}: {text}; the file is corrupt") from exc
        reason = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise CheckpointError(
            f"refused to load {path}: it is a pickle that would run code or build objects other than tensors"
            f"{f' ({reason})' if reason else ''}; convert it to safetensors or a plain state dict "
            "(torch.save(model.state_dict(), ...)) where you trust it"
        ) from exc
    except Exception as exc:  # truncated zip, garbage bytes, empty file: torch raises many kinds
        first = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else "no detail"
        msg = f"could not read {path} as a PyTorch file ({type(exc).__name__}: {first}); is it cut short?"
        raise CheckpointError(msg) from exc
