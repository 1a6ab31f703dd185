"""Signals on the main thread, safely: wait in time.sleep, never inside a lock.

The CLI turns SIGTERM (and Python SIGINT) into KeyboardInterrupt. Raised while the main thread
waits in threading.Event.wait, it can land between the Condition's lock operations and leave
the lock half released: the process then dies of "RuntimeError: release unlocked lock", with a
traceback, instead of stopping cleanly (seen in CI on Ctrl-C of `sluice up`). time.sleep holds
no lock, so main-thread loops sleep and poll a flag; start-up runs with the signals held back.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# What a supervisor stops on: a closed terminal (SIGHUP) too, since its children, in sessions
# of their own, no longer get the terminal's signals.
SUPERVISOR_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Set in a supervised child's environment: the supervisor's pid (see die_with_supervisor).
SUPERVISOR_PID_ENV = "SLUICE_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


def sleep_until(done: Callable[[], bool], seconds: float) -> None:
    """Sleep up to `seconds`, waking early (within 50 ms) once `done()` is true; lock-free."""
    deadline = time.monotonic() + seconds
    while not done():
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


def request_stop_on_signals(request_stop: Callable[[], None]) -> None:
    """For a supervisor's main thread: the first SIGINT, SIGTERM or SIGHUP calls
    `request_stop` (which must only set a flag its loops poll); another one raises
    KeyboardInterrupt, to stop at once."""
    requested = False

    def handler(_sig: int, _frame: FrameType | None) -> None:
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True
        request_stop()

    for sig in SUPERVISOR_STOP_SIGNALS:
        signal.signal(sig, handler)


def die_with_supervisor() -> None:
    """In a supervised child (SUPERVISOR_PID_ENV set): get SIGTERM when the supervisor dies,
    even by SIGKILL, so nothing it started outlives it (Linux; elsewhere a no-op).

    Linux sends it when the *thread* that started the child ends, not only the process: a
    supervisor must start and restart children from a thread that lives as long as it does
    (`sluice up` uses its main thread; a test running supervise() in a thread sees the
    children it restarted stop when that thread returns)."""
    supervisor = os.environ.pop(SUPERVISOR_PID_ENV, None)
    if supervisor is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not permitted here: the supervisor's own stop still reaches this process
    if os.getppid() != int(supervisor):
        # The supervisor died before prctl took effect: stop as it would have told us to.
        os.kill(os.getpid(), signal.SIGTERM)
