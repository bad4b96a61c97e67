"""Stop signals: the first Ctrl-C (SIGINT), SIGTERM or SIGHUP asks a run to save and stop at its next step."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist


class StopSignals:
    """Turn the first SIGINT/SIGTERM/SIGHUP into a request to stop at the next step; a second SIGINT aborts.

    SIGHUP is what a run started over ssh gets when the connection drops: it saves and stops like SIGTERM.
    A second SIGINT during :meth:`saving` waits for the save: aborting there would leave ``last.safetensors``
    without the ``state.pt`` that makes it resumable.
    """

    #: Under DDP the ranks agree on the flag every this many reads (an all-reduce is a host sync).
    SYNC_EVERY = 10

    def __init__(self) -> None:
        self.signal_number = 0
        self._old: dict = {}
        self._reads = 0
        self._agreed = 0
        self._saving = False

    @property
    def requested(self) -> bool:
        """True once a signal arrived (on any rank under DDP: ranks agree, so DDP never hangs on a collective).

        One process reads its own flag, which costs nothing. Under DDP every rank reads the flag at the
        same steps, and each :attr:`SYNC_EVERY`-th read all-reduces it, so a stop comes at most that many
        steps late while a GPU step never waits on the host for it.
        """
        if not dist.is_initialized():
            return self.signal_number != 0
        self._reads += 1
        if not self._agreed and self._reads % self.SYNC_EVERY == 1:
            t = torch.tensor([self.signal_number], dtype=torch.int64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            self._agreed = int(t.item())
            self.signal_number = self.signal_number or self._agreed
        return self._agreed != 0

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Write a save's files: a second SIGINT meanwhile is held off, and the run then stops as the first asked."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def _handle(self, signum, _frame) -> None:
        if self.signal_number and signum == signal.SIGINT:
            if self._saving:
                return
            raise KeyboardInterrupt
        self.signal_number = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if sig is None:  # Windows has no SIGHUP
                    continue
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
