"""Where replies go: into the journal (durably), then the job is acknowledged, then the
reply is published; the journal is emptied as the broker acknowledges each reply.

The outbox is the only writer of replies, so the rule "acknowledge a job only once its
reply is safe" lives in one place. While the broker is unreachable replies wait in the
journal (the offline spool) and go out oldest first after the reconnect, unless their
job's deadline passed.

It also hands fleet jobs back: a busy agent republishes a job it cannot start soon to the
fleet topic and acknowledges its copy only once the broker has the new one, so Mosquitto's
plain round-robin cannot strand jobs behind a slow board (docs/delivery.md).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from edge_agent.journal import Journal, Stored
from edge_agent.metrics import Metrics
from edge_agent.protocol import CONTENT_TYPE, Reply

log = structlog.get_logger("edge_agent.outbox")

Ack = Callable[[], None]
# MQTT 5 PUBACK reason codes below 0x80 mean the broker took the message; 0x10 ("no
# matching subscribers") is accepted but nobody got it.
NO_MATCHING_SUBSCRIBERS = 0x10


class Publisher(Protocol):
    """What the outbox needs from the MQTT link."""

    @property
    def connected(self) -> bool: ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
        expiry_s: int | None = None,
        user_properties: list[tuple[str, str]] | None = None,
    ) -> int | None: ...


@dataclass(frozen=True)
class Memo:
    """How to remember a reply: its dedup key (None: not remembered) and its job's deadline."""

    key: str | None
    digest: str | None
    deadline: float | None


@dataclass(frozen=True)
class Handoff:
    """A fleet job given back to the fleet topic."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    deadline: float | None
    hops: int


class Outbox:
    def __init__(self, link: Publisher, journal: Journal, metrics: Metrics) -> None:
        self.link = link
        self.journal = journal
        self.metrics = metrics
        self._lock = threading.Lock()
        self._rows: dict[int, int] = {}  # paho mid -> journal row, for replies in flight
        self._handoffs: dict[int, tuple[Ack, Callable[[], None]]] = {}  # mid -> (ack, undo)
        self._acks: dict[int, Ack] = {}  # mid of an unjournaled reply -> its job's ack
        self._flushing = threading.Lock()
        # Broker acknowledgements are settled on a thread of our own: paho calls
        # on_published holding its outgoing-message lock, and we publish while holding
        # self._lock (so a mid is registered before its PUBACK is looked up); taking
        # self._lock in the callback would deadlock against that.
        self._settle_queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._settler: threading.Thread | None = None

    def start(self) -> None:
        self._settler = threading.Thread(target=self._settle_loop, name="outbox-acks", daemon=True)
        self._settler.start()

    def stop(self) -> None:
        self._settle_queue.put(None)
        if self._settler is not None:
            self._settler.join(5)

    # ---- final replies ----------------------------------------------------------------

    def deliver(self, reply: Reply, ack: Ack, memo: Memo | None = None) -> None:
        """Get the reply out, and acknowledge the job only once the reply is safe.

        A reply to remember (a job that ran) is committed to the journal first, then the
        job is acknowledged, then the reply is published. Any other reply (a rejection, an
        expiry) is published and the job acknowledged when the broker has the reply (its
        PUBACK), which spares an fsync per bad message; if the broker is unreachable it
        goes to the journal like the others.
        """
        deadline = memo.deadline if memo else None
        if (memo is None or memo.key is None) and self.link.connected:
            with self._lock:
                mid = self._publish(
                    reply.route.topic, reply.encode(), reply.route.correlation_data, deadline
                )
                if mid is not None:
                    self._acks[mid] = ack
                    return
        row = self.journal.record(
            key=memo.key if memo else None,
            digest=memo.digest if memo else None,
            job_id=reply.job_id,
            status=str(reply.status),
            topic=reply.route.topic,
            payload=reply.encode(),
            correlation=reply.route.correlation_data,
            deadline=memo.deadline if memo else None,
        )
        ack()
        self._send_row(
            row, reply.route.topic, reply.encode(), reply.route.correlation_data, deadline
        )

    def resend(self, stored: Stored, correlation_data: bytes | None) -> None:
        """Publish a stored reply again (a requester retried a job already answered)."""
        self._publish(stored.topic, stored.payload, correlation_data, stored.deadline)

    def notify(self, reply: Reply) -> None:
        """Progress messages (accepted, running): best effort, never journaled."""
        self._publish(reply.route.topic, reply.encode(), reply.route.correlation_data, None)

    def flush(self) -> int:
        """Publish what waited in the journal, oldest first. Runs after each connect."""
        if not self._flushing.acquire(blocking=False):
            return 0
        sent = 0
        try:
            while self.link.connected:
                batch = self.journal.pending(limit=200)
                batch = [s for s in batch if s.row not in self._rows.values()]
                if not batch:
                    break
                for stored in batch:
                    if not self._send_row(
                        stored.row,
                        stored.topic,
                        stored.payload,
                        stored.correlation,
                        stored.deadline,
                    ):
                        return sent
                    sent += 1
        finally:
            self._flushing.release()
        if sent:
            log.info("spool.flushed", replies=sent)
        return sent

    def _send_row(
        self,
        row: int,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
        deadline: float | None,
    ) -> bool:
        with self._lock:
            mid = self._publish(topic, payload, correlation, deadline)
            if mid is None:
                return False  # stays pending in the journal until the next connect
            self._rows[mid] = row
        self.journal.mark_in_flight(row, mid)
        return True

    def _publish(
        self, topic: str, payload: bytes, correlation: bytes | None, deadline: float | None
    ) -> int | None:
        expiry = None
        if deadline is not None:
            expiry = max(1, int(deadline - time.time()))
        return self.link.publish(
            topic,
            payload,
            qos=1,
            correlation_data=correlation,
            content_type=CONTENT_TYPE,
            expiry_s=expiry,
        )

    # ---- handing fleet jobs back -------------------------------------------------------

    def hand_back(self, job: Handoff, ack: Ack, undo: Callable[[], None]) -> bool:
        """Republish `job`; its original is acknowledged once the broker has the copy.

        `undo` runs instead if the broker refuses the copy or nobody was subscribed, so the
        job is then kept here. False when not connected (the caller keeps the job).
        """
        expiry = None
        if job.deadline is not None:
            expiry = int(job.deadline - time.time())
            if expiry < 1:
                return False
        with self._lock:
            mid = self.link.publish(
                job.topic,
                job.payload,
                qos=1,
                correlation_data=job.correlation_data,
                content_type=CONTENT_TYPE,
                response_topic=job.response_topic,
                expiry_s=expiry,
                user_properties=[("edge-hops", str(job.hops))],
            )
            if mid is None:
                return False
            self._handoffs[mid] = (ack, undo)
        return True

    # ---- broker acknowledgements (paho's thread) -----------------------------------------

    def on_published(self, mid: int, reason: int) -> None:
        """paho's thread: hand the acknowledgement over and return at once."""
        self._settle_queue.put((mid, reason))

    def _settle_loop(self) -> None:
        while (item := self._settle_queue.get()) is not None:
            try:
                self._settle(*item)
            except Exception:  # a failed settlement must not stop the others
                log.exception("outbox.settle_failed", mid=item[0])

    def _settle(self, mid: int, reason: int) -> None:
        with self._lock:
            row = self._rows.pop(mid, None)
            handoff = self._handoffs.pop(mid, None)
            ack_job = self._acks.pop(mid, None)
        if ack_job is not None:
            ack_job()
        if row is not None:
            if reason >= 0x80:
                log.warning("reply.refused_by_broker", reason=hex(reason), row=row)
            self.journal.mark_delivered(row)
        if handoff is not None:
            ack, undo = handoff
            if reason >= 0x80 or reason == NO_MATCHING_SUBSCRIBERS:
                log.warning("job.handback_failed", reason=hex(reason))
                undo()
            else:
                ack()

    def on_disconnected(self) -> None:
        """paho resends in-flight messages on reconnect; hand-backs are its to resend too."""

    def counts(self) -> dict[str, int]:
        return self.journal.counts()
