"""SIGTERM and SIGINT as a request to stop at the next safe point, not in the middle of a write.

The aggregator stops between steps (a checkpoint or run record is written whole, and its run stays
resumable by the same command); a silo stops between tasks (a ledger entry, upload or report is
complete). A second signal stops at once, for an operator who will not wait."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from fcmoe.logs import log_event

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installed with ``with StopRequest() as stop:``; ``stop.event`` is set by the first signal."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process stopped by a signal: 128 + its number."""
        return 128 + int(self.signal) if self.signal is not None else 0

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.event.is_set():  # asked twice: stop now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signal = signal.Signals(signum)
        self.event.set()
        log_event(log, "stopping", level=logging.WARNING, signal=self.signal.name,
                  reason="finishing the current step; send it again to stop at once")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
