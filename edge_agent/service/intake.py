"""The intake stage: every message the broker delivers, read on a thread of its own.

paho's network thread only hands each message (raw: topic, payload, properties) and its
acknowledgement handle to `Intake.submit`, which queues it and returns: paho's thread never
parses, never touches SQLite and never waits for a lock another thread holds across I/O,
so keepalive and PUBACKs flow whatever a message contains.

The thread named "intake" then reads the message and ends it in exactly one of:
    - a reply (an answer later, or a rejection now) and the acknowledgement of its
      delivery once that reply is safe (the outbox does both);
    - the acknowledgement of a duplicate (a redelivery of a job already answered or held);
    - for control messages (cancel, rebirth, Home Assistant's status), the acknowledgement
      and the action.
Whatever goes wrong while reading a message is caught here and becomes a `rejected` reply
with a code, and the acknowledgement: no message is ever left unacknowledged, which would
use up Receive Maximum and come back after every restart.
"""

from __future__ import annotations

import heapq
import json
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from edge_agent.adapters.journal import Journal, Stored, job_key, payload_digest
from edge_agent.adapters.log import bind_job
from edge_agent.adapters.mqtt import Ack, Incoming
from edge_agent.core.errors import Code, JobError
from edge_agent.core.fairness import ShapeBudget
from edge_agent.core.metrics import Metrics
from edge_agent.core.protocol import (
    MAX_DEADLINE_S,
    Delivery,
    Job,
    JobLimits,
    Profile,
    Reply,
    ReplyRoute,
    Status,
    Topics,
    decode_payload,
    parse_job,
    rejection,
    reply_route,
)
from edge_agent.core.wire import ModelRef
from edge_agent.service.health import Beat, loop_thread
from edge_agent.service.outbox import Handoff
from edge_agent.service.worker import ReplySink, Worker

log = structlog.get_logger("edge_agent.intake")

HOPS_PROPERTY = "edge-hops"
# QoS 1 deliveries are bounded by the broker (Receive Maximum, or its in-flight limit for
# MQTT 3.1.1). QoS 0 ones are not: beyond this many waiting, new QoS 0 messages are
# dropped and counted, as QoS 0 allows.
QOS0_BACKLOG = 1000
# A duplicate of a job whose reply is on its way to the journal is looked at again this
# often, until the reply is committed (then it is answered from the journal).
DEFER_S = 0.05
MAX_DEFERRALS = 600  # 30 s: then it is handled as it stands
HANDBACK_PAUSE_S = (10.0, 300.0)  # first and longest pause once hand-backs come back
# Handing back pauses when this many hand-backs in a row came back to this agent: a fleet
# of one, or every member busy. One return alone says little: with three members, a third
# of the copies come back to their sender by turn (bench.chaos's slowed-member run).
RETURNS_TO_PAUSE = 3


class Replies(ReplySink, Protocol):
    """What the intake needs from the outbox."""

    def resend(self, stored: Stored, correlation_data: bytes | None) -> None:
        """Publish a stored reply again, with this attempt's correlation data."""


@dataclass(frozen=True)
class Handing:
    """Whether and when a busy agent hands fleet jobs back to the fleet topic."""

    enabled: bool = True
    keep: int = 0  # fleet jobs kept waiting behind the running one before handing back
    max_hops: int = 3


@dataclass(frozen=True)
class _Message:
    incoming: Incoming
    ack: Ack
    deferrals: int = 0


@dataclass(frozen=True)
class _Keep:
    """A hand-back that failed: the job stays here after all."""

    job: Job
    ack: Ack
    key: str
    digest: str


class Intake:
    """Reads deliveries on its own thread and sends each where it belongs."""

    def __init__(
        self,
        *,
        topics: Topics,
        limits: JobLimits,
        worker: Worker,
        outbox: Replies,
        metrics: Metrics,
        model: ModelRef,
        journal: Journal | None = None,
        profiles: Mapping[str, Profile] | None = None,
        handing: Handing = Handing(enabled=False),
        mqtt5: bool = True,
        budget: Callable[[Job], None] = lambda _job: None,
        shape: Callable[[Job], str] | None = None,
        shapes: ShapeBudget | None = None,
        on_rebirth: Callable[[], None] = lambda: None,
        on_ha_online: Callable[[], None] = lambda: None,
        on_operation: Callable[[Incoming, str], None] | None = None,
        draining: Callable[[], bool] = lambda: False,
        beat: Beat | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.limits = limits
        self.worker = worker
        self.outbox = outbox
        self.metrics = metrics
        self.model = model
        self.journal = journal
        self.profiles = dict(profiles or {})
        self.handing = handing
        self.mqtt5 = mqtt5
        self.budget = budget
        self.shape = shape
        self.shapes = shapes  # new prompt shapes per requester (only this thread calls it)
        self.on_rebirth = on_rebirth
        self.on_ha_online = on_ha_online
        self.on_operation = on_operation
        self.draining = draining
        self.beat = beat
        self.clock = clock
        self._queue: queue.Queue[_Message | _Keep | None] = queue.Queue()
        self._deferred: list[tuple[float, int, _Message]] = []
        self._order = 0
        self._thread: threading.Thread | None = None
        # digests handed back, oldest first, and whether each came back to this agent
        self._handed: OrderedDict[str, bool] = OrderedDict()
        self._pause_until = 0.0
        self._pause_s = HANDBACK_PAUSE_S[0]

    # ---- paho's thread ------------------------------------------------------------------

    def submit(self, incoming: Incoming, ack: Ack) -> None:
        """Queue one delivery; returns at once and never raises (paho's network thread)."""
        try:
            if incoming.qos == 0 and self._queue.qsize() >= QOS0_BACKLOG:
                self.metrics.bump("intake_dropped_qos0")
                return
            self._queue.put_nowait(_Message(incoming, ack))
        except Exception:  # nothing here may reach paho's thread
            log.exception("intake.submit_failed")

    @property
    def backlog(self) -> int:
        return self._queue.qsize() + len(self._deferred)

    # ---- the intake thread ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = loop_thread("intake", self.beat, self._loop)

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            timeout = None
            if self._deferred:
                timeout = max(0.0, self._deferred[0][0] - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = self._due()
                if item is None:
                    continue
            if item is None:
                return
            if self.beat is not None:
                self.beat.busy()
            try:
                if isinstance(item, _Keep):
                    self.worker.offer(item.job, item.ack, item.key, item.digest)
                else:
                    self._read(item)
            finally:
                if self.beat is not None:
                    self.beat.idle()

    def _due(self) -> _Message | None:
        if self._deferred and self._deferred[0][0] <= time.monotonic():
            return heapq.heappop(self._deferred)[2]
        return None

    def _defer(self, message: _Message) -> None:
        self._order += 1
        later = _Message(message.incoming, message.ack, message.deferrals + 1)
        heapq.heappush(self._deferred, (time.monotonic() + DEFER_S, self._order, later))

    def _read(self, message: _Message) -> None:
        """One message, to its one outcome; nothing escapes."""
        incoming = message.incoming
        try:
            self._dispatch(message)
        except Exception as exc:
            log.exception("intake.failed", topic=incoming.topic, bytes=len(incoming.payload))
            if self.beat is not None:
                self.beat.error()
            self._reject_unreadable(message, exc)
        finally:
            bind_job(None)

    def _reject_unreadable(self, message: _Message, exc: Exception) -> None:
        """Last resort for a message that broke the reading itself: answer it
        `internal_error` where it asked, if that can be worked out, and acknowledge it."""
        try:
            incoming = message.incoming
            delivery = self._delivery(incoming, self.topics.parse(incoming.topic).fleet)
            try:
                data: dict[str, Any] | None = decode_payload(delivery.payload, self.limits)
            except JobError:
                data = None
            route = reply_route(delivery, data, self.topics, self.limits)
            error = JobError(Code.INTERNAL_ERROR, f"the agent could not read this job ({exc!r})")
            self.metrics.count("rejected")
            self.outbox.deliver(rejection(route, self.topics.device_id, error), message.ack)
        except Exception:
            log.exception("intake.reject_failed")
            message.ack()

    def _dispatch(self, message: _Message) -> None:
        incoming, ack = message.incoming, message.ack
        match = self.topics.parse(incoming.topic)
        if match.role == "job":
            self._job(message, match.fleet, match.kind)
            return
        ack()  # control messages: acknowledged at once, never answered
        if match.role == "cancel":
            self._cancel(incoming)
        elif match.role == "rebirth":
            log.info("agent.rebirth", topic=incoming.topic)
            self.on_rebirth()
        elif match.role == "ha_status":
            if incoming.payload.strip() == b"online":  # Home Assistant (re)started
                log.info("homeassistant.announce")
                self.on_ha_online()
        elif match.role == "operation" and self.on_operation is not None:
            self.on_operation(incoming, match.requester or "")
        else:
            log.warning("mqtt.unexpected_topic", topic=incoming.topic)

    # ---- jobs ------------------------------------------------------------------------------

    def _delivery(self, incoming: Incoming, fleet: bool, kind: str | None = None) -> Delivery:
        return Delivery(
            kind=kind,
            topic=incoming.topic,
            payload=incoming.payload,
            received_at=incoming.received_at,
            wall_at=incoming.wall_at,
            response_topic=_text_or_none(incoming.response_topic),
            correlation_data=_bytes_or_none(incoming.correlation_data),
            expiry_s=_expiry(incoming.expiry_s),
            dup=incoming.dup,
            shared=fleet and self.mqtt5,
            hops=hops(incoming.user_properties),
            retained=incoming.retain,
        )

    def _job(self, message: _Message, fleet: bool, kind: str | None) -> None:
        delivery = self._delivery(message.incoming, fleet, kind)
        ack = message.ack
        try:
            data = decode_payload(delivery.payload, self.limits)
        except JobError as exc:
            self._reject(reply_route(delivery, None, self.topics, self.limits), exc, ack, delivery)
            return
        route = reply_route(delivery, data, self.topics, self.limits)
        if not fleet and self.draining():
            # Fleet jobs the broker delivered before the drain still run here (they are
            # this board's now); new work for this device alone is refused, clearly.
            error = JobError(
                Code.DRAINING,
                "this device is drained for maintenance (operation drain); send the job "
                "to the fleet topic, or again after it resumes",
            )
            self._reject(route, error, ack, delivery)
            return
        over = self.worker.over_share(self.topics.requester_of(route.topic), route.job_id)
        if over is not None:  # refused before the job is read whole: the excess costs little
            self.metrics.bump("fair_share_refused")
            error = JobError(Code.OVERLOADED, over)
            retry = self.worker.share_retry_after_ms()
            self._reject(route, error, ack, delivery, retry_after_ms=retry)
            return
        try:
            job = parse_job(
                delivery, self.topics, self.limits, self.profiles, data=data, route=route
            )
            bind_job(job.id)
            self.budget(job)
        except JobError as exc:
            self._reject(route, exc, ack, delivery)
            return
        key = job_key(job.id, job.route.topic)
        digest = payload_digest(delivery.payload)
        if self.journal is not None and self.journal.is_poison(digest):
            self._poison(job, ack)
            return
        if self._new_shape_refused(job, route, ack, delivery):
            return
        # Where a job with this id may be: held by the worker, handed to the outbox on its
        # way to the journal (both checked in one step against the worker finishing it),
        # or in the journal. Only this thread adds jobs to the worker, so "absent" stays
        # true until this thread offers it.
        where = self.worker.admit(job, ack, key, digest)
        if where == "held":
            return
        if where == "answering" and message.deferrals < MAX_DEFERRALS:
            self._defer(message)
            return
        if self._answered_before(job, key, digest, delivery, ack):
            return
        if fleet and self._hand_back(job, key, digest, delivery, ack):
            return
        self.worker.offer(job, ack, key, digest)

    def _new_shape_refused(self, job: Job, route: ReplyRoute, ack: Ack, delivery: Delivery) -> bool:
        """A job of a prompt shape not seen recently, from a requester that brought its
        budget of new shapes already: `overloaded`, with when its budget allows one more."""
        if self.shapes is None or self.shape is None:
            return False
        wait_s = self.shapes.admit(job.requester, self.shape(job), self.clock())
        if wait_s is None:
            return False
        self.metrics.bump("new_shapes_refused")
        error = JobError(
            Code.OVERLOADED,
            f"this requester brought {self.shapes.burst} new job shapes (labels, "
            f"instructions, schema, examples) lately; this agent takes "
            f"{self.shapes.per_minute:g} a minute from each (jobs.new_shapes_per_minute)",
        )
        self._reject(route, error, ack, delivery, retry_after_ms=int(wait_s * 1000) + 1)
        return True

    def _reject(
        self,
        route: ReplyRoute,
        exc: JobError,
        ack: Ack,
        delivery: Delivery,
        retry_after_ms: int | None = None,
    ) -> None:
        log.warning(
            "job.rejected",
            job_id=route.job_id,
            code=str(exc.code),
            reason=exc.message,
            topic=delivery.topic,
            bytes=len(delivery.payload),
        )
        self.metrics.count("rejected")
        reply = rejection(route, self.topics.device_id, exc, retry_after_ms=retry_after_ms)
        self.outbox.deliver(reply, ack)

    def _poison(self, job: Job, ack: Ack) -> None:
        log.error("job.poison", job_id=job.id)
        self.metrics.count("failed")
        self.outbox.deliver(
            Reply(
                job_id=job.id,
                status=Status.FAILED,
                device=self.topics.device_id,
                route=job.route,
                model=self.model,
                error_code=Code.JOB_CRASHED,
                error_message="the agent stopped twice while running this job; it is not run again",
                ignored=job.ignored,
            ),
            ack,
        )

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
        # the stored reply again, carrying the Correlation Data of this attempt, even when
        # the first copy still waits for its PUBACK (the requester may already have it,
        # and be asking again; a second copy is what QoS 1 allows, a missing one is not).
        fresh_attempt = not delivery.dup or delivery.correlation_data != stored.correlation
        if fresh_attempt:
            self.outbox.resend(stored, delivery.correlation_data)
        log.info("job.duplicate", job_id=job.id, redelivered=delivery.dup, reply_state=stored.state)
        ack()
        return True

    def _hand_back(self, job: Job, key: str, digest: str, delivery: Delivery, ack: Ack) -> bool:
        h = self.handing
        if not delivery.shared or not h.enabled or delivery.hops >= h.max_hops:
            return False
        now = time.monotonic()
        if digest in self._handed:
            # A job this agent handed back came back to it: keep it. When the last few all
            # came back, no other member is taking them (a fleet of one, or all busy):
            # stop handing back for a while instead of bouncing every job via the broker.
            self._handed[digest] = True
            recent = list(self._handed.values())[-RETURNS_TO_PAUSE:]
            if len(recent) == RETURNS_TO_PAUSE and all(recent) and now >= self._pause_until:
                self._pause_s = (
                    min(self._pause_s * 2, HANDBACK_PAUSE_S[1])
                    if now - self._pause_until < self._pause_s
                    else HANDBACK_PAUSE_S[0]
                )
                self._pause_until = now + self._pause_s
                log.info("job.handback_paused", seconds=self._pause_s, job_id=job.id)
            return False
        if now < self._pause_until:
            return False
        running, waiting = self.worker.busy()
        if not running or waiting < h.keep:
            return False
        handoff = Handoff(
            topic=self.topics.fleet_jobs(job.kind),
            payload=delivery.payload,
            response_topic=delivery.response_topic,
            correlation_data=delivery.correlation_data,
            deadline=job.deadline,
            hops=delivery.hops + 1,
        )
        self._handed[digest] = False
        while len(self._handed) > 512:
            self._handed.popitem(last=False)

        def keep_it() -> None:  # on the outbox's thread: back through our queue
            self._queue.put(_Keep(job, ack, key, digest))

        self.outbox.hand_back(handoff, ack, keep_it)
        self.metrics.bump("handed_back")
        log.debug("job.handed_back", job_id=job.id, hops=handoff.hops, waiting=waiting)
        return True

    # ---- control ---------------------------------------------------------------------------

    def _cancel(self, incoming: Incoming) -> None:
        """`{"id": ...}`: cancels the job with that id and the same reply topic (the MQTT 5
        Response Topic of the cancel, else its `reply_to`, else the results topic)."""
        try:
            data = json.loads(incoming.payload)
        except ValueError:
            data = None
        job_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(job_id, str) or not job_id:
            log.warning("job.cancel_ignored", reason="no id", bytes=len(incoming.payload))
            return
        delivery = self._delivery(incoming, fleet=False)  # only its reply route is read
        route = reply_route(delivery, data if isinstance(data, dict) else None,
                            self.topics, self.limits)  # fmt: skip
        found = self.worker.cancel(job_id, route.topic)
        log.info("job.cancel_requested", job_id=job_id, found=found, reply_topic=route.topic)


def hops(user_properties: Any) -> int:
    """How many times agents handed a job back (user property edge-hops): a small decimal
    number in ASCII, else 0. `"²".isdigit()` is true and int() refuses it, so isdigit is
    not the test."""
    try:
        for key, value in user_properties or ():
            if key == HOPS_PROPERTY:
                text = str(value)
                if 0 < len(text) <= 3 and text.isascii() and text.isdecimal():
                    return int(text)
                return 0
    except (TypeError, ValueError):
        return 0
    return 0


def _expiry(value: Any) -> int | None:
    """The Message Expiry of a job, as forwarded (seconds left); bounded."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, MAX_DEADLINE_S)
    return None


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _bytes_or_none(value: Any) -> bytes | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return None
