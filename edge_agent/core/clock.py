"""Wall-clock steps, noticed (pure: the two clocks are passed in).

Every duration the agent measures runs on the monotonic clock, which NTP never steps; the
wall clock is read only where the protocol speaks of absolute times (a job's `deadline`,
telemetry's `ts`). A Raspberry Pi has no real-time clock: it boots with the time of its
last shutdown, or 1970, until NTP steps the clock, possibly minutes after the agent
started. `StepWatch` notices such a step (the two clocks drifting apart at once) so it is
logged and counted; nothing else needs to react to it.
"""

from __future__ import annotations

from collections.abc import Callable

# Larger than any slew NTP does between two looks a second apart, far smaller than a step.
STEP_THRESHOLD_S = 2.0


class StepWatch:
    """Compares the wall clock with the monotonic clock at every `check()`."""

    def __init__(
        self,
        wall: Callable[[], float],
        mono: Callable[[], float],
        threshold_s: float = STEP_THRESHOLD_S,
    ) -> None:
        self._wall = wall
        self._mono = mono
        self.threshold_s = threshold_s
        self._offset = wall() - mono()

    def check(self) -> float | None:
        """The seconds the wall clock stepped since the last check (negative: backward),
        or None when it did not."""
        offset = self._wall() - self._mono()
        step = offset - self._offset
        self._offset = offset
        return step if abs(step) >= self.threshold_s else None
