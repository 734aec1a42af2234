"""Where replies go, and when the job they answer is acknowledged.

The rule: a job's delivery is acknowledged only when its reply is safe, either
acknowledged by the broker (its PUBACK) or committed to the journal with an fsync (while
the broker is away: the offline spool, published oldest first after the reconnect unless
the job's deadline passed). Replies to jobs that ran (`done`, `failed`) are also kept in
the journal as the dedup memory, committed without an fsync of their own: a broker that
has the reply makes the job safe, and no fsync sits between a job and its
acknowledgement while the broker is reachable.

The outbox is the only writer of the journal, on one thread of its own ("outbox"): the
rule lives in one place and nothing else ever waits for an fsync. Other threads hand it
work through a queue and return at once. What arrives together is written together.

Every reply fits the broker: one larger than the connection's packet limit is slimmed or
replaced by a small `reply_too_large` answer (`protocol.fit_reply`). No reply stays pending
forever: one the broker refuses (a PUBACK reason code of 0x80 or more) is given up at
once, and one that was in flight when the connection dropped MAX_DROPS times (a broker
that drops the client for it) is given up too; both are counted, and their jobs
acknowledged.

It also hands fleet jobs back: a busy agent republishes a job it cannot start soon to the
fleet topic and acknowledges its copy only once the broker has the new one, so Mosquitto's
plain round-robin cannot strand jobs behind a slow board (docs/delivery.md).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
from cachetools import LRUCache

from edge_agent.adapters.journal import Entry, Journal, Stored
from edge_agent.core.errors import StoreError
from edge_agent.core.metrics import Metrics
from edge_agent.core.protocol import CONTENT_TYPE, MAX_DEADLINE_S, Reply, fit_reply
from edge_agent.service.health import Beat

log = structlog.get_logger("edge_agent.outbox")

Ack = Callable[[], None]
# MQTT 5 PUBACK reason codes below 0x80 mean the broker took the message; 0x10 ("no
# matching subscribers") is accepted but nobody got it.
NO_MATCHING_SUBSCRIBERS = 0x10
# A spooled reply the link refuses this many times (it raised, not "not connected") is
# dropped, so no row can make every flush fail again after a restart.
MAX_SEND_FAILURES = 3
# A reply that was in flight when the connection dropped this many times is given up: a
# broker that drops the client for a message would otherwise get it after every reconnect.
MAX_DROPS = 3
# While the disk refuses the journal, it is tried again this often (seconds).
JOURNAL_RETRY_S = 5.0
_BATCH = 256


class Unsendable(Exception):
    """A reply that can never reach the broker: too large for any packet it takes, or one
    that dropped the connection MAX_DROPS times."""


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

    def payload_room(
        self,
        topic: str,
        *,
        qos: int = 1,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
        expiry_s: int | None = None,
    ) -> int:
        """The most payload bytes a message with these headers may carry."""


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


@dataclass(frozen=True)
class _Final:
    reply: Reply
    payload: bytes
    acks: tuple[Ack, ...]
    memo: Memo | None


@dataclass(frozen=True)
class _Progress:
    reply: Reply


@dataclass(frozen=True)
class _Resend:
    stored: Stored
    correlation_data: bytes | None


@dataclass(frozen=True)
class _HandBack:
    job: Handoff
    ack: Ack
    undo: Callable[[], None]


@dataclass(frozen=True)
class _Settle:
    mid: int
    reason: int


@dataclass(frozen=True)
class _Flush:
    pass


@dataclass(frozen=True)
class _Lost:
    """The connection dropped: what was in flight will not be acknowledged."""


_Work = _Final | _Progress | _Resend | _HandBack | _Settle | _Flush | _Lost


class Outbox:
    def __init__(
        self,
        link: Publisher,
        journal: Journal,
        metrics: Metrics,
        beat: Beat | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link = link
        self.journal = journal
        self.metrics = metrics
        self.beat = beat
        self.clock = clock  # monotonic seconds, as the jobs' deadlines are
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Keys of remembered replies handed over but not yet committed: the intake waits
        # for them before it looks the key up in the journal (docs/architecture.md).
        self._uncommitted: dict[str, int] = {}
        self._uncommitted_lock = threading.Lock()
        # Owned by the outbox thread only:
        self._rows: dict[int, int] = {}  # paho mid -> journal row, for replies in flight
        self._acks: dict[int, tuple[Ack, ...]] = {}  # mid of an unjournaled reply -> acks
        self._handoffs: dict[int, tuple[Ack, Callable[[], None]]] = {}  # mid -> (ack, undo)
        self._send_failures: dict[int, int] = {}  # journal row -> times the link raised
        self._keys: dict[int, str] = {}  # mid of a reply in flight -> its reply key
        # reply key -> connections that dropped while it was in flight
        self._drops: LRUCache[str, int] = LRUCache(maxsize=1024)
        self._undurable: list[tuple[Ack, ...]] = []  # acks waiting for a journal sync
        self._idle = threading.Condition()
        self._busy = 0
        self._journal_tried = 0.0

    # ---- the thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what was handed over (a clean stop loses no reply), then end the thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            try:
                wait = JOURNAL_RETRY_S if self.journal.problem is not None else None
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                self._retry_journal()
                continue
            if item is None:
                return
            batch: list[_Work] = [item]
            stop = False
            while len(batch) < _BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            if self.beat is not None:
                self.beat.busy()
            try:
                self._process(batch)
            except Exception:  # one bad batch must not end the outbox
                log.exception("outbox.batch_failed", items=len(batch))
                if self.beat is not None:
                    self.beat.error()
            finally:
                if self.beat is not None:
                    self.beat.idle()
                with self._idle:
                    self._busy -= len(batch)
                    self._idle.notify_all()
            if stop:
                return
            if self.journal.problem is not None:
                self._retry_journal()

    def _retry_journal(self) -> None:
        """The disk refused the journal: every JOURNAL_RETRY_S, try it again; once it takes
        what was kept in memory, send what waits (it may have waited on disk all along)."""
        now = time.monotonic()
        if now - self._journal_tried < JOURNAL_RETRY_S:
            return
        self._journal_tried = now
        try:
            if self.journal.retry() and self.link.connected:
                self._flush()
        except Exception:  # the retry must never end the outbox
            log.exception("journal.retry_failed")

    def _put(self, work: _Work) -> None:
        with self._idle:
            self._busy += 1
        self._queue.put(work)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything handed over so far is processed (tests, shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    # ---- handing work over (any thread) -------------------------------------------------

    def deliver(self, reply: Reply, acks: Ack | Sequence[Ack], memo: Memo | None = None) -> None:
        """Get the reply out, and acknowledge the job's delivery (or deliveries) only once
        the reply is safe: on its PUBACK, or once it is on disk while the broker is away.
        A reply with a `memo` key is also remembered (the dedup memory)."""
        ack_list = (acks,) if callable(acks) else tuple(acks)
        if memo is not None and memo.key is not None:
            with self._uncommitted_lock:
                self._uncommitted[memo.key] = self._uncommitted.get(memo.key, 0) + 1
        self._put(_Final(reply, reply.encode(), ack_list, memo))

    def notify(self, reply: Reply) -> None:
        """Progress messages (accepted, running): best effort, never journaled."""
        self._put(_Progress(reply))

    def resend(self, stored: Stored, correlation_data: bytes | None) -> None:
        """Publish a stored reply again (a requester retried a job already answered)."""
        self._put(_Resend(stored, correlation_data))

    def hand_back(self, job: Handoff, ack: Ack, undo: Callable[[], None]) -> None:
        """Republish `job`; its original is acknowledged once the broker has the copy.

        `undo` runs instead (on the outbox thread) if the copy cannot be published, the
        broker refuses it or nobody was subscribed, so the job is then kept here.
        """
        self._put(_HandBack(job, ack, undo))

    def flush(self) -> None:
        """Publish what waited in the journal, oldest first (after each connect)."""
        self._put(_Flush())

    def on_published(self, mid: int, reason: int) -> None:
        """paho's thread: hand the acknowledgement over and return at once."""
        self._put(_Settle(mid, reason))

    def on_link_lost(self) -> None:
        """paho's thread: the connection dropped; what was in flight is sent again (from
        the journal) after the reconnect, or its job redelivered by the broker."""
        self._put(_Lost())

    def uncommitted(self, key: str) -> bool:
        """A remembered reply with this key was handed over and is not in the journal yet."""
        with self._uncommitted_lock:
            return key in self._uncommitted

    # ---- the work (outbox thread) -----------------------------------------------------

    def _process(self, batch: list[_Work]) -> None:
        finals = [w for w in batch if isinstance(w, _Final)]
        rows, durable = self._store(finals)
        delivered: list[int] = []
        for work in batch:
            try:
                if isinstance(work, _Final):
                    self._send_final(work, rows.get(id(work)), durable)
                elif isinstance(work, _Progress):
                    self._publish_best_effort(work.reply.route.topic, work.reply.encode(),
                                              work.reply.route.correlation_data, None)  # fmt: skip
                elif isinstance(work, _Resend):
                    s = work.stored
                    self._publish_best_effort(s.topic, s.payload, work.correlation_data, s.deadline)
                elif isinstance(work, _Lost):
                    self._lost()
                elif isinstance(work, _HandBack):
                    self._hand_back(work)
                elif isinstance(work, _Settle):
                    row = self._settle(work.mid, work.reason)
                    if row is not None:
                        delivered.append(row)
                else:
                    self._flush()
            except Exception:  # one item must not cost the others their replies
                log.exception("outbox.item_failed", item=type(work).__name__)
                if self.beat is not None:
                    self.beat.error()
        self._make_durable()
        if delivered:
            try:
                self.journal.mark_delivered(delivered)
            except StoreError as exc:
                log.error("journal.write_failed", error=str(exc), delivered=len(delivered))

    def _store(self, finals: list[_Final]) -> tuple[dict[int, int], bool]:
        """Put the batch's replies in the journal, in one transaction: those to remember
        (the dedup memory) and, while the broker is away, all of them (the spool). Only
        the spool needs an fsync before its jobs are acknowledged: a reply the broker has
        acknowledged is safe there, and the job is acknowledged on that PUBACK. Returns the
        rows, and whether they were committed with an fsync."""
        connected = self.link.connected
        to_store = [f for f in finals if not connected or _remembered(f)]
        if not to_store:
            return {}, False
        try:
            stored = self.journal.record_many([_entry(f) for f in to_store], durable=not connected)
            return {id(f): row for f, row in zip(to_store, stored, strict=True)}, not connected
        except StoreError as exc:
            # The disk refused (full, failing): answer anyway, acknowledged on the broker's
            # PUBACK like a rejection; only the memory of the answer is lost.
            log.error("journal.write_failed", error=str(exc), replies=len(to_store))
            self.metrics.bump("journal_write_errors")
            return {}, False
        finally:
            self._forget_uncommitted(to_store)

    def _make_durable(self) -> None:
        """Replies stored without an fsync whose publish failed (the link went away during
        the batch): sync them before their jobs are acknowledged."""
        if not self._undurable:
            return
        waiting, self._undurable = self._undurable, []
        try:
            self.journal.sync()
        except StoreError as exc:
            log.error("journal.write_failed", error=str(exc), replies=len(waiting))
            self.metrics.bump("journal_write_errors")
        for acks in waiting:
            _ack_all(acks)

    def _forget_uncommitted(self, finals: list[_Final]) -> None:
        with self._uncommitted_lock:
            for f in finals:
                key = f.memo.key if f.memo is not None else None
                if key is None:
                    continue
                left = self._uncommitted.get(key, 0) - 1
                if left > 0:
                    self._uncommitted[key] = left
                else:
                    self._uncommitted.pop(key, None)

    def _send_final(self, final: _Final, row: int | None, durable: bool) -> None:
        reply = final.reply
        deadline = final.memo.deadline if final.memo else None
        topic, correlation = reply.route.topic, reply.route.correlation_data
        if row is not None:
            # In the journal: publish, and acknowledge the job on the PUBACK; if it cannot
            # go out now it waits in the spool, and the job is acknowledged once the spool
            # is on disk.
            if self._send_row(
                row, topic, final.payload, correlation, deadline, final.acks, reply.job_id
            ):
                return
            if durable:
                _ack_all(final.acks)
            else:
                self._undurable.append(final.acks)
            return
        try:
            mid = self._publish(topic, final.payload, correlation, deadline)
        except Unsendable as exc:
            self._give_up(None, topic, reply.job_id, str(exc))
            _ack_all(final.acks)  # it can never go out: never hold the job for it
            return
        if mid is not None:
            self._acks[mid] = final.acks  # acknowledged on the reply's PUBACK
            return
        # Not connected (or the link refused it) and not journaled: store it now.
        try:
            (row,) = self.journal.record_many([_entry(final)])
        except StoreError as exc:
            log.error("journal.write_failed", error=str(exc), replies=1)
            self.metrics.bump("journal_write_errors")
            _ack_all(final.acks)  # nowhere to keep it: never block the session for it
            self.metrics.bump("replies_lost")
            return
        _ack_all(final.acks)
        self._send_row(row, topic, final.payload, correlation, deadline, job_id=reply.job_id)

    def _send_row(
        self,
        row: int,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
        deadline: float | None,
        acks: tuple[Ack, ...] = (),
        job_id: str | None = None,
    ) -> bool:
        """Publish a journaled reply (`acks`: its job's, to run on the PUBACK); False when
        it must wait for the next connect (and `acks` were not taken)."""
        try:
            mid = self._publish(topic, payload, correlation, deadline, strict=True)
        except Unsendable as exc:
            self._give_up(row, topic, job_id, str(exc))
            if acks:
                _ack_all(acks)
            return True
        except Exception:  # the link refused this very message
            failures = self._send_failures.get(row, 0) + 1
            self._send_failures[row] = failures
            log.exception("reply.publish_failed", row=row, attempt=failures, job_id=job_id)
            if failures >= MAX_SEND_FAILURES:
                log.error("reply.dropped_unsendable", row=row, topic=topic, job_id=job_id)
                self.journal.drop(row, "unsendable")
                self._send_failures.pop(row, None)
            if acks:  # it is in the journal: never hold the job's delivery for it
                self._undurable.append(acks)
            return True  # not a reason to stop the flush
        if mid is None:
            return False  # stays pending in the journal until the next connect
        self._send_failures.pop(row, None)
        self._rows[mid] = row
        if acks:
            self._acks[mid] = acks
        return True

    def _publish(
        self,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
        deadline: float | None,
        *,
        strict: bool = False,
    ) -> int | None:
        """Publish a reply at QoS 1, fitted to the connection's packet limit; None when
        not connected. Raises Unsendable for a reply that can never go out. With `strict`,
        what else the link raises is raised; otherwise it is logged and the message counts
        as not sent."""
        key = _reply_key(topic, payload)
        if self._drops.get(key, 0) >= MAX_DROPS:
            raise Unsendable(f"the connection dropped {MAX_DROPS} times while it was in flight")
        expiry = None
        if deadline is not None:
            expiry = reply_expiry(deadline, self.clock())
        if not self.link.connected:
            return None
        room = self.link.payload_room(
            topic, qos=1, correlation_data=correlation, content_type=CONTENT_TYPE, expiry_s=expiry
        )
        fitted = fit_reply(payload, room)
        if fitted is None:
            raise Unsendable(f"even its shortest form is over the broker's limit ({room} bytes)")
        if fitted is not payload:
            self.metrics.bump("replies_too_large")
            log.warning("reply.too_large", topic=topic, bytes=len(payload), room=room)
        try:
            mid = self.link.publish(
                topic,
                fitted,
                qos=1,
                correlation_data=correlation,
                content_type=CONTENT_TYPE,
                expiry_s=expiry,
            )
        except Exception:
            if strict:
                raise
            log.exception("reply.publish_failed", topic=topic)
            return None
        if mid is not None:
            self._keys[mid] = key
        return mid

    def _publish_best_effort(
        self, topic: str, payload: bytes, correlation: bytes | None, deadline: float | None
    ) -> None:
        """Progress messages and resent replies: nothing waits for them."""
        try:
            self._publish(topic, payload, correlation, deadline)
        except Unsendable as exc:
            log.warning("reply.not_sent", topic=topic, reason=str(exc))

    def _give_up(self, row: int | None, topic: str, job_id: str | None, why: str) -> None:
        """A reply that can never go out: counted, and out of the spool (a remembered one
        stays remembered, so a redelivery of its job is not run again)."""
        log.error("reply.given_up", job_id=job_id, topic=topic, reason=why, row=row)
        self.metrics.bump("replies_given_up")
        if row is not None:
            self._send_failures.pop(row, None)
            try:
                self.journal.mark_delivered([row])
            except StoreError as exc:
                log.error("journal.write_failed", error=str(exc), row=row)

    def _lost(self) -> None:
        """The connection dropped. Nothing in flight will be acknowledged on it: journaled
        replies are pending again (the flush after the reconnect sends them), the jobs of
        the others are redelivered by the broker (their acknowledgements were never sent),
        and a handed-back job stays with the broker too. Each reply in flight counts one
        drop against it."""
        for mid in {*self._rows, *self._acks}:
            key = self._keys.get(mid)
            if key is not None:
                self._drops[key] = self._drops.get(key, 0) + 1
        self._rows.clear()
        self._acks.clear()
        self._keys.clear()
        self._handoffs.clear()

    def _flush(self) -> None:
        sent = 0
        tried: set[int] = set()
        now = self.clock()
        while self.link.connected:
            batch = self.journal.pending(limit=200, exclude=[*self._rows.values(), *tried])
            if not batch:
                break
            for stored in batch:
                tried.add(stored.row)
                if stored.deadline is not None and stored.deadline < now:
                    log.info("reply.expired_in_spool", row=stored.row, job_id=stored.job_id)
                    self.journal.drop(stored.row, "expired")
                    continue
                if not self._send_row(
                    stored.row,
                    stored.topic,
                    stored.payload,
                    stored.correlation,
                    stored.deadline,
                    job_id=stored.job_id,
                ):
                    return
                sent += 1
        if sent:
            log.info("spool.flushed", replies=sent)

    def _hand_back(self, work: _HandBack) -> None:
        job = work.job
        expiry = None
        if job.deadline is not None:
            expiry = int(job.deadline - self.clock())
            if expiry < 1:
                work.undo()
                return
            expiry = min(expiry, MAX_DEADLINE_S)
        try:
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
        except Exception:
            log.exception("job.handback_failed")
            mid = None
        if mid is None:
            work.undo()
            return
        self._handoffs[mid] = (work.ack, work.undo)

    def _settle(self, mid: int, reason: int) -> int | None:
        """A PUBACK: the journal row it settles, if any. A reply the broker refused is
        given up (counted): sending it again would be refused again."""
        row = self._rows.pop(mid, None)
        handoff = self._handoffs.pop(mid, None)
        acks = self._acks.pop(mid, None)
        key = self._keys.pop(mid, None)
        if key is not None:
            self._drops.pop(key, None)
        if acks is not None:
            _ack_all(acks)
        if key is not None and reason >= 0x80:
            log.warning("reply.refused_by_broker", reason=hex(reason), row=row)
            self.metrics.bump("replies_refused")
        if handoff is not None:
            ack, undo = handoff
            if reason >= 0x80 or reason == NO_MATCHING_SUBSCRIBERS:
                log.warning("job.handback_failed", reason=hex(reason))
                undo()
            else:
                ack()
        return row


def reply_expiry(deadline: float, now: float) -> int:
    """The Message Expiry of a reply: what is left of its job's deadline, in whole seconds,
    at least 1 (0 would mean none) and at most MAX_DEADLINE_S."""
    return int(min(max(1.0, deadline - now), float(MAX_DEADLINE_S)))


def _reply_key(topic: str, payload: bytes) -> str:
    """What tells one reply from another, for counting the drops it caused."""
    digest = hashlib.blake2b(payload, digest_size=16)
    digest.update(topic.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _remembered(final: _Final) -> bool:
    return final.memo is not None and final.memo.key is not None


def _entry(final: _Final) -> Entry:
    reply, memo = final.reply, final.memo
    return Entry(
        key=memo.key if memo else None,
        digest=memo.digest if memo else None,
        job_id=reply.job_id,
        status=str(reply.status),
        topic=reply.route.topic,
        payload=final.payload,
        correlation=reply.route.correlation_data,
        deadline=memo.deadline if memo else None,
    )


def _ack_all(acks: Sequence[Ack]) -> None:
    for ack in acks:
        try:
            ack()
        except Exception:  # an ack that fails is the link's business; the others go on
            log.exception("job.ack_failed")
