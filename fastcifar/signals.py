"""What a signal does to a run: SIGINT and SIGTERM (what schedulers and `docker stop` send) ask it to stop at the
next safe point, keeping every finished epoch; a second signal exits at once, 128 + its number."""

from __future__ import annotations

import signal
import sys
import threading

from fastcifar import FastCifarError


class RunInterrupted(FastCifarError):
    """A second signal, or one before the run could stop cleanly: exit at once, 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop:
    """SIGINT and SIGTERM (what schedulers and `docker stop` send) set a flag that the step loop checks; a second
    signal raises at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt(signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping at the next safe point, keeping every finished epoch "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)
