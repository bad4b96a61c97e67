"""An exclusive lock on a run directory, held for the whole life of a train, distill or resume.

Two processes writing one run would interleave metrics lines and checkpoints, so the second one
is refused with the holder's pid. The lock is an advisory ``flock`` on ``RUN_DIR/.lock``: the
kernel drops it when the last descriptor of it closes, even after SIGKILL, so a ``.lock`` file that a
killed run left behind never blocks the next one.

A ``flock`` belongs to the open file, which a ``fork`` shares: DataLoader workers (forked, never
exec'd) would keep a killed run's lock until they notice their parent is gone (about 5 s). So every
forked child closes its copy at once (``os.register_at_fork``), and the lock dies with the process
that took it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from cwkd.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
#: How long to wait for a lock whose recorded holder has died (a child it forked may still hold it).
ORPHAN_WAIT_S = 10.0

_held: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    """In a forked child: close the inherited lock descriptors (closing, unlike LOCK_UN, keeps the parent's lock)."""
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """``with RunLock(out):`` holds ``out/.lock`` (once :meth:`acquire` ran) until the block ends.

    :meth:`acquire` may be called again; it is a no-op while the lock is held. ``enabled=False``
    (a DDP rank other than 0, which writes nothing) makes every call a no-op.

    Example:
        >>> with RunLock(Path("runs/r")) as lock:  # doctest: +SKIP
        ...     lock.acquire()  # error: runs/r is in use by another cwkd process (pid 4242); ...
    """

    def __init__(self, out: Path, *, enabled: bool = True) -> None:
        self.path, self.enabled = Path(out) / LOCK_NAME, enabled and fcntl is not None
        self._fd: int | None = None
        self._pid = 0  # the process that took the lock: a forked child never releases it

    def acquire(self) -> None:
        """Take the lock (the directory must exist), or raise :class:`ConfigError` naming the holder."""
        if not self.enabled or self._fd is not None:
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ConfigError(f"cannot write to {self.path.parent} ({exc}); fix its permissions or choose "
                                  "another --out") from exc
            try:
                _lock_or_wait_for_orphans(fd, self.path.parent)
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):  # not a file that a releasing holder unlinked meanwhile
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd, self._pid = fd, os.getpid()
        _held.add(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (unlink first, so no one locks a file about to go).

        A folder that became unwritable keeps its ``.lock`` file, which blocks no one once the lock is dropped;
        the error that stopped the run is the one to report.
        """
        if self._fd is None or self._pid != os.getpid():  # not held, or a forked child's copy
            return
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        _held.discard(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_or_wait_for_orphans(fd: int, where: Path) -> None:
    """``flock`` ``fd``, or raise :class:`ConfigError` naming a live holder.

    A holder recorded in the file that is no longer alive left the lock to a process it started (one
    that did not close it at fork, such as a C library's child): wait up to :data:`ORPHAN_WAIT_S` for
    that process to end, and never name the dead pid as the one in the way.
    """
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            os.lseek(fd, 0, os.SEEK_SET)
            holder = os.read(fd, 32).decode(errors="replace").strip()
        if _alive(holder):
            raise ConfigError(f"{where} is in use by another cwkd process (pid {holder or 'unknown'}); wait for it "
                              "to end or stop it, or choose another --out")
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{where} is still locked by a process left over from a cwkd run whose main process (pid "
                f"{holder}) has ended; stop that process (`fuser -v {where}/{LOCK_NAME}` "
                "names it), or choose another --out")
        time.sleep(0.1)


def _alive(pid: str) -> bool:
    """Whether ``pid`` (as the lock file records it) is a running process; a pid not written yet counts as alive."""
    if not pid.isdigit():
        return True  # empty: the holder took the lock and is about to write its pid
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
