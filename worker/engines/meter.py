"""Slot occupancy: how full an engine was kept, measured on the wall clock.

Definition: over a window that starts at the first add() (or reset()) and ends at the end of
the last step that did work,

    occupancy = busy_slot_seconds / (slots * elapsed)

where busy_slot_seconds sums, over steps, sequences running in the step x step duration.
Time between steps (the engine was empty, or the worker did not call step()) adds to elapsed
but not to busy, so starving the engine shows up as lost occupancy. Time after the last step
is not counted, so reading the meter late does not dilute it.
"""

from __future__ import annotations

import threading
import time


class OccupancyMeter:
    """Integrates busy slots over wall time between an engine's steps."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._lock = threading.Lock()  # snapshot() may run on a metrics thread
        self._start: float | None = None
        self._end: float | None = None
        self._busy_slot_seconds = 0.0
        self._steps = 0
        self._tokens = 0

    def reset(self) -> None:
        """Start a new window; it opens at the next add (or step)."""
        with self._lock:
            self._start = None
            self._end = None
            self._busy_slot_seconds = 0.0
            self._steps = 0
            self._tokens = 0

    def mark_add(self, now: float | None = None) -> None:
        """Note that work arrived; opens the window if it is not open yet."""
        with self._lock:
            if self._start is None:
                self._start = time.monotonic() if now is None else now

    def record_step(self, start: float, end: float, busy: int, tokens: int) -> None:
        """Account one step that ran `busy` sequences from `start` to `end` (monotonic)."""
        with self._lock:
            if self._start is None or start < self._start:
                self._start = start
            self._end = end if self._end is None else max(self._end, end)
            self._busy_slot_seconds += busy * max(0.0, end - start)
            self._steps += 1
            self._tokens += tokens

    def snapshot(self) -> dict[str, float]:
        """Window totals: busy_slot_seconds, slot_seconds, steps, tokens."""
        with self._lock:
            elapsed = 0.0
            if self._start is not None and self._end is not None:
                elapsed = max(0.0, self._end - self._start)
            return {
                "busy_slot_seconds": self._busy_slot_seconds,
                "slot_seconds": self.slots * elapsed,
                "steps": float(self._steps),
                "tokens": float(self._tokens),
            }

    def occupancy(self) -> float:
        """Busy-slot-seconds over slot-seconds in the window (0.0 before any step)."""
        snap = self.snapshot()
        if snap["slot_seconds"] <= 0:
            return 0.0
        return min(1.0, snap["busy_slot_seconds"] / snap["slot_seconds"])
