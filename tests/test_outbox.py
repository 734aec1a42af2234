"""The outbox with a real journal and an owned fake of the MQTT link: what is acknowledged
when, what waits in the spool, and hand-back settlement."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import Code
from edge_agent.journal import Journal, job_key
from edge_agent.metrics import Metrics
from edge_agent.outbox import Handoff, Memo, Outbox
from edge_agent.protocol import Reply, ReplyRoute, Status


@dataclass
class FakeLink:
    """Records publishes; `connected` is switched by the test; mids count up like paho's."""

    connected: bool = True
    sent: list[dict[str, Any]] = field(default_factory=list)
    next_mid: int = 0

    def publish(self, topic: str, payload: bytes, **kw: Any) -> int | None:
        if not self.connected:
            return None
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


def make(tmp_path: Path) -> tuple[Outbox, FakeLink, Journal]:
    link = FakeLink()
    journal = Journal(tmp_path / "j.db", dedup_window_s=60, spool_max=100)
    outbox = Outbox(link, journal, Metrics())
    outbox.start()
    return outbox, link, journal


def settle(outbox: Outbox) -> None:
    time.sleep(0.05)  # the settling thread runs acknowledgements asynchronously


def test_a_reply_to_remember_is_journaled_before_the_job_is_acked(tmp_path: Path) -> None:
    outbox, link, journal = make(tmp_path)
    order: list[str] = []

    def ack() -> None:
        order.append("ack" if journal.counts()["spool_pending"] == 1 else "ack-before-journal")

    outbox.deliver(reply("a"), ack, Memo(job_key("a", "r/a"), "d", None))
    assert order == ["ack"]
    assert link.sent[0]["correlation_data"] == b"c"
    outbox.on_published(link.sent[0]["mid"], 0)
    settle(outbox)
    assert journal.counts() == {
        "spool_pending": 0,
        "remembered": 1,
        "spool_dropped_full": 0,
        "spool_dropped_expired": 0,
    }
    outbox.stop()


def test_a_rejection_is_acked_only_when_the_broker_has_it(tmp_path: Path) -> None:
    outbox, link, journal = make(tmp_path)
    acked: list[str] = []
    outbox.deliver(reply("bad", Status.REJECTED), lambda: acked.append("bad"))
    assert acked == []
    assert journal.counts()["spool_pending"] == 0  # no fsync for a bad message
    outbox.on_published(link.sent[0]["mid"], 0)
    settle(outbox)
    assert acked == ["bad"]
    outbox.stop()


def test_offline_replies_wait_in_the_spool_and_go_out_oldest_first(tmp_path: Path) -> None:
    outbox, link, journal = make(tmp_path)
    link.connected = False
    acked: list[str] = []
    for name in ("one", "two"):
        outbox.deliver(
            reply(name), lambda n=name: acked.append(n), Memo(job_key(name, "r"), "d", None)
        )
    outbox.deliver(
        reply("late", Status.REJECTED),
        lambda: acked.append("late"),
        Memo(None, None, time.time() + 0.05),
    )
    assert acked == ["one", "two", "late"]  # all safe on disk: the broker may forget the jobs
    assert link.sent == []
    time.sleep(0.1)  # "late"'s deadline passes while offline
    link.connected = True
    assert outbox.flush() == 2
    assert [s["topic"] for s in link.sent] == ["r/one", "r/two"]
    assert journal.counts()["spool_dropped_expired"] == 1
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
    assert outbox.hand_back(job, lambda: events.append("ack"), lambda: events.append("undo"))
    assert link.sent[0]["user_properties"] == [("edge-hops", "1")]
    assert link.sent[0]["response_topic"] == "r"
    assert events == []
    outbox.on_published(link.sent[0]["mid"], 0)
    settle(outbox)
    assert events == ["ack"]
    assert outbox.hand_back(job, lambda: events.append("ack2"), lambda: events.append("undo2"))
    outbox.on_published(link.sent[1]["mid"], 0x10)  # no matching subscribers: keep the job
    settle(outbox)
    assert events == ["ack", "undo2"]
    outbox.stop()
