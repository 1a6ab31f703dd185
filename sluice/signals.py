"""Signals on the main thread, safely: wait in time.sleep, never inside a lock.

The CLI turns SIGTERM (and Python SIGINT) into KeyboardInterrupt. Raised while the main thread
waits in threading.Event.wait, it can land between the Condition's lock operations and leave
the lock half released: the process then dies of "RuntimeError: release unlocked lock", with a
traceback, instead of stopping cleanly (seen in CI on Ctrl-C of `sluice up`). time.sleep holds
no lock, so main-thread loops sleep and poll a flag; start-up runs with the signals held back.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (threads start, locks are taken); deliver them after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        # A signal that came meanwhile is handled here, as this call returns.
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def sleep_until(flag: threading.Event, seconds: float) -> None:
    """Sleep up to `seconds`, waking early (within 50 ms) once `flag` is set; lock-free."""
    deadline = time.monotonic() + seconds
    while not flag.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def interrupt_once() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt the first time, and are ignored after: a
    second one (the supervisor's SIGTERM after the terminal's SIGINT) must not interrupt the
    cleanup the first one started (SIGKILL stays the hard stop)."""
    if threading.current_thread() is not threading.main_thread():
        return
    stopping = threading.Event()

    def handler(_sig: int, _frame: FrameType | None) -> None:
        if not stopping.is_set():
            stopping.set()
            raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
