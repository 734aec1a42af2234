"""Noticing wall-clock steps (core/clock.py) with made-up clocks, and health conditions that
degrade without being fatal (service/health.py)."""

from __future__ import annotations

from edge_agent.core.clock import StepWatch
from edge_agent.service.health import Health


class Clocks:
    def __init__(self) -> None:
        self.wall, self.mono = 1_000_000.0, 50.0

    def tick(self, seconds: float = 1.0, step: float = 0.0) -> None:
        self.mono += seconds
        self.wall += seconds + step


def test_a_step_of_the_wall_clock_is_noticed_forward_and_back() -> None:
    c = Clocks()
    watch = StepWatch(lambda: c.wall, lambda: c.mono)
    c.tick()
    assert watch.check() is None  # time passing is no step
    c.tick(step=0.3)
    assert watch.check() is None  # NTP slewing a little
    c.tick(step=86400)
    assert watch.check() == 86400
    c.tick(step=-2 * 86400)
    assert watch.check() == -2 * 86400
    c.tick()
    assert watch.check() is None


def test_a_condition_degrades_health_with_its_reason_but_is_not_fatal() -> None:
    health = Health()
    why: list[str | None] = [None]
    health.watch("journal", lambda: why[0])
    assert health.report().ok
    why[0] = "journal cannot be written (disk full)"
    report = health.report()
    assert (report.state, report.reasons, report.fatal) == ("degraded", (why[0],), False)
    assert health.degraded_for() == 0.0  # nothing to restart for


def test_a_check_that_raises_is_reported_not_raised() -> None:
    health = Health()

    def broken() -> str | None:
        raise RuntimeError("boom")

    health.watch("broken", broken)
    report = health.report()
    assert not report.ok and "broken: cannot tell" in report.reasons[0]
