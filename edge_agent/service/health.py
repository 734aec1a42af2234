"""Whether the agent's long-lived threads are alive and making progress.

Each thread (intake, inference, outbox, telemetry, ...) gets a `Beat` and reports on it:
`busy()` when it takes an item, `progress()` while a long item advances, `idle()` when
done, `error()` when one item failed (the thread goes on). `supervised()` runs a thread's
loop and records its death if anything escapes it. `Health.report()` turns the beats into
`ok`, or `degraded` with the reasons: a thread that died, or one busy with a single item
for longer than its limit. Those are *fatal*: they stop the systemd watchdog and, outside
systemd, end the process with a non-zero status, so whatever supervises it starts it
again. Conditions (`watch`) degrade health too, with their reason, but are not fatal: a
restart would not cure a full disk, a greedy requester or a failing telemetry publish, and
the agent goes on serving what it can.

No I/O here: the clock is passed in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("edge_agent.health")

OK = "ok"
DEGRADED = "degraded"


@dataclass(frozen=True)
class Report:
    state: str  # "ok" | "degraded"
    reasons: tuple[str, ...] = ()
    fatal: bool = False  # a thread died or stalled: only a restart helps

    @property
    def ok(self) -> bool:
        return self.state == OK

    def to_dict(self) -> dict[str, object]:
        return {"state": self.state, "reasons": list(self.reasons)}


class Beat:
    """One thread's heartbeat."""

    def __init__(self, name: str, stall_after_s: float, clock: Callable[[], float]) -> None:
        self.name = name
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None  # busy since (last progress)
        self.errors = 0
        self.died: str | None = None
        self.thread: threading.Thread | None = None
        self.stopped = False  # ended on purpose (shutdown)

    def busy(self) -> None:
        with self._lock:
            self._since = self._clock()

    progress = busy  # a long item moved on: its stall clock starts again

    def idle(self) -> None:
        with self._lock:
            self._since = None

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def stalled_for(self) -> float:
        """Seconds busy with one item without progress; 0 when idle."""
        with self._lock:
            since = self._since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def problem(self) -> str | None:
        if self.died is not None:
            return f"{self.name} thread died: {self.died}"
        if self.thread is not None and not self.thread.is_alive() and not self.stopped:
            return f"{self.name} thread ended"
        stalled = self.stalled_for()
        if stalled > self.stall_after_s:
            return f"{self.name} thread stalled for {stalled:.0f} s"
        return None


class Health:
    """The beats of every supervised thread, and the verdict."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._beats: dict[str, Beat] = {}
        self._checks: dict[str, Callable[[], str | None]] = {}
        self._lock = threading.Lock()
        self._degraded_since: float | None = None
        self._fatal_since: float | None = None

    def beat(self, name: str, stall_after_s: float = 120.0) -> Beat:
        with self._lock:
            beat = self._beats.get(name)
            if beat is None:
                beat = self._beats[name] = Beat(name, stall_after_s, self._clock)
            return beat

    def watch(self, name: str, check: Callable[[], str | None]) -> None:
        """A condition: `check()` returns why health is degraded now, or None. Not fatal."""
        with self._lock:
            self._checks[name] = check

    def report(self) -> Report:
        with self._lock:
            beats = list(self._beats.values())
            checks = list(self._checks.items())
        fatal = tuple(p for p in (b.problem() for b in beats) if p is not None)
        conditions: list[str] = []
        for name, check in checks:
            try:
                found = check()
            except Exception as exc:  # noqa: BLE001 - a check must never break the report
                found = f"{name}: cannot tell ({exc!r})"
            if found:
                conditions.append(found)
        reasons = (*fatal, *conditions)
        now = self._clock()
        self._fatal_since = (self._fatal_since or now) if fatal else None
        if not reasons:
            self._degraded_since = None
            return Report(OK)
        if self._degraded_since is None:
            self._degraded_since = now
            log.error("health.degraded", reasons=list(reasons))
        return Report(DEGRADED, reasons, fatal=bool(fatal))

    def degraded_for(self) -> float:
        """Seconds a thread has been dead or stalled (fatal); 0 when none is."""
        since = self._fatal_since
        return 0.0 if since is None else self._clock() - since

    def errors(self) -> dict[str, int]:
        with self._lock:
            return {name: b.errors for name, b in self._beats.items() if b.errors}


def supervised(beat: Beat, loop: Callable[[], None], name: str | None = None) -> threading.Thread:
    """A daemon thread running `loop` (which handles its own per-item errors); whatever
    escapes it is logged and recorded as the thread's death."""

    def run() -> None:
        try:
            loop()
        except BaseException as exc:
            beat.died = f"{type(exc).__name__}: {exc}"
            log.critical("thread.died", thread=beat.name, error=beat.died, exc_info=True)
            return
        beat.stopped = True

    thread = threading.Thread(target=run, name=name or beat.name, daemon=True)
    beat.thread = thread
    return thread


def loop_thread(name: str, beat: Beat | None, loop: Callable[[], None]) -> threading.Thread:
    """A started thread running `loop`: supervised under the agent (it has a beat), a plain
    daemon thread in tests that build the stage alone."""
    thread = (
        supervised(beat, loop, name=name)
        if beat is not None
        else threading.Thread(target=loop, name=name, daemon=True)
    )
    thread.start()
    return thread
