"""The job queue and the one inference thread.

Jobs come from the intake stage (`intake.Intake`, its own thread) through `offer()`, which
queues them or answers at once (queue full, an id already held). The thread named
"inference" takes the most urgent job, checks its deadline, runs it, and hands the reply
to the outbox, which stores and publishes it and only then acknowledges the job's MQTT
message. The thread is supervised: a failing job is answered `failed` and the loop goes
on; if the thread itself dies, health turns degraded (`health.py`).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

from edge_agent.adapters.journal import RunningMarker
from edge_agent.adapters.log import bind_job
from edge_agent.core.errors import Code, EdgeAgentError, EngineError, JobError
from edge_agent.core.inference import Interrupted
from edge_agent.core.metrics import Metrics
from edge_agent.core.protocol import (
    Job,
    ModelRef,
    Reply,
    ReplyRoute,
    Status,
    Topics,
    rejection,
    timings_dict,
)
from edge_agent.service.faults import Faults
from edge_agent.service.health import Beat, Health, supervised
from edge_agent.service.outbox import Handoff, Memo
from edge_agent.service.runner import JobRunner

log = structlog.get_logger("edge_agent.worker")

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

    def sort_key(self) -> tuple[int, float, int]:
        deadline = self.job.deadline if self.job.deadline is not None else float("inf")
        return (-self.job.priority, deadline, self.order)

    def __lt__(self, other: Ticket) -> bool:
        return self.sort_key() < other.sort_key()


class Worker:
    """Bounded priority queue + one inference thread."""

    def __init__(
        self,
        runner: JobRunner,
        outbox: ReplySink,
        metrics: Metrics,
        *,
        topics: Topics,
        model: ModelRef,
        max_queue: int,
        beat: Beat | None = None,
        marker: RunningMarker | None = None,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.time,
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
        self._heap: list[Ticket] = []
        self._by_id: dict[str, Ticket] = {}
        self._running: Ticket | None = None
        self._cond = threading.Condition()
        self._order = 0
        self._closing = False
        self._thread: threading.Thread | None = None

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
            if self.waiting >= self.max_queue:
                retry = self._retry_after_ms()
                overload = JobError(
                    Code.OVERLOADED, f"queue is full ({self.max_queue} jobs waiting)"
                )
                self.metrics.count("rejected")
                log.warning("job.rejected", job_id=job.id, code="overloaded", depth=self.max_queue)
                self.outbox.deliver(
                    rejection(job.route, self.topics.device_id, overload, retry_after_ms=retry),
                    ack,
                )
                return
            if job.progress:  # before the queue, so `accepted` always precedes `running`
                self.outbox.notify(self._status(job, Status.ACCEPTED))
            self._order += 1
            ticket = Ticket(job=job, ack=ack, order=self._order, key=key, digest=digest)
            heapq.heappush(self._heap, ticket)
            self._by_id[job.id] = ticket
            self._cond.notify()
        log.debug("job.queued", job_id=job.id, kind=job.kind, priority=job.priority)

    def cancel(self, job_id: str, reply_topic: str) -> bool:
        """Cancel a queued or running job; True if this agent had it. The cancel must name
        the job's reply topic too (its key), so a client that only learned an id cannot
        cancel another requester's job."""
        with self._cond:
            ticket = self._by_id.get(job_id)
            if ticket is None or ticket.job.route.topic != reply_topic:
                return False
            if ticket is self._running:
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

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._by_id)

    @property
    def waiting(self) -> int:
        """Jobs queued behind the running one (call under self._cond or accept a race)."""
        return len(self._by_id) - (1 if self._running else 0)

    def busy(self) -> tuple[bool, int]:
        """(a job is running, jobs waiting behind it)."""
        with self._cond:
            return self._running is not None, self.waiting

    def _retry_after_ms(self) -> int:
        p50 = self.metrics.snapshot()["latency_ms_p50"] or 1000.0
        return int(p50 * max(1, len(self._by_id)))

    # ---- the inference thread --------------------------------------------------------

    def start(self) -> None:
        self._thread = supervised(self.beat, self._loop)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; let the running one finish (up to `timeout`)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _next(self) -> Ticket | None:
        with self._cond:
            while True:
                if self._closing:
                    return None
                while self._heap and self._heap[0].cancelled:
                    heapq.heappop(self._heap)
                if self._heap:
                    ticket = heapq.heappop(self._heap)
                    self._running = ticket
                    self.beat.busy()
                    return ticket
                self._cond.wait()

    def _loop(self) -> None:
        while True:
            ticket = self._next()
            if ticket is None:
                return
            if self.marker is not None and ticket.digest is not None:
                self.marker.set(ticket.digest, ticket.job.id)
            self.faults.on_inference(ticket.job.id)  # test-only; may end this thread
            bind_job(ticket.job.id)
            try:
                reply = self._run(ticket)
            except Exception:  # never lose the thread; the job gets a failed reply
                log.exception("job.crashed", job_id=ticket.job.id)
                self.beat.error()
                self.metrics.count("failed")
                reply = self._status(
                    ticket.job, Status.FAILED, Code.INTERNAL_ERROR, "internal error"
                )
            finally:
                bind_job(None)
                self.beat.idle()
                if self.marker is not None:
                    self.marker.clear()
            with self._cond:
                self._running = None
                self._finish(ticket, reply)

    def _run(self, ticket: Ticket) -> Reply:
        """Run one job; its final reply."""
        job = ticket.job
        started = self.clock()
        queue_ms = max(0.0, (started - job.received_at) * 1000.0)
        if job.deadline is not None and started >= job.deadline:
            log.info("job.expired", job_id=job.id, while_="queued", queue_ms=round(queue_ms))
            self.metrics.count("expired")
            return self._status(
                job, Status.EXPIRED, Code.DEADLINE_EXCEEDED, "deadline passed before the job ran"
            )
        log.debug("job.started", job_id=job.id, kind=job.kind, queue_ms=round(queue_ms, 1))
        if job.progress:
            self.outbox.notify(self._status(job, Status.RUNNING))

        def stop() -> bool:
            self.metrics.progress()
            self.beat.progress()
            if (
                ticket.interrupt is None
                and job.deadline is not None
                and self.clock() >= job.deadline
            ):
                ticket.interrupt = "expired"
            return ticket.interrupt is not None

        t0 = time.perf_counter()
        try:
            outcome = self.runner.run(job, stop)
        except Interrupted:
            reason = ticket.interrupt or "cancelled"
            status = Status.EXPIRED if reason == "expired" else Status.CANCELLED
            code = Code.DEADLINE_EXCEEDED if reason == "expired" else Code.CANCELLED
            log.info("job.interrupted", job_id=job.id, reason=reason)
            self.metrics.count(str(status))
            return self._status(job, status, code, f"{reason} while running")
        except JobError as exc:  # refused before it ran (the token budget)
            log.warning("job.rejected", job_id=job.id, code=str(exc.code), reason=exc.message)
            self.metrics.count("rejected")
            return rejection(job.route, self.topics.device_id, exc)
        except EdgeAgentError as exc:
            code = exc.code if isinstance(exc, EngineError) else Code.INFERENCE_ERROR
            log.warning("job.failed", job_id=job.id, code=str(code), reason=str(exc))
            self.metrics.count("failed")
            return self._status(job, Status.FAILED, code, str(exc))
        total_ms = (time.perf_counter() - t0) * 1000.0 + queue_ms
        t = outcome.timings
        timings = timings_dict(
            queue_ms,
            t.prompt_ms,
            t.gen_ms,
            total_ms,
            t.prompt_tokens,
            t.cached_tokens,
            t.completion_tokens,
        )
        self.metrics.count("done")
        self.metrics.record_job(
            total_ms, t.prompt_ms, t.tokens_per_second, t.prompt_tokens_per_second
        )
        log.info(
            "job.completed",
            job_id=job.id,
            kind=job.kind,
            status="done",
            total_ms=timings["total_ms"],
            queue_ms=timings["queue_ms"],
            prompt_tokens=t.prompt_tokens,
            cached_tokens=t.cached_tokens,
            completion_tokens=t.completion_tokens,
            tokens_per_second=timings["tokens_per_second"],
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
