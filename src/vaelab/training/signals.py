"""SIGTERM (what a job scheduler sends on preemption) and SIGINT (Ctrl-C) during training: the
handler only records the signal; the loop reads it at the next step boundary, where every process
agrees to stop (one collective, so DDP stays in step), rank 0 writes a checkpoint, and training
raises :class:`~vaelab.errors.Interrupted` (exit code 128 + the signal: 143, 130).

Signals arriving after the first are recorded too and change nothing: torchrun and Slurm pass a
scheduler's SIGTERM on to every worker, so a worker often gets it twice, and the checkpoint being
written must still be written. SIGKILL stops a process at once; the checkpoints on disk stay intact
(atomic writes). Python runs signal handlers in the main thread only, so elsewhere nothing is
installed and signals keep their previous behaviour.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """A context manager: while it is active, SIGTERM and SIGINT set :attr:`signum` (the first one
    received) instead of ending the process; the previous handlers come back on exit."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce  # say at once that the signal was received (rank 0)
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if self.announce:  # os.write: a signal may arrive while Python is inside a print to stderr
            msg = (f"vaelab: {signal.Signals(signum).name} received: stopping after this step, "
                   "once the checkpoint is written\n")
            try:
                os.write(2, (("\n" if os.isatty(2) else "") + msg).encode())  # past a progress bar
            except OSError:
                pass

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default is the nearest
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
