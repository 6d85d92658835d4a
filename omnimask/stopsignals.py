"""SIGTERM and SIGUSR2 (a scheduler's preemption notice) as a flag a training loop polls: it
stops at its next step boundary, saves a checkpoint and says so, instead of dying mid-step."""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
_received: list[str] = []  # every stop signal a StopSignals caught in this process


def received() -> str | None:
    """The last stop signal caught in this process (a job wrapper asks after training)."""
    return _received[-1] if _received else None


class StopSignals:
    """Catch the stop signals until ``restore()``; ``signal`` is the name of the first one
    received (``"SIGTERM"``), else None. Outside the main thread nothing is caught."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict = {}
        for s in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: cannot catch here
                self._old[s] = signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal = self.signal or signal.Signals(signum).name
        _received.append(signal.Signals(signum).name)

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}
