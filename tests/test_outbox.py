"""The outbox with a real journal and an owned fake of the MQTT link: what is acknowledged
when, what waits in the spool, and hand-back settlement."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.adapters.journal import Journal, job_key
from edge_agent.core.errors import Code
from edge_agent.core.metrics import Metrics
from edge_agent.core.protocol import MAX_DEADLINE_S, Reply, ReplyRoute, Status
from edge_agent.core.wire import ClassifyResult
from edge_agent.service.outbox import (
    MAX_DROPS,
    MAX_SEND_FAILURES,
    Handoff,
    Memo,
    Outbox,
    reply_expiry,
)


@dataclass
class FakeLink:
    """Records publishes; `connected` is switched by the test; mids count up like paho's.
    `refuse` holds topics whose publish raises (as paho does for a value it cannot send)."""

    connected: bool = True
    sent: list[dict[str, Any]] = field(default_factory=list)
    next_mid: int = 0
    refuse: set[str] = field(default_factory=set)
    room: int = 1 << 20  # payload bytes a message may carry (the broker's packet limit)

    def payload_room(self, topic: str, **_kw: Any) -> int:
        return self.room - len(topic)

    def publish(self, topic: str, payload: bytes, **kw: Any) -> int | None:
        if not self.connected:
            return None
        if topic in self.refuse:
            raise ValueError("scripted: the link cannot send this")
        self.next_mid += 1
        self.sent.append({"topic": topic, "payload": payload, "mid": self.next_mid, **kw})
        return self.next_mid


def reply(job_id: str, status: Status = Status.DONE) -> Reply:
    return Reply(
        job_id=job_id,
        status=status,
        device="d",
        route=ReplyRoute(topic=f"r/{job_id}", correlation_data=b"c"),
        error_code=None if status == Status.DONE else Code.BAD_JSON,
    )


class Clock:
    """Monotonic time the test moves forward instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def make(tmp_path: Path, clock: Clock | None = None) -> tuple[Outbox, FakeLink, Journal]:
    link = FakeLink()
    clock = clock or Clock()
    journal = Journal(tmp_path / "j.db", dedup_window_s=60, spool_max=100, mono=clock)
    outbox = Outbox(link, journal, Metrics(), clock=clock)
    outbox.start()
    return outbox, link, journal


def test_a_reply_to_remember_is_journaled_and_its_job_acked_when_the_broker_has_it(
    tmp_path: Path,
) -> None:
    outbox, link, journal = make(tmp_path)
    acked: list[str] = []
    key = job_key("a", "r/a")
    outbox.deliver(reply("a"), lambda: acked.append("a"), Memo(key, "d", None))
    assert outbox.uncommitted(key)  # handed over: the intake waits before looking it up
    assert outbox.drain()
    assert not outbox.uncommitted(key)
    assert journal.counts()["spool_pending"] == 1  # remembered, not yet acknowledged
    assert acked == []  # not safe yet: neither on the broker nor fsynced
    assert link.sent[0]["correlation_data"] == b"c"
    outbox.on_published(link.sent[0]["mid"], 0)
    assert outbox.drain()
    assert acked == ["a"]
    counts = journal.counts()
    assert (counts["spool_pending"], counts["remembered"]) == (0, 1)
    outbox.stop()


def test_a_rejection_is_acked_only_when_the_broker_has_it(tmp_path: Path) -> None:
    outbox, link, journal = make(tmp_path)
    acked: list[str] = []
    outbox.deliver(reply("bad", Status.REJECTED), lambda: acked.append("bad"))
    assert outbox.drain()
    assert acked == []
    assert journal.counts()["spool_pending"] == 0  # no fsync for a bad message
    outbox.on_published(link.sent[0]["mid"], 0)
    assert outbox.drain()
    assert acked == ["bad"]
    outbox.stop()


def test_every_delivery_of_a_job_is_acked_with_its_reply(tmp_path: Path) -> None:
    outbox, link, _ = make(tmp_path)
    acked: list[str] = []
    acks = [lambda: acked.append("first"), lambda: acked.append("redelivery")]
    outbox.deliver(reply("a"), acks, Memo(job_key("a", "r/a"), "d", None))
    assert outbox.drain()
    outbox.on_published(link.sent[0]["mid"], 0)
    assert outbox.drain()
    assert acked == ["first", "redelivery"]
    outbox.stop()


def test_offline_replies_wait_in_the_spool_and_go_out_oldest_first(tmp_path: Path) -> None:
    clock = Clock()
    outbox, link, journal = make(tmp_path, clock)
    link.connected = False
    acked: list[str] = []
    for name in ("one", "two"):
        outbox.deliver(
            reply(name), lambda n=name: acked.append(n), Memo(job_key(name, "r"), "d", None)
        )
    outbox.deliver(
        reply("late", Status.REJECTED),
        lambda: acked.append("late"),
        Memo(None, None, clock() + 60),
    )
    assert outbox.drain()
    assert acked == ["one", "two", "late"]  # all safe on disk: the broker may forget the jobs
    assert link.sent == []
    clock.offset += 61  # "late"'s deadline passes while offline
    link.connected = True
    outbox.flush()
    assert outbox.drain()
    assert [s["topic"] for s in link.sent] == ["r/one", "r/two"]
    assert journal.counts()["spool_dropped_expired"] == 1
    outbox.stop()


def test_a_far_future_deadline_gives_an_expiry_mqtt_can_carry() -> None:
    now = 1_000_000.0
    assert reply_expiry(now + 7.5e9, now) == MAX_DEADLINE_S
    assert reply_expiry(now - 10, now) == 1  # 0 would mean "never expires"
    assert reply_expiry(now + 90.7, now) == 90


def test_a_spooled_reply_the_link_keeps_refusing_is_dropped_and_the_rest_go_out(
    tmp_path: Path,
) -> None:
    # What issue 12 found: one journal row whose publish raised made every flush, after
    # every restart, fail. Such a row is now tried a few times and dropped.
    journal = Journal(tmp_path / "j.db", dedup_window_s=60, spool_max=100)
    for name in ("poison", "fine"):
        journal.record(key=job_key(name, "r"), digest="d", job_id=name, status="done",
                       topic=f"r/{name}", payload=b"{}", correlation=None,
                       deadline=None)  # fmt: skip
    link = FakeLink(refuse={"r/poison"})
    outbox = Outbox(link, journal, Metrics())
    outbox.start()
    for _ in range(MAX_SEND_FAILURES):  # a reconnect each time
        outbox.flush()
        assert outbox.drain()
    assert [s["topic"] for s in link.sent] == ["r/fine"]
    assert journal.counts()["spool_dropped_unsendable"] == 1
    assert [s.job_id for s in journal.pending()] == ["fine"]  # out, not yet acknowledged
    outbox.stop()


def test_a_reply_the_link_refuses_is_kept_and_the_job_acked(tmp_path: Path) -> None:
    outbox, link, journal = make(tmp_path)
    link.refuse.add("r/x")
    acked: list[str] = []
    outbox.deliver(reply("x"), lambda: acked.append("x"), Memo(job_key("x", "r/x"), "d", None))
    outbox.deliver(reply("y"), lambda: acked.append("y"), Memo(job_key("y", "r/y"), "d", None))
    assert outbox.drain()
    assert acked == ["x"]  # kept in the journal (synced): its job need not wait
    assert [s.job_id for s in journal.pending()] == ["x", "y"]
    assert [s["topic"] for s in link.sent] == ["r/y"]  # the one the link took went out
    outbox.on_published(link.sent[0]["mid"], 0)
    assert outbox.drain()
    assert acked == ["x", "y"]
    assert outbox.alive
    outbox.stop()


def test_while_the_broker_is_away_a_job_is_acked_once_its_reply_is_on_disk(
    tmp_path: Path,
) -> None:
    outbox, link, journal = make(tmp_path)
    link.connected = False
    acked: list[str] = []
    outbox.deliver(reply("z"), lambda: acked.append("z"), Memo(job_key("z", "r/z"), "d", None))
    assert outbox.drain()
    assert acked == ["z"]
    journal.close()  # as a power cut would: only what was committed counts
    again = Journal(tmp_path / "j.db", dedup_window_s=60, spool_max=100)
    assert [s.job_id for s in again.pending()] == ["z"]
    outbox.stop()


def test_hand_back_acks_the_original_only_after_the_copy_is_accepted(tmp_path: Path) -> None:
    outbox, link, _ = make(tmp_path)
    events: list[str] = []
    job = Handoff(
        topic="edge/jobs/classify",
        payload=b"{}",
        response_topic="r",
        correlation_data=b"x",
        deadline=None,
        hops=1,
    )
    outbox.hand_back(job, lambda: events.append("ack"), lambda: events.append("undo"))
    assert outbox.drain()
    assert link.sent[0]["user_properties"] == [("edge-hops", "1")]
    assert link.sent[0]["response_topic"] == "r"
    assert events == []
    outbox.on_published(link.sent[0]["mid"], 0)
    assert outbox.drain()
    assert events == ["ack"]
    outbox.hand_back(job, lambda: events.append("ack2"), lambda: events.append("undo2"))
    assert outbox.drain()
    outbox.on_published(link.sent[1]["mid"], 0x10)  # no matching subscribers: keep the job
    assert outbox.drain()
    assert events == ["ack", "undo2"]
    link.connected = False
    outbox.hand_back(job, lambda: events.append("ack3"), lambda: events.append("undo3"))
    assert outbox.drain()
    assert events == ["ack", "undo2", "undo3"]  # could not publish: kept here
    outbox.stop()


def big_reply(job_id: str, ignored: int) -> Reply:
    return Reply(
        job_id=job_id,
        status=Status.DONE,
        device="d",
        route=ReplyRoute(topic=f"r/{job_id}"),
        result=ClassifyResult(label="a", scores={"a": 1.0}, confidence=1.0),
        ignored=tuple(f"{i:03d}" + "ж" * 60 for i in range(ignored)),
    )


def test_a_reply_larger_than_the_broker_takes_goes_out_slimmed(tmp_path: Path) -> None:
    outbox, link, _ = make(tmp_path)
    link.room = 600
    acked: list[str] = []
    outbox.deliver(big_reply("w", ignored=16), lambda: acked.append("w"))
    assert outbox.drain()
    (sent,) = link.sent
    assert len(sent["payload"]) <= link.payload_room(sent["topic"])
    body = json.loads(sent["payload"])
    assert body["status"] == "done" and "ignored" not in body
    outbox.on_published(sent["mid"], 0)
    assert outbox.drain()
    assert acked == ["w"]
    assert outbox.metrics.snapshot()["counters"]["replies_too_large"] == 1
    outbox.stop()


def test_a_reply_that_fits_no_packet_is_given_up_and_its_job_acked(tmp_path: Path) -> None:
    outbox, link, journal = make(tmp_path)
    link.room = 40  # smaller than any reply
    acked: list[str] = []
    outbox.deliver(
        big_reply("t", 1), lambda: acked.append("t"), Memo(job_key("t", "r/t"), "d", None)
    )
    assert outbox.drain()
    assert link.sent == []
    assert acked == ["t"]  # never held: it can never go out
    assert journal.counts()["spool_pending"] == 0  # nor left pending in the spool
    assert outbox.metrics.snapshot()["counters"]["replies_given_up"] == 1
    outbox.stop()


def test_a_reply_in_flight_whenever_the_connection_drops_is_given_up(tmp_path: Path) -> None:
    # A broker that drops the client for a message would get it again after every
    # reconnect: after MAX_DROPS drops with it in flight, it is not sent again.
    outbox, link, journal = make(tmp_path)
    acked: list[str] = []
    outbox.deliver(reply("k"), lambda: acked.append("k"), Memo(job_key("k", "r/k"), "d", None))
    assert outbox.drain()
    for _ in range(MAX_DROPS):
        outbox.on_link_lost()  # dropped before the PUBACK
        outbox.flush()  # the reconnect: what is pending goes out again
        assert outbox.drain()
    assert len(link.sent) == MAX_DROPS
    assert journal.counts()["spool_pending"] == 0
    assert outbox.metrics.snapshot()["counters"]["replies_given_up"] == 1
    outbox.stop()


def test_a_reply_the_broker_refuses_is_counted_and_not_kept(tmp_path: Path) -> None:
    outbox, link, journal = make(tmp_path)
    acked: list[str] = []
    outbox.deliver(reply("n"), lambda: acked.append("n"), Memo(job_key("n", "r/n"), "d", None))
    assert outbox.drain()
    outbox.on_published(link.sent[0]["mid"], 0x87)  # not authorized
    assert outbox.drain()
    assert acked == ["n"]
    assert journal.counts()["spool_pending"] == 0
    assert outbox.metrics.snapshot()["counters"]["replies_refused"] == 1
    outbox.stop()
