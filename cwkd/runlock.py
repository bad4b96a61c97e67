"""An exclusive lock on a run directory, held for the whole life of a train, distill or resume.

Two processes writing one run would interleave metrics lines and checkpoints, so the second one
is refused with the holder's pid. The lock is an advisory ``flock`` on ``RUN_DIR/.lock``: the
kernel drops it when its holder exits, even after SIGKILL, so a ``.lock`` file that a killed run
left behind never blocks the next one.
"""

from __future__ import annotations

import os
from pathlib import Path

from cwkd.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


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
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConfigError(
                    f"{self.path.parent} is in use by another cwkd process (pid {holder}); wait for it to end "
                    "or stop it, or choose another --out"
                ) from None
            if _same_file(fd, self.path):  # not a file that a releasing holder unlinked meanwhile
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (unlink first, so no one locks a file about to go)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
