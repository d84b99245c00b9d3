"""What a signal does to a run: SIGINT, SIGTERM (what schedulers and `docker stop` send) and SIGHUP (the terminal
closed, the ssh connection dropped) ask it to stop at the next safe point, keeping every finished epoch; a second
signal exits at once, 128 + its number. A SIGHUP that `nohup` (or the parent) set to be ignored stays ignored: the
run was asked to outlive its terminal."""

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
    """SIGINT, SIGTERM and SIGHUP set a flag that the step loop checks; a second signal raises at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # nohup
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
