"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption):
the iteration under way finishes, a checkpoint is saved, and the trainer
exits 128 + the signal's number (130, 143), naming how to continue.

A signal only sets a flag: stopping inside an iteration (between the
backward and the SGD step, say) would leave nothing consistent to save. A
second signal stops at once, as a plain KeyboardInterrupt (the last saved
checkpoint stays the one to resume). Several processes agree to stop at the
same iteration (StopRequests.agreed).
"""
import contextlib
import signal
import threading
from typing import Optional

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal, after saving its checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """The first stop signal received while `installed()` (None: none)."""

    def __init__(self):
        self.signum: Optional[int] = None

    def request(self, signum: int) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, procs, due: bool) -> bool:
        """Whether to stop after this iteration. One process looks every
        iteration; several agree (one all-reduce) when `due` (every
        --log-every iterations), so that all stop after the same one."""
        if not procs.distributed:
            return self.signum is not None
        return due and procs.any_true(torch.tensor(self.signum is not None, device=procs.device))

    @contextlib.contextmanager
    def installed(self):
        """Catch SIGINT and SIGTERM inside (Python takes signals in the main
        thread only; elsewhere their default actions stay)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, lambda signum, frame: self.request(signum))
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
