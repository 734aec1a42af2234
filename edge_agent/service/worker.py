"""The job queue and the scheduler: the one inference thread, running up to N jobs at once.

Fair shares (core/fairness.py, docs/delivery.md): while more than one requester uses the
agent, each may hold only its share of the jobs the broker lets the agent hold (more are
answered `overloaded`), takes another slot only if one stays free for each other active
requester that runs nothing, and a free slot goes to the requester running the fewest
jobs, then the one served longest ago; within a requester, by priority, aged so that a
lower priority waits a bounded time. A preempted job goes to the back of the queue.

Jobs come from the intake stage (`intake.Intake`, its own thread) through `offer()`, which
queues them or answers at once (queue full, an id already held). The thread named
"inference" keeps up to `parallel` jobs in flight: it starts the most urgent queued jobs
while there is room (checking their deadlines), then advances every running job by one
engine step (one llama.cpp decode for all of them: continuous batching), and answers each
job as it ends, cancelled or expired ones between steps, without touching the others. The
reply goes to the outbox, which stores and publishes it and only then acknowledges the
job's MQTT message. The thread is supervised: a failing job is answered `failed` and the
loop goes on; if the thread itself dies, health turns degraded (`health.py`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

from edge_agent.adapters.journal import RunningMarker
from edge_agent.adapters.log import bind_job
from edge_agent.core.errors import Code, EdgeAgentError, EngineError, JobError
from edge_agent.core.fairness import (
    Runner,
    Waiting,
    fair_slots,
    held_share,
    pick,
    saturating,
)
from edge_agent.core.fairness import victim as fair_victim
from edge_agent.core.inference import ContextFull, Interrupted, Task
from edge_agent.core.metrics import Metrics
from edge_agent.core.protocol import (
    Job,
    Reply,
    ReplyRoute,
    Status,
    Topics,
    rejection,
)
from edge_agent.core.slots import Slots
from edge_agent.core.wire import ModelRef, ReplyTimings
from edge_agent.service.faults import Faults
from edge_agent.service.health import Beat, Health, supervised
from edge_agent.service.outbox import Handoff, Memo
from edge_agent.service.runner import JobRunner

log = structlog.get_logger("edge_agent.worker")

# A ticket's task while the scheduler starts it (admitted, engine task not made yet).
_STARTING = Task()
# How long health stays degraded after a requester saturated the engine or a job exceeded
# its cost bound (seconds).
HOLD_S = 30.0
# What a stopping worker's thread is given beyond the grace to drop its jobs and end (one
# engine step).
ABANDON_S = 5.0
# For held shares, a requester counts while it holds jobs and this long after its last one
# came or ended (slots are kept for it much longer: fair_window_s).
SHARE_MEMORY_S = 1.0
# The least retry_after_ms of a job refused for its requester's share.
SHARE_RETRY_MS = 1000

Ack = Callable[[], None]


class ReplySink(Protocol):
    def deliver(self, reply: Reply, acks: Ack | list[Ack], memo: Memo | None = None) -> None:
        """Make the final reply durable, acknowledge the job, publish the reply."""

    def notify(self, reply: Reply) -> None:
        """Publish a progress message (accepted/running); best effort."""

    def hand_back(self, job: Handoff, ack: Ack, undo: Callable[[], None]) -> None:
        """Give a fleet job back to the fleet topic; `undo` runs if that fails."""

    def uncommitted(self, key: str) -> bool:
        """A remembered reply with this key is on its way to the journal."""


@dataclass(eq=False)
class Ticket:
    job: Job
    ack: Ack
    order: int
    key: str | None = None  # dedup key in the journal
    digest: str | None = None  # the job payload's digest
    cancelled: bool = False
    interrupt: str | None = None  # why a running job should stop: "cancelled" | "expired"
    extra_acks: list[Ack] = field(default_factory=list)
    # Further requests for this same job that arrived while it was held (a requester's
    # retry with new Correlation Data, another requester): each gets the reply too, and
    # its delivery is acknowledged when that reply is safe.
    riders: list[tuple[ReplyRoute, Ack]] = field(default_factory=list)

    task: Task | None = None  # its engine task while it runs
    started: float = 0.0  # when it started running (clock), for queue_ms
    t0: float = 0.0  # perf_counter at the start
    queued_at: float = 0.0  # when it joined the queue (clock; again after a preemption)

    def waiting(self) -> Waiting:
        job = self.job
        return Waiting(job.requester, job.priority, self.queued_at, job.deadline, self.order)

    def running(self) -> Runner:
        return Runner(self.job.requester, self.job.priority, self.order)

    def sort_key(self) -> tuple[int, float, int]:
        deadline = self.job.deadline if self.job.deadline is not None else float("inf")
        return (-self.job.priority, deadline, self.order)

    def __lt__(self, other: Ticket) -> bool:
        return self.sort_key() < other.sort_key()


class Worker:
    """Bounded priority queue + the scheduler thread: the one owner of how many jobs run
    (`slots`, up to the engine's capacity), which one is preempted and which waiting job
    joins; the engine only steps what it is given."""

    def __init__(
        self,
        runner: JobRunner,
        outbox: ReplySink,
        metrics: Metrics,
        *,
        topics: Topics,
        model: ModelRef,
        max_queue: int,
        suspects: set[str] | None = None,
        beat: Beat | None = None,
        marker: RunningMarker | None = None,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.monotonic,
        window: int | None = None,
        fair_window_s: float = 30.0,
        aging_s: float = 5.0,
    ) -> None:
        self.runner = runner
        self.outbox = outbox
        self.metrics = metrics
        self.topics = topics
        self.model = model
        self.max_queue = max_queue
        self.clock = clock
        self.marker = marker
        self.faults = faults or Faults()
        self.beat: Beat = beat or Health().beat("inference", stall_after_s=60.0)
        self._waiting: list[Ticket] = []  # queued, in no order: `fairness.pick` chooses
        self._by_id: dict[str, Ticket] = {}
        # How many jobs run at once: the engine's capacity, fewer after a preemption.
        self.slots = Slots(runner.engine.capacity)
        # Fair shares: the jobs the broker lets this agent hold at once (Receive Maximum),
        # how long a requester stays active after its last job, and how fast a queued job's
        # priority rises.
        self.window = window or (self.slots.parallel + max_queue)
        self.fair_window_s = fair_window_s
        self.aging_s = aging_s
        # requester -> the last arrival or end of one of its jobs (clock)
        self._seen: dict[str, float] = {}
        self._last_started: dict[str, float] = {}  # requester -> its last job's start
        self._saturated: tuple[str, float] | None = None  # (why, until) for health
        self._exceeded: tuple[str, float] | None = None
        # Digests of jobs that were running together when the last process died: each runs
        # alone, so a job that crashes the agent again is known for sure (RunningMarker).
        self.suspects = set(suspects or ())
        self._active: list[Ticket] = []  # running now, most urgent first
        self._cond = threading.Condition()
        self._order = 0
        self._closing = False
        self._paused = False  # a model swap waits for the running jobs: start none
        self._abandon_at = float("inf")  # past it, a stopping worker drops running jobs
        self._thread: threading.Thread | None = None
        self._marked: list[tuple[str, str]] = []

    # ---- taking jobs (the intake's thread) ----------------------------------------------

    def admit(self, job: Job, ack: Ack, key: str | None, digest: str | None) -> str:
        """Where a job with this id is, checked in one step against the worker finishing
        it: "held" (queued or running here: this delivery joined it, see `_join`),
        "answering" (its reply to remember was just handed to the outbox and is not in the
        journal yet: look again shortly), or "absent" (look in the journal, then offer)."""
        with self._cond:
            current = self._by_id.get(job.id)
            if current is not None:
                self._join(current, job, ack, digest)
                return "held"
            if key is not None and self.outbox.uncommitted(key):
                return "answering"
            return "absent"

    def _join(self, current: Ticket, job: Job, ack: Ack, digest: str | None) -> None:
        """A job arrived with the id of one this agent holds (under self._cond). The same
        request again is a broker redelivery (e.g. after a reconnect): answered once, both
        deliveries acknowledged then. The same job from another request rides along and
        gets the same reply. A different job under that id is rejected: two answers
        under one id could not be told apart."""
        same_job = digest is None or current.digest is None or digest == current.digest
        if same_job and job.route == current.job.route:
            current.extra_acks.append(ack)
            self.metrics.bump("duplicate_deliveries")
            log.info("job.duplicate_in_flight", job_id=job.id)
            return
        if same_job:
            current.riders.append((job.route, ack))
            self.metrics.bump("duplicate_jobs")
            log.info("job.joined_in_flight", job_id=job.id, reply_topic=job.route.topic)
            return
        error = JobError(
            Code.DUPLICATE_ID,
            f"a different job with id {job.id!r} is already queued or running on this device;"
            " use unique ids, or send it again once that one is answered",
        )
        self.metrics.count("rejected")
        log.warning("job.rejected", job_id=job.id, code=str(error.code), reason=error.message)
        self.outbox.deliver(rejection(job.route, self.topics.device_id, error), ack)

    def offer(self, job: Job, ack: Ack, key: str | None = None, digest: str | None = None) -> None:
        with self._cond:
            if self._closing:
                return  # not acknowledged: the broker redelivers it after restart
            current = self._by_id.get(job.id)
            if current is not None:
                self._join(current, job, ack, digest)
                return
            now = self.clock()
            self._note_seen(job.requester, now)
            if self.waiting >= self.max_queue:
                self._overloaded(job, ack, f"queue is full ({self.max_queue} jobs waiting)")
                return
            over = self._over_share(job.requester, now)
            if over is not None:
                self.metrics.bump("fair_share_refused")
                self._overloaded(job, ack, over, self.share_retry_after_ms())
                return
            if job.progress:  # before the queue, so `accepted` always precedes `running`
                self.outbox.notify(self._status(job, Status.ACCEPTED))
            self._order += 1
            ticket = Ticket(
                job=job, ack=ack, order=self._order, key=key, digest=digest, queued_at=now
            )
            self._waiting.append(ticket)
            self._by_id[job.id] = ticket
            self._cond.notify()
        log.debug("job.queued", job_id=job.id, kind=job.kind, priority=job.priority)

    def over_share(self, requester: str, job_id: str | None) -> str | None:
        """Why a new job of `requester` would be refused for its fair share now, or None
        (also None for a job this agent holds: a redelivery joins it). The intake asks
        before it reads a job whole, so a greedy requester's excess costs little."""
        with self._cond:
            if job_id is not None and job_id in self._by_id:
                return None
            now = self.clock()
            self._note_seen(requester, now)
            return self._over_share(requester, now)

    def _over_share(self, requester: str, now: float) -> str | None:
        # Only requesters that hold jobs, or held one a moment ago (a sensor sending one
        # job after the other), count here: refusing a job for a share kept for someone
        # who is done would turn two sensors' bursts into `overloaded` answers.
        active = self._active_requesters(now, SHARE_MEMORY_S) | {requester}
        if len(active) < 2:
            return None
        held = sum(1 for t in self._by_id.values() if t.job.requester == requester)
        if held < held_share(self.window, len(active)):
            return None
        return (
            f"this requester holds {held} jobs here, its share while {len(active)} "
            f"requesters use this agent ({requester})"
        )

    def _overloaded(self, job: Job, ack: Ack, why: str, retry_after_ms: int | None = None) -> None:
        """Refuse a job for want of room (under self._cond): `overloaded`, with when to
        try again."""
        error = JobError(Code.OVERLOADED, why)
        self.metrics.count("rejected")
        log.warning("job.rejected", job_id=job.id, code="overloaded", reason=error.message)
        retry = retry_after_ms if retry_after_ms is not None else self.retry_after_ms()
        reply = rejection(job.route, self.topics.device_id, error, retry_after_ms=retry)
        self.outbox.deliver(reply, ack)

    def _note_seen(self, requester: str, now: float) -> None:
        """A job of `requester` arrived (under self._cond); requesters long gone are
        forgotten, so the table stays small whatever the topics."""
        self._seen[requester] = now
        if len(self._seen) > 256:
            horizon = now - self.fair_window_s
            for name in [r for r, at in self._seen.items() if at < horizon]:
                del self._seen[name]
                self._last_started.pop(name, None)
            while len(self._seen) > 4096:  # all recent: keep the newest
                oldest = min(self._seen, key=self._seen.__getitem__)
                del self._seen[oldest]
                self._last_started.pop(oldest, None)

    def _active_requesters(self, now: float, memory_s: float | None = None) -> set[str]:
        """Requesters holding jobs here, or whose last job came or ended within
        `memory_s` (default fair_window_s)."""
        active = {t.job.requester for t in self._by_id.values()}
        horizon = now - (self.fair_window_s if memory_s is None else memory_s)
        active.update(r for r, at in self._seen.items() if at >= horizon)
        return active

    def condition(self) -> str | None:
        """Why health is degraded by the scheduler now, if it is: one requester saturating
        the engine while others wait, or a job that exceeded its cost bound (each shown
        for HOLD_S after it was last seen)."""
        now = self.clock()
        found = [s[0] for s in (self._saturated, self._exceeded) if s is not None and now < s[1]]
        return "; ".join(found) or None

    def cancel(self, job_id: str, reply_topic: str) -> bool:
        """Cancel a queued or running job; True if this agent had it. The cancel must name
        the job's reply topic too (its key), so a client that only learned an id cannot
        cancel another requester's job."""
        with self._cond:
            ticket = self._by_id.get(job_id)
            if ticket is None or ticket.job.route.topic != reply_topic:
                return False
            if ticket.task is not None:  # running: the scheduler stops it before its next step
                ticket.interrupt = "cancelled"
                return True
            ticket.cancelled = True
            self._finish(
                ticket,
                self._status(
                    ticket.job, Status.CANCELLED, Code.CANCELLED, "cancelled while queued"
                ),
            )
        log.info("job.cancelled", job_id=job_id, while_="queued")
        self.metrics.count("cancelled")
        return True

    def cancel_all(self, why: str) -> tuple[int, int]:
        """Cancel every queued and running job (operation `cancel`): queued ones are
        answered `cancelled` now, running ones before their next step. (queued, running)."""
        with self._cond:
            queued = [t for t in self._waiting if not t.cancelled]
            running = [t for t in self._active if t.interrupt is None]
            for ticket in running:
                ticket.interrupt = "cancelled"
            for ticket in queued:
                ticket.cancelled = True
                self._finish(
                    ticket, self._status(ticket.job, Status.CANCELLED, Code.CANCELLED, why)
                )
            self._cond.notify_all()
        for ticket in queued:
            log.info("job.cancelled", job_id=ticket.job.id, while_="queued", reason=why)
            self.metrics.count("cancelled")
        return len(queued), len(running)

    def pause(self, timeout: float) -> bool:
        """Start no job and wait until none runs (a model swap; at most `timeout` s).
        Queued jobs wait, none is lost. False (and not paused) if jobs still ran."""
        deadline = self.clock() + timeout
        with self._cond:
            self._paused = True
            while self._active and self.clock() < deadline:
                self._cond.wait(0.05)
            if self._active:
                self._paused = False
                self._cond.notify_all()
                return False
            return True

    def resume(self, model: ModelRef | None = None) -> None:
        """Start jobs again (on the runner's engine now), answering as `model` if given."""
        with self._cond:
            if model is not None:
                self.model = model
            self.slots.resize(self.runner.engine.capacity)  # the engine may be another
            self._paused = False
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._by_id)

    @property
    def waiting(self) -> int:
        """Jobs queued behind the running ones (call under self._cond or accept a race)."""
        return len(self._by_id) - len(self._active)

    def busy(self) -> tuple[bool, int]:
        """(a job is running, jobs waiting for a slot), for hand-back. Running, not every
        slot taken: a fleet job that joins a batch shares this board's cores with the
        others, while an idle member would run it alone. Measured: with 4 slots counted
        as free, a member slowed 5x kept its third of the jobs (tests/test_chaos.py);
        where every member is busy the jobs come back and hand-back pauses, so bursts
        still batch."""
        with self._cond:
            return bool(self._active), self.waiting

    def share_retry_after_ms(self) -> int:
        """When a requester refused for its share may try again: once one of its jobs could
        have ended, and not sooner than SHARE_RETRY_MS (a greedy requester that retries at
        once spends the others' time on refusals)."""
        return max(SHARE_RETRY_MS, self.retry_after_ms())

    def retry_after_ms(self) -> int:
        """When a refused job could find room: the jobs ahead of it, `parallel` at a time,
        at the recent median latency each."""
        p50 = self.metrics.snapshot()["latency_ms_p50"] or 1000.0
        rounds = -(-max(1, len(self._by_id)) // self.slots.parallel)
        return int(p50 * rounds)

    # ---- the inference thread --------------------------------------------------------

    def start(self) -> None:
        self._thread = supervised(self.beat, self._loop)
        self._thread.start()

    def stop(self, grace: float = 30.0) -> None:
        """Stop taking jobs; let the running ones finish for up to `grace` seconds, then
        stop them, unanswered and unacknowledged: the broker delivers them again after the
        restart and they run then. A clean stop is not a crash: the running marker is
        cleared, so they do not count toward poison (delivery.md)."""
        with self._cond:
            self._closing = True
            self._abandon_at = self.clock() + grace
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(grace + ABANDON_S)

    def _admit(self) -> list[Ticket] | None:
        """Take the queued jobs that can start now (most urgent first) while a slot is
        free; wait while there is nothing to do. None: closing and nothing running."""
        with self._cond:
            while True:
                if self._closing and not self._active:
                    return None
                self._waiting = [t for t in self._waiting if not t.cancelled]
                taken: list[Ticket] = []
                while (
                    not self._closing
                    and not self._paused
                    and self._waiting
                    and self.slots.free(len(self._active))
                ):
                    head = self._next_job()
                    if head is None:
                        break  # every queued job's requester runs its share already
                    alone = head.digest is not None and head.digest in self.suspects
                    if self._active and (alone or self._runs_alone()):
                        break  # a suspect runs alone: it waits for an empty scheduler
                    self._waiting.remove(head)
                    head.started = self.clock()
                    head.t0 = time.perf_counter()
                    head.task = _STARTING
                    self._last_started[head.job.requester] = head.started
                    self._active.append(head)
                    taken.append(head)
                    if alone:
                        break
                self._note_saturation()
                if self._active:
                    self._active.sort()
                    self.beat.busy()
                    return taken
                self._cond.wait()

    def _next_job(self) -> Ticket | None:
        """The queued job a free slot goes to (under self._cond), by the fair-share rules;
        notes a requester that saturates the engine while others wait (for health)."""
        now = self.clock()
        running = Counter(t.job.requester for t in self._active)
        chosen = pick(
            [t.waiting() for t in self._waiting], running, self._last_started,
            self.slots.fair_room(len(self._active)), self._active_requesters(now), now,
            self.aging_s,
        )  # fmt: skip
        return None if chosen is None else self._waiting[chosen]

    def _note_saturation(self) -> None:
        """One requester running all it may while others' jobs wait: the engine is
        saturated by it (under self._cond); health says so for HOLD_S."""
        if not self._waiting or not self._active:
            return
        now = self.clock()
        active = self._active_requesters(now)
        if len(active) < 2:
            return
        running = Counter(t.job.requester for t in self._active)
        waiting = Counter(t.job.requester for t in self._waiting)
        greedy = saturating(running, waiting, fair_slots(self.slots.parallel, len(active)))
        if greedy is not None:
            requester, runs, others = greedy
            self._saturated = (
                f"engine saturated by one requester ({requester[:80]}: {runs} of "
                f"{self.slots.parallel} slots, {others} jobs of others waiting)",
                now + HOLD_S,
            )

    def _others_active(self, running: list[Ticket]) -> set[str]:
        """Requesters using the agent with no job in this step (they may send one any
        moment: the engine keeps its steps short for them)."""
        with self._cond:
            active = self._active_requesters(self.clock())
        return active - {t.job.requester for t in running}

    def _runs_alone(self) -> bool:
        return any(t.digest is not None and t.digest in self.suspects for t in self._active)

    def _loop(self) -> None:
        while True:
            self._mark_running()  # cleared once the last job ended, before a wait or exit
            started = self._admit()
            if started is None:
                return
            self._mark_running()  # before the start: the start itself can end the process
            for ticket in started:
                self._start(ticket)
            self._mark_running()
            self._stop_interrupted()
            running = [t for t in self._active if t.task is not None and t.task is not _STARTING]
            if not running:
                self.beat.idle()
                continue
            try:
                self.runner.engine.step(
                    [t.task for t in running if t.task is not None],
                    [t.job.requester for t in running if t.task is not None],
                    self._others_active(running),
                )
            except ContextFull:
                self._make_room(running)
            except Exception:  # a step that fails outright fails the jobs in it
                log.exception("step.crashed", jobs=[t.job.id for t in running])
                self.beat.error()
                for ticket in running:
                    self._end(ticket, self._crashed(ticket))
                continue
            self.metrics.progress()
            self.beat.progress()
            for ticket in running:
                if ticket.task is not None and ticket.task.done:
                    self._end(ticket, self._complete(ticket))
            if not self._active:
                self.beat.idle()

    def _start(self, ticket: Ticket) -> None:
        """Start a job that was just admitted, or answer it at once (expired while
        queued, refused by the engine)."""
        job = ticket.job
        queue_ms = max(0.0, (ticket.started - job.received_at) * 1000.0)
        self.faults.on_inference(job.id)  # test-only; may end this thread
        if job.deadline is not None and ticket.started >= job.deadline:
            log.info("job.expired", job_id=job.id, while_="queued", queue_ms=round(queue_ms))
            self.metrics.count("expired")
            reply = self._status(
                job, Status.EXPIRED, Code.DEADLINE_EXCEEDED, "deadline passed before the job ran"
            )
            self._end(ticket, reply)
            return
        log.debug("job.started", job_id=job.id, kind=job.kind, queue_ms=round(queue_ms, 1))
        if job.progress:
            self.outbox.notify(self._status(job, Status.RUNNING))
        try:
            ticket.task = self.runner.begin(job)
        except JobError as exc:
            self._end(ticket, self._refused(ticket, exc))
        except Exception:
            log.exception("job.crashed", job_id=job.id)
            self._end(ticket, self._crashed(ticket))

    def _mark_running(self) -> None:
        """Name the running jobs in the marker file (for the next process, if this one
        dies now): only when the set changed."""
        if self.marker is None:
            return
        running = [(t.digest, t.job.id) for t in self._active if t.digest is not None]
        if running != self._marked:
            self._marked = running
            if running:
                self.marker.set_running(running)
            else:
                self.marker.clear()

    def _stop_interrupted(self) -> None:
        """Cancelled and expired jobs stop here, between steps; the others go on. Past a
        stop's grace, every running job stops."""
        now = self.clock()
        if self._closing and now >= self._abandon_at:
            self._abandon()
            return
        for ticket in list(self._active):
            if ticket.task is None or ticket.task is _STARTING:
                continue
            deadline = ticket.job.deadline
            if ticket.interrupt is None and deadline is not None and now >= deadline:
                ticket.interrupt = "expired"
            if ticket.interrupt is None:
                continue
            self.runner.engine.drop(ticket.task)
            reason = ticket.interrupt
            status = Status.EXPIRED if reason == "expired" else Status.CANCELLED
            code = Code.DEADLINE_EXCEEDED if reason == "expired" else Code.CANCELLED
            log.info("job.interrupted", job_id=ticket.job.id, reason=reason)
            self.metrics.count(str(status))
            self._end(ticket, self._status(ticket.job, status, code, f"{reason} while running"))

    def _abandon(self) -> None:
        """The stop's grace is over: running jobs end here, with no reply and no
        acknowledgement (the broker delivers them again to the next process)."""
        with self._cond:
            left, self._active = self._active, []
            for ticket in left:
                self._by_id.pop(ticket.job.id, None)
        for ticket in left:
            if ticket.task is not None and ticket.task is not _STARTING:
                self.runner.engine.drop(ticket.task)
            ticket.task = None
            log.warning("job.interrupted", job_id=ticket.job.id, reason="shutdown")

    def _make_room(self, running: list[Ticket]) -> None:
        """The context is full: a running job goes back to the queue, at its back (it
        starts again from its prompt later): from the requester running the most, its
        least urgent. A job alone that cannot fit fails."""
        counts = Counter(t.job.requester for t in running)
        victim = running[fair_victim([t.running() for t in running], counts)]
        if len(running) == 1:
            log.warning("job.failed", job_id=victim.job.id, code="context_overflow")
            self.metrics.count("failed")
            self.runner.engine.drop(victim.task) if victim.task is not None else None
            reply = self._status(
                victim.job, Status.FAILED, Code.CONTEXT_OVERFLOW, "the context is full"
            )
            self._end(victim, reply)
            return
        if victim.task is not None:
            self.runner.engine.drop(victim.task)
        self.metrics.bump("preempted")
        log.info("job.preempted", job_id=victim.job.id, running=len(running))
        with self._cond:
            self._active.remove(victim)
            self.slots.preempted(len(self._active))
            victim.task = None
            self._order += 1  # it yields its place: to the back of the queue
            victim.order = self._order
            victim.queued_at = self.clock()
            self._waiting.append(victim)

    def _end(self, ticket: Ticket, reply: Reply) -> None:
        with self._cond:
            if ticket in self._active:
                self._active.remove(ticket)
                self.slots.ended()
            ticket.task = None
            if ticket.digest is not None:
                self.suspects.discard(ticket.digest)
            self._finish(ticket, reply)

    def _complete(self, ticket: Ticket) -> Reply:
        """The reply of a job whose task ended."""
        assert ticket.task is not None
        bind_job(ticket.job.id)
        try:
            return self._outcome(ticket)
        except Exception:  # never lose the thread; the job gets a failed reply
            log.exception("job.crashed", job_id=ticket.job.id)
            self.beat.error()
            return self._crashed(ticket)
        finally:
            bind_job(None)

    def _crashed(self, ticket: Ticket) -> Reply:
        self.metrics.count("failed")
        if ticket.task is not None and ticket.task is not _STARTING:
            self.runner.engine.drop(ticket.task)
        return self._status(ticket.job, Status.FAILED, Code.INTERNAL_ERROR, "internal error")

    def _refused(self, ticket: Ticket, exc: JobError) -> Reply:
        job = ticket.job
        log.warning("job.rejected", job_id=job.id, code=str(exc.code), reason=exc.message)
        self.metrics.count("rejected")
        return rejection(job.route, self.topics.device_id, exc)

    def _outcome(self, ticket: Ticket) -> Reply:
        """A finished task's reply: done, or the error it ended with."""
        job = ticket.job
        assert ticket.task is not None
        queue_ms = max(0.0, (ticket.started - job.received_at) * 1000.0)
        t0 = ticket.t0
        try:
            outcome = self.runner.finish(job, ticket.task)
        except Interrupted:
            reason = ticket.interrupt or "cancelled"
            status = Status.EXPIRED if reason == "expired" else Status.CANCELLED
            code = Code.DEADLINE_EXCEEDED if reason == "expired" else Code.CANCELLED
            log.info("job.interrupted", job_id=job.id, reason=reason)
            self.metrics.count(str(status))
            return self._status(job, status, code, f"{reason} while running")
        except JobError as exc:  # refused before it ran (the token budget)
            return self._refused(ticket, exc)
        except EdgeAgentError as exc:
            code = exc.code if isinstance(exc, EngineError) else Code.INFERENCE_ERROR
            log.warning("job.failed", job_id=job.id, code=str(code), reason=str(exc))
            if code == Code.COST_EXCEEDED:
                self.metrics.bump("cost_exceeded")
                self._exceeded = (
                    f"a job exceeded its cost bound ({job.requester[:80]}: {exc})",
                    self.clock() + HOLD_S,
                )
            self.metrics.count("failed")
            return self._status(job, Status.FAILED, code, str(exc))
        total_ms = (time.perf_counter() - t0) * 1000.0 + queue_ms
        t = outcome.timings
        timings = ReplyTimings.of(t, queue_ms, total_ms)
        self.metrics.count("done")
        self.metrics.record_job(
            total_ms, t.prompt_ms, t.tokens_per_second, t.prompt_tokens_per_second
        )
        log.info(
            "job.completed",
            job_id=job.id,
            kind=job.kind,
            status="done",
            total_ms=timings.total_ms,
            queue_ms=timings.queue_ms,
            prompt_tokens=t.prompt_tokens,
            cached_tokens=t.cached_tokens,
            completion_tokens=t.completion_tokens,
            tokens_per_second=timings.tokens_per_second,
        )
        return Reply(
            job_id=job.id,
            status=Status.DONE,
            device=self.topics.device_id,
            route=job.route,
            model=self.model,
            result=outcome.result,
            timings=timings,
            ignored=job.ignored,
        )

    def _finish(self, ticket: Ticket, reply: Reply) -> None:
        """Hand the final reply over and let go of the job, in one step under self._cond:
        a delivery of the same job either joins it before this (and gets the reply too) or
        finds its reply in the outbox (`admit`); it can never fall in between."""
        # Only jobs that ran are remembered: a retry after `overloaded`, `expired` or
        # `cancelled` is a new attempt and must run.
        remember = reply.status in (Status.DONE, Status.FAILED)
        memo = Memo(
            key=ticket.key if remember else None,
            digest=ticket.digest if remember else None,
            deadline=ticket.job.deadline,
        )
        self.outbox.deliver(reply, [ticket.ack, *ticket.extra_acks], memo)
        for route, rider_ack in ticket.riders:
            self.outbox.deliver(replace(reply, route=route), rider_ack)
        self._by_id.pop(ticket.job.id, None)
        self._note_seen(ticket.job.requester, self.clock())

    def _status(
        self, job: Job, status: Status, code: Code | None = None, message: str | None = None
    ) -> Reply:
        return Reply(
            job_id=job.id,
            status=status,
            device=self.topics.device_id,
            route=job.route,
            model=self.model if status in (Status.DONE, Status.FAILED) else None,
            error_code=code,
            error_message=message,
            ignored=job.ignored,
        )
