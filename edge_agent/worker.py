"""The job queue and the one inference thread.

Jobs come in on paho's network thread through `receive()`, which only validates and
enqueues (or answers at once when the job is bad or the queue is full): it never blocks
and never raises. The thread named "inference" takes the most urgent job, checks its
deadline, runs it, and hands the reply to the outbox, which stores and publishes it and
only then acknowledges the job's MQTT message.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

from edge_agent.errors import Code, EdgeAgentError, EngineError, JobError
from edge_agent.inference import Interrupted
from edge_agent.journal import DELIVERED, Journal, Stored, job_key, payload_digest
from edge_agent.metrics import Metrics
from edge_agent.outbox import Handoff, Memo
from edge_agent.protocol import (
    Delivery,
    Job,
    JobLimits,
    ModelRef,
    Profile,
    Reply,
    ReplyRoute,
    Status,
    Topics,
    decode_payload,
    parse_job,
    rejection,
    reply_route,
    timings_dict,
)
from edge_agent.runner import JobRunner

log = structlog.get_logger("edge_agent.worker")

Ack = Callable[[], None]


class ReplySink(Protocol):
    def deliver(self, reply: Reply, ack: Ack, memo: Memo | None = None) -> None:
        """Make the final reply durable, acknowledge the job, publish the reply."""

    def notify(self, reply: Reply) -> None:
        """Publish a progress message (accepted/running); best effort."""

    def resend(self, stored: Stored, correlation_data: bytes | None) -> None:
        """Publish a stored reply again, with this attempt's correlation data."""

    def hand_back(self, job: Handoff, ack: Ack, undo: Callable[[], None]) -> bool:
        """Give a fleet job back to the fleet topic; False if that is not possible now."""


@dataclass(frozen=True)
class Handing:
    """Whether and when a busy agent hands fleet jobs back to the fleet topic."""

    enabled: bool = True
    keep: int = 0  # fleet jobs kept waiting behind the running one before handing back
    max_hops: int = 3


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
        limits: JobLimits,
        model: ModelRef,
        max_queue: int,
        journal: Journal | None = None,
        handing: Handing = Handing(enabled=False),
        profiles: Mapping[str, Profile] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runner = runner
        self.outbox = outbox
        self.metrics = metrics
        self.topics = topics
        self.limits = limits
        self.model = model
        self.max_queue = max_queue
        self.journal = journal
        self.handing = handing
        self.profiles = dict(profiles or {})
        self.clock = clock
        self._heap: list[Ticket] = []
        self._by_id: dict[str, Ticket] = {}
        self._running: Ticket | None = None
        self._running_since = 0.0
        self._cond = threading.Condition()
        self._order = 0
        self._closing = False
        self._thread: threading.Thread | None = None

    # ---- intake, on paho's thread -----------------------------------------------------

    def receive(self, delivery: Delivery, ack: Ack) -> None:
        """Validate and enqueue one job message; answers bad ones at once. Never raises."""
        try:
            self._receive(delivery, ack)
        except Exception:  # a bug here must not kill paho's network thread
            log.exception("job.intake_failed", topic=delivery.topic)

    def _receive(self, delivery: Delivery, ack: Ack) -> None:
        try:
            job = parse_job(delivery, self.topics, self.limits, self.profiles)
        except JobError as exc:
            try:
                data = decode_payload(delivery.payload, self.limits)
            except JobError:
                data = None
            route = reply_route(delivery, data, self.topics, self.limits)
            log.warning(
                "job.rejected",
                job_id=route.job_id,
                code=str(exc.code),
                reason=exc.message,
                topic=delivery.topic,
                bytes=len(delivery.payload),
            )
            self.metrics.count("rejected")
            self.outbox.deliver(rejection(route, self.topics.device_id, exc), ack)
            return
        key = job_key(job.id, job.route.topic)
        digest = payload_digest(delivery.payload)
        if self._answered_before(job, key, digest, delivery, ack):
            return
        if self._hand_back(job, key, digest, delivery, ack):
            return
        self.offer(job, ack, key, digest)

    def _answered_before(
        self, job: Job, key: str, digest: str, delivery: Delivery, ack: Ack
    ) -> bool:
        """A job this agent already ran: answer from the journal, never run it again."""
        if self.journal is None:
            return False
        stored = self.journal.lookup(key)
        if stored is None or stored.digest != digest:
            return False  # new, or the same id reused for a different job
        self.metrics.bump("duplicate_jobs")
        # A broker redelivery (DUP) of a job whose reply is out or on its way needs no
        # second reply. A new publish of the same job is the requester retrying: it gets
        # the stored reply again, carrying the Correlation Data of this attempt.
        fresh_attempt = not delivery.dup or delivery.correlation_data != stored.correlation
        if fresh_attempt and (
            stored.state == DELIVERED or delivery.correlation_data != stored.correlation
        ):
            self.outbox.resend(stored, delivery.correlation_data)
        log.info("job.duplicate", job_id=job.id, redelivered=delivery.dup, reply_state=stored.state)
        ack()
        return True

    def _hand_back(self, job: Job, key: str, digest: str, delivery: Delivery, ack: Ack) -> bool:
        h = self.handing
        if not delivery.shared or not h.enabled or delivery.hops >= h.max_hops:
            return False
        with self._cond:
            waiting = len(self._by_id) - (1 if self._running else 0)
            busy = self._running is not None and waiting >= h.keep
        if not busy:
            return False
        handoff = Handoff(
            topic=self.topics.fleet_jobs(job.kind),
            payload=delivery.payload,
            response_topic=delivery.response_topic,
            correlation_data=delivery.correlation_data,
            deadline=job.deadline,
            hops=delivery.hops + 1,
        )

        def keep_it() -> None:
            self.offer(job, ack, key, digest)

        if not self.outbox.hand_back(handoff, ack, keep_it):
            return False
        self.metrics.bump("handed_back")
        log.info("job.handed_back", job_id=job.id, hops=handoff.hops, waiting=waiting)
        return True

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
            if len(self._by_id) - (1 if self._running else 0) >= self.max_queue:
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

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; True if this agent had it."""
        with self._cond:
            ticket = self._by_id.get(job_id)
            if ticket is None:
                return False
            if ticket is self._running:
                ticket.interrupt = "cancelled"
                return True
            ticket.cancelled = True
            del self._by_id[job_id]
        log.info("job.cancelled", job_id=job_id, while_="queued")
        self._finish(
            ticket,
            self._status(ticket.job, Status.CANCELLED, Code.CANCELLED, "cancelled while queued"),
        )
        self.metrics.count("cancelled")
        return True

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._by_id)

    def stalled_for(self) -> float:
        """Seconds the running job has gone without forward progress (a decoded batch or
        token); 0 when idle. Infinite if the inference thread died. The systemd watchdog
        stops pinging when this grows too long, so a wedged inference gets restarted."""
        with self._cond:
            if self._thread is not None and not self._thread.is_alive() and not self._closing:
                return float("inf")
            if self._running is None:
                return 0.0
            since = self._running_since
        last = max(since, self.metrics.last_progress or 0.0)
        return max(0.0, time.monotonic() - last)

    def _retry_after_ms(self) -> int:
        p50 = self.metrics.snapshot()["latency_ms_p50"] or 1000.0
        return int(p50 * max(1, len(self._by_id)))

    # ---- the inference thread --------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
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
                    self._running_since = time.monotonic()  # stalled_for's clock
                    return ticket
                self._cond.wait()

    def _loop(self) -> None:
        while True:
            ticket = self._next()
            if ticket is None:
                return
            try:
                self._run(ticket)
            except Exception:  # never lose the thread; the job gets a failed reply
                log.exception("job.crashed", job_id=ticket.job.id)
                self.metrics.count("failed")
                self._finish(
                    ticket,
                    self._status(ticket.job, Status.FAILED, Code.INTERNAL_ERROR, "internal error"),
                )
            finally:
                with self._cond:
                    self._running = None
                    self._by_id.pop(ticket.job.id, None)

    def _run(self, ticket: Ticket) -> None:
        job = ticket.job
        started = self.clock()
        queue_ms = max(0.0, (started - job.received_at) * 1000.0)
        if job.deadline is not None and started >= job.deadline:
            log.info("job.expired", job_id=job.id, while_="queued", queue_ms=round(queue_ms))
            self.metrics.count("expired")
            self._finish(
                ticket,
                self._status(
                    job,
                    Status.EXPIRED,
                    Code.DEADLINE_EXCEEDED,
                    "deadline passed before the job ran",
                ),
            )
            return
        log.debug("job.started", job_id=job.id, kind=job.kind, queue_ms=round(queue_ms, 1))
        if job.progress:
            self.outbox.notify(self._status(job, Status.RUNNING))

        def stop() -> bool:
            self.metrics.progress()
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
            self._finish(ticket, self._status(job, status, code, f"{reason} while running"))
            return
        except EdgeAgentError as exc:
            code = exc.code if isinstance(exc, EngineError) else Code.INFERENCE_ERROR
            log.warning("job.failed", job_id=job.id, code=str(code), reason=str(exc))
            self.metrics.count("failed")
            self._finish(ticket, self._status(job, Status.FAILED, code, str(exc)))
            return
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
        reply = Reply(
            job_id=job.id,
            status=Status.DONE,
            device=self.topics.device_id,
            route=job.route,
            model=self.model,
            result=outcome.result,
            timings=timings,
            ignored=job.ignored,
        )
        self._finish(ticket, reply)

    def _finish(self, ticket: Ticket, reply: Reply) -> None:
        acks = [ticket.ack, *ticket.extra_acks]

        def ack_all() -> None:
            for ack in acks:
                ack()

        # Only jobs that ran are remembered: a retry after `overloaded`, `expired` or
        # `cancelled` is a new attempt and must run.
        remember = reply.status in (Status.DONE, Status.FAILED)
        memo = Memo(
            key=ticket.key if remember else None,
            digest=ticket.digest if remember else None,
            deadline=ticket.job.deadline,
        )
        self.outbox.deliver(reply, ack_all, memo)
        for route, rider_ack in ticket.riders:
            self.outbox.deliver(replace(reply, route=route), rider_ack)

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
