"""Intake and worker together: queue order, overload, deadlines, cancel, failures,
duplicates and hand-back, on an owned fake engine and a recording outbox. Messages go in
through `Intake.submit`, as paho's thread hands them over."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.adapters.journal import Journal, RunningMarker
from edge_agent.adapters.mqtt import Incoming
from edge_agent.core.errors import Code
from edge_agent.core.fairness import ShapeBudget
from edge_agent.core.inference import (
    Task,
)
from edge_agent.core.metrics import Metrics
from edge_agent.core.protocol import Delivery, JobLimits, Reply, Status, parse_job
from edge_agent.service.intake import Handing, Intake
from edge_agent.service.outbox import Memo
from edge_agent.service.runner import JobRunner
from edge_agent.service.worker import Worker
from tests.harness.fakes import MODEL, TOPICS, FakeEngine, RecordingOutbox


@dataclass
class Pipeline:
    intake: Intake
    worker: Worker
    outbox: RecordingOutbox
    engine: FakeEngine

    def stop(self) -> None:
        """Everything submitted so far is read, and the running job finished."""
        self.intake.stop()
        self.worker.stop()


class Clock:
    """Monotonic time the test moves forward instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def make(
    engine: FakeEngine,
    *,
    max_queue: int = 8,
    journal: Journal | None = None,
    handing: Handing | None = None,
    clock: Clock | None = None,
    parallel: int = 1,
    suspects: set[str] | None = None,
    shapes: ShapeBudget | None = None,
    marker: RunningMarker | None = None,
) -> Pipeline:
    outbox = RecordingOutbox()
    metrics = Metrics()
    engine.capacity = parallel
    worker = Worker(
        JobRunner(engine),
        outbox,
        metrics,
        topics=TOPICS,
        model=MODEL,
        max_queue=max_queue,
        suspects=suspects,
        clock=clock or Clock(),
        marker=marker,
    )
    intake = Intake(
        topics=TOPICS,
        limits=JobLimits(),
        worker=worker,
        outbox=outbox,
        metrics=metrics,
        model=MODEL,
        journal=journal,
        handing=handing or Handing(enabled=False),
        shape=worker.runner.shape,
        shapes=shapes,
    )
    worker.start()
    intake.start()
    return Pipeline(intake, worker, outbox, engine)


def send(p: Pipeline, body: dict[str, Any], kind: str = "classify", **kw: Any) -> None:
    """A job as paho would hand it over; its ack records the job's id (or `ack_as`)."""
    full = {"labels": ["a", "b"], "text": body.get("id"), **body}
    if kind == "extract":
        full.pop("labels")
        full["schema"] = {"type": "object", "properties": {"v": {"type": "integer"}}}
    payload = kw.pop("payload", None) or json.dumps(full).encode()
    name = kw.pop("ack_as", body.get("id"))
    incoming = Incoming(
        topic=kw.pop("topic", f"edge/jobs/{kind}"),
        payload=payload,
        qos=1,
        retain=kw.pop("retain", False),
        response_topic=kw.pop("response_topic", None),
        correlation_data=kw.pop("correlation_data", None),
        expiry_s=kw.pop("expiry_s", None),
        dup=kw.pop("dup", False),
        user_properties=kw.pop("user_properties", ()),
        received_at=time.monotonic(),
        wall_at=time.time(),
    )
    assert not kw, kw

    def ack() -> None:
        with p.outbox.cond:
            p.outbox.acks.append(str(name))
            p.outbox.cond.notify_all()

    p.intake.submit(incoming, ack)


def test_done_reply_carries_result_model_and_timings() -> None:
    p = make(FakeEngine())
    send(p, {"id": "j1"})
    send(p, {"id": "j2"}, kind="extract")
    replies = {r.job_id: r.to_dict() for r in p.outbox.wait(2)}
    p.stop()
    assert replies["j1"]["result"] == {
        "label": "a",
        "scores": {"a": 1.0, "b": 0.0},
        "confidence": 1.0,
    }
    assert replies["j2"]["result"] == {"data": {"v": 1}, "confidence": {"v": 0.875}}
    assert replies["j2"]["model"] == {"name": "fake", "quant": "Q0", "sha256": None}
    assert replies["j2"]["timings"]["tokens_per_second"] == 2500.0
    assert sorted(p.outbox.acks) == ["j1", "j2"]


def test_higher_priority_runs_first() -> None:
    gate = threading.Event()
    p = make(FakeEngine(gate=gate))
    send(p, {"id": "first"})
    p.engine.wait_running("first")  # now blocked on the gate
    for i, prio in enumerate([1, 9, 5]):
        send(p, {"id": f"p{prio}-{i}", "priority": prio})
    p.intake.stop()  # all three read and queued behind "first"
    gate.set()
    p.outbox.wait(4)
    p.worker.stop()
    assert p.engine.seen == ["first", "p9-1", "p5-2", "p1-0"]


def test_full_queue_rejects_with_retry_after() -> None:
    gate = threading.Event()
    p = make(FakeEngine(gate=gate), max_queue=2)
    send(p, {"id": "j0"})
    p.engine.wait_running("j0")
    for i in range(1, 4):
        send(p, {"id": f"j{i}"})
    rejected = p.outbox.wait(1)
    assert [r.job_id for r in rejected] == ["j3"]
    body = rejected[0].to_dict()
    assert body["status"] == "rejected"
    assert body["error"]["code"] == "overloaded"
    assert body["error"]["retry_after_ms"] > 0
    gate.set()
    p.outbox.wait(4)
    p.stop()
    assert sorted(p.outbox.acks) == ["j0", "j1", "j2", "j3"]


def test_job_expired_in_the_queue_is_not_run() -> None:
    gate, clock = threading.Event(), Clock()
    p = make(FakeEngine(gate=gate), clock=clock)
    send(p, {"id": "blocker"})
    p.engine.wait_running("blocker")
    send(p, {"id": "late", "ttl_ms": 30_000})
    p.intake.stop()
    clock.offset += 31  # the job's own 30 s deadline passes while it waits
    gate.set()
    replies = {r.job_id: r.to_dict() for r in p.outbox.wait(2)}
    p.worker.stop()
    assert replies["late"]["status"] == "expired"
    assert replies["late"]["error"]["code"] == "deadline_exceeded"
    assert "late" not in p.engine.seen


def test_a_job_whose_message_expiry_ran_out_in_the_queue_is_not_run() -> None:
    gate, clock = threading.Event(), Clock()
    p = make(FakeEngine(gate=gate), clock=clock)
    send(p, {"id": "blocker"})
    p.engine.wait_running("blocker")
    send(p, {"id": "mqtt-expiry"}, expiry_s=60)
    p.intake.stop()
    clock.offset += 61  # the MQTT 5 Message Expiry (60 s) runs out while it waits
    gate.set()
    replies = {r.job_id: r.to_dict() for r in p.outbox.wait(2)}
    p.worker.stop()
    assert replies["mqtt-expiry"]["status"] == "expired"
    assert "mqtt-expiry" not in p.engine.seen


def test_running_job_past_its_deadline_stops() -> None:
    p = make(FakeEngine(delay=5.0))
    t0 = time.monotonic()
    send(p, {"id": "slow", "ttl_ms": 100})
    reply = p.outbox.wait(1)[0].to_dict()
    p.stop()
    assert reply["status"] == "expired"
    assert time.monotonic() - t0 < 2.0


def test_cancel_a_queued_and_a_running_job_only_with_its_reply_topic() -> None:
    gate = threading.Event()
    p = make(FakeEngine(gate=gate))
    send(p, {"id": "running"})
    p.engine.wait_running("running")
    send(p, {"id": "queued"}, response_topic="edge/replies/s")
    p.intake.stop()
    results = TOPICS.results()
    assert not p.worker.cancel("queued", results)  # not its reply topic: someone else's
    assert p.worker.cancel("queued", "edge/replies/s")
    assert p.worker.cancel("running", results)
    assert not p.worker.cancel("unknown", results)
    replies = {r.job_id: r.to_dict() for r in p.outbox.wait(2)}
    p.worker.stop()
    assert replies["queued"]["status"] == "cancelled"
    assert replies["running"]["status"] == "cancelled"
    assert sorted(p.outbox.acks) == ["queued", "running"]


def test_a_cancel_message_names_the_job_by_id_and_reply_topic() -> None:
    gate = threading.Event()
    p = make(FakeEngine(gate=gate))
    send(p, {"id": "mine"}, response_topic="edge/replies/a")
    p.engine.wait_running("mine")
    cancel = json.dumps({"id": "mine"}).encode()
    send(p, {}, topic="edge/jobs/cancel", payload=cancel, ack_as="c1")  # no reply topic
    send(p, {}, topic="edge/jobs/cancel", payload=cancel, response_topic="edge/replies/b",
         ack_as="c2")  # fmt: skip
    p.outbox.wait_acks(2)
    assert p.outbox.replies == []  # neither matched the job's key
    send(p, {}, topic="edge/jobs/cancel", payload=cancel, response_topic="edge/replies/a",
         ack_as="c3")  # fmt: skip
    reply = p.outbox.wait(1)[0]
    p.stop()
    assert reply.status == Status.CANCELLED
    assert sorted(p.outbox.acks) == ["c1", "c2", "c3", "mine"]


def test_engine_failure_is_a_failed_reply_and_the_worker_goes_on() -> None:
    p = make(FakeEngine(fail_on={"bad"}))
    send(p, {"id": "bad"})
    send(p, {"id": "good"})
    replies = {r.job_id: r.to_dict() for r in p.outbox.wait(2)}
    p.stop()
    assert replies["bad"]["status"] == "failed"
    assert replies["bad"]["error"]["code"] == "inference_error"
    assert replies["good"]["status"] == "done"


def test_bad_payload_is_rejected_and_acknowledged() -> None:
    p = make(FakeEngine())
    send(p, {}, payload=b"\x00garbage", ack_as="x")
    reply = p.outbox.wait(1)[0].to_dict()
    p.stop()
    assert reply["status"] == "rejected"
    assert reply["error"]["code"] == "bad_json"
    assert p.outbox.acks == ["x"]


def test_a_hops_property_that_is_not_a_small_number_counts_as_none() -> None:
    p = make(FakeEngine())
    for i, value in enumerate(["\u00b2", "-1", "99999", "", "\U0001d7d9", "3"]):
        send(p, {"id": f"h{i}"}, user_properties=[("edge-hops", value)])
    p.outbox.wait(6)
    p.stop()
    assert {r.status for r in p.outbox.replies} == {Status.DONE}


def test_a_retained_job_is_refused_not_run() -> None:
    p = make(FakeEngine())
    send(p, {"id": "kept"}, retain=True)
    reply = p.outbox.wait(1)[0]
    p.stop()
    assert reply.error_code == Code.RETAINED_JOB
    assert p.engine.seen == []


def test_redelivered_job_in_flight_runs_once_and_both_deliveries_are_acked() -> None:
    gate = threading.Event()
    p = make(FakeEngine(gate=gate))
    send(p, {"id": "dup"})
    p.engine.wait_running("dup")
    send(p, {"id": "dup"})
    p.intake.stop()
    gate.set()
    p.outbox.wait(1)
    p.worker.stop()
    assert p.engine.seen == ["dup"]
    assert len(p.outbox.replies) == 1
    assert p.outbox.acks == ["dup", "dup"]


def send_as(p: Pipeline, body: dict[str, Any], correlation: bytes) -> None:
    """A classify job asking for its reply on edge/replies/s with this Correlation Data."""
    send(
        p,
        {"labels": ["a", "b"], **body},
        response_topic="edge/replies/s",
        correlation_data=correlation,
        ack_as=correlation.decode(),
    )


def test_a_retry_of_a_job_in_flight_gets_the_reply_too_and_it_runs_once() -> None:
    gate = threading.Event()
    p = make(FakeEngine(gate=gate))
    send_as(p, {"id": "r", "text": "t"}, b"first")
    p.engine.wait_running("t")
    send_as(p, {"id": "r", "text": "t"}, b"retry")  # new attempt, same job
    p.intake.stop()
    gate.set()
    replies = p.outbox.wait(2)
    p.worker.stop()
    assert p.engine.seen == ["t"]
    assert sorted(r.route.correlation_data or b"" for r in replies) == [b"first", b"retry"]
    assert {r.status for r in replies} == {Status.DONE}
    assert sorted(p.outbox.acks) == ["first", "retry"]


def test_a_different_job_under_an_id_in_flight_is_rejected_not_lost() -> None:
    gate = threading.Event()
    p = make(FakeEngine(gate=gate))
    send_as(p, {"id": "same", "text": "one"}, b"1")
    p.engine.wait_running("one")
    send_as(p, {"id": "same", "text": "two"}, b"2")
    rejected = p.outbox.wait(1)[0]
    assert rejected.status == Status.REJECTED
    assert rejected.error_code == Code.DUPLICATE_ID
    assert rejected.route.correlation_data == b"2"
    gate.set()
    done = p.outbox.wait(2)[1]
    p.stop()
    assert done.status == Status.DONE and done.route.correlation_data == b"1"
    assert p.engine.seen == ["one"]
    assert sorted(p.outbox.acks) == ["1", "2"]


def test_progress_messages_when_asked() -> None:
    p = make(FakeEngine())
    send(p, {"id": "p", "progress": True})
    p.outbox.wait(1)
    p.stop()
    assert [str(r.status) for r in p.outbox.progress] == ["accepted", "running"]


def journaled(tmp_path: Any, engine: FakeEngine, **kw: Any) -> tuple[Pipeline, Journal]:
    journal = Journal(tmp_path / "j.db", dedup_window_s=3600, spool_max=100)
    return make(engine, journal=journal, **kw), journal


def store(journal: Journal, reply: Reply, memo: Memo | None) -> int:
    """What the outbox does with a reply to remember."""
    assert memo is not None and memo.key is not None
    return journal.record(
        key=memo.key,
        digest=memo.digest,
        job_id=reply.job_id,
        status=str(reply.status),
        topic=reply.route.topic,
        payload=reply.encode(),
        correlation=reply.route.correlation_data,
        deadline=None,
    )


def test_a_retry_while_the_first_reply_awaits_its_puback_is_answered_too(tmp_path: Any) -> None:
    """Found by the 20,000-message fuzz campaign: a requester (MQTT 3.1.1, so no
    Correlation Data) that got its reply and sends the same job again before the agent has
    the broker's PUBACK for that reply was acknowledged and never answered."""
    p, journal = journaled(tmp_path, FakeEngine())
    send(p, {"id": "twice"})
    first = p.outbox.wait(1)[0]
    store(journal, first, p.outbox.memos[0])  # in the journal, not yet marked delivered
    send(p, {"id": "twice"})  # the same job, published again (not a DUP redelivery)
    send(p, {"id": "twice"}, dup=True)  # a broker redelivery still needs no second reply
    p.stop()
    assert p.engine.seen == ["twice"]
    assert len(p.outbox.resent) == 1 and p.outbox.resent[0].payload == first.encode()
    assert p.outbox.acks == ["twice", "twice", "twice"]


def test_a_job_that_ran_is_answered_from_the_journal_and_never_runs_twice(tmp_path: Any) -> None:
    p, journal = journaled(tmp_path, FakeEngine())
    send(p, {"id": "once"})
    first = p.outbox.wait(1)[0]
    journal.mark_delivered([store(journal, first, p.outbox.memos[0])])
    send(p, {"id": "once"}, dup=True)  # the broker redelivers: ack, no reply
    send(p, {"id": "once"})  # the requester retries: the stored reply again
    p.stop()
    assert p.engine.seen == ["once"]
    assert len(p.outbox.resent) == 1 and p.outbox.resent[0].payload == first.encode()
    assert p.outbox.acks == ["once", "once", "once"]


def test_same_id_with_a_different_payload_is_a_new_job(tmp_path: Any) -> None:
    p, journal = journaled(tmp_path, FakeEngine())
    send(p, {"id": "reused", "text": "first"})
    store(journal, p.outbox.wait(1)[0], p.outbox.memos[0])
    send(p, {"id": "reused", "text": "second"})
    p.outbox.wait(2)
    p.stop()
    assert p.engine.seen == ["first", "second"]


def test_a_job_that_crashed_the_agent_twice_is_answered_without_running(tmp_path: Any) -> None:
    p, journal = journaled(tmp_path, FakeEngine())
    body = {"labels": ["a", "b"], "text": "boom", "id": "boom"}
    payload = json.dumps(body).encode()
    from edge_agent.adapters.journal import payload_digest

    assert journal.note_crash(payload_digest(payload), "boom") == 1
    assert journal.note_crash(payload_digest(payload), "boom") == 2
    send(p, body, payload=payload)
    reply = p.outbox.wait(1)[0]
    p.stop()
    assert reply.status == Status.FAILED and reply.error_code == Code.JOB_CRASHED
    assert p.engine.seen == []
    assert p.outbox.acks == ["boom"]


def test_only_jobs_that_ran_are_remembered(tmp_path: Any) -> None:
    gate = threading.Event()
    p, _ = journaled(tmp_path, FakeEngine(gate=gate))
    p.worker.max_queue = 1
    send(p, {"id": "runs"})
    p.engine.wait_running("runs")
    send(p, {"id": "waits"})
    send(p, {"id": "overflow"})
    p.intake.stop()
    gate.set()
    replies = p.outbox.wait(3)
    p.worker.stop()
    memos = {r.job_id: m for r, m in zip(replies, p.outbox.memos, strict=True)}
    assert memos["overflow"] is None or memos["overflow"].key is None  # a retry must run
    assert memos["runs"] is not None and memos["runs"].key is not None


def test_busy_agent_hands_fleet_jobs_back(tmp_path: Any) -> None:
    gate = threading.Event()
    p, _ = journaled(tmp_path, FakeEngine(gate=gate), handing=Handing(keep=1, max_hops=3))
    send(p, {"id": "j1"})
    p.engine.wait_running("j1")
    send(p, {"id": "j2"})  # waits: 1 waiting now
    send(p, {"id": "j3"}, response_topic="r/1", correlation_data=b"c")
    send(p, {"id": "j4"}, user_properties=[("edge-hops", "3")])  # handed back enough: kept
    send(p, {"id": "j5"}, topic="edge/devices/pi-1/jobs/classify")  # for this device
    p.intake.stop()
    gate.set()
    p.outbox.wait(4)
    p.worker.stop()
    assert [h.hops for h in p.outbox.handed] == [1]
    handed = p.outbox.handed[0]
    assert (handed.topic, handed.response_topic, handed.correlation_data) == (
        "edge/jobs/classify",
        "r/1",
        b"c",
    )
    assert json.loads(handed.payload)["id"] == "j3"
    assert sorted(p.engine.seen) == ["j1", "j2", "j4", "j5"]


def bounce(p: Any, n: int) -> None:
    """The broker gives the n-th handed-back copy straight back to this agent."""
    copy = p.outbox.handed[n]
    hops = [("edge-hops", str(copy.hops))]
    send(p, json.loads(copy.payload), payload=copy.payload, user_properties=hops)


def test_hand_backs_that_keep_coming_back_pause_handing_back(tmp_path: Any) -> None:
    gate = threading.Event()
    p, _ = journaled(tmp_path, FakeEngine(gate=gate), handing=Handing(keep=0, max_hops=3))
    send(p, {"id": "j1"})
    p.engine.wait_running("j1")
    # A fleet of one: each copy comes straight back; after three in a row it stops.
    for n in range(3):
        send(p, {"id": f"j{n + 2}"})
        p.outbox.wait_acks(n + 1)  # handed back: its copy was taken, its original acked
        bounce(p, n)
    for i in range(5, 9):
        send(p, {"id": f"j{i}"})
    p.intake.stop()
    gate.set()
    p.outbox.wait(8)
    p.worker.stop()
    assert len(p.outbox.handed) == 3  # paused after three bounces: the rest were kept
    assert sorted(p.engine.seen) == [f"j{i}" for i in range(1, 9)]


def test_one_copy_coming_back_among_others_does_not_pause(tmp_path: Any) -> None:
    gate = threading.Event()
    p, _ = journaled(tmp_path, FakeEngine(gate=gate), handing=Handing(keep=0, max_hops=3))
    send(p, {"id": "j1"})
    p.engine.wait_running("j1")
    for n in range(3):
        send(p, {"id": f"j{n + 2}"})
        p.outbox.wait_acks(n + 1)
    bounce(p, 1)  # other members took j2 and j4; j3's copy came back by turn
    send(p, {"id": "j5"})
    p.outbox.wait_acks(4)  # j5 handed back too (j3's copy is queued, acked once answered)
    p.intake.stop()
    gate.set()
    p.worker.stop()
    # j5 was handed back too: one return among three is a fleet taking its share
    assert [json.loads(h.payload)["id"] for h in p.outbox.handed] == ["j2", "j3", "j4", "j5"]


# ---- several jobs at once (jobs.parallel) ----------------------------------------------


def test_parallel_jobs_share_steps_and_a_cancel_stops_only_its_own() -> None:
    engine = FakeEngine(delay=0.3)
    p = make(engine, parallel=3)
    for name in ("a", "b", "c"):
        send(p, {"id": name})
    for name in ("a", "b", "c"):
        engine.wait_running(name)
    assert p.worker.busy() == (True, 0)  # running, nothing waiting
    assert p.worker.cancel("b", TOPICS.results())
    replies = {r.job_id: r.to_dict()["status"] for r in p.outbox.wait(3)}
    p.worker.stop()
    assert replies == {"a": "done", "b": "cancelled", "c": "done"}
    assert any(sorted(step) == ["a", "b", "c"] for step in engine.steps), engine.steps[:3]


def test_the_running_marker_names_the_jobs_in_flight_and_is_cleared_when_none_runs() -> None:
    """Else every restart, clean or not, would count a crash against the last jobs."""

    class Marker:
        def __init__(self) -> None:
            self.calls: list[list[str]] = []

        def set_running(self, jobs: list[tuple[str, str]]) -> None:
            self.calls.append(sorted(job_id for _, job_id in jobs))

        def clear(self) -> None:
            self.calls.append([])

    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    p = make(engine, parallel=2)
    marker = Marker()
    p.worker.marker = marker  # type: ignore[assignment]
    for name in ("m1", "m2"):
        send(p, {"id": name})
    engine.wait_running("m2")
    gate.set()
    p.outbox.wait(2)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and marker.calls[-1:] != [[]]:
        time.sleep(0.01)
    p.worker.stop()
    assert ["m1", "m2"] in marker.calls
    assert marker.calls[-1] == []


def test_an_agent_running_one_job_is_busy_for_hand_back_with_slots_free() -> None:
    """A fleet job that joined the batch would share this board's cores; an idle member
    runs it alone (tests/test_chaos.py, the slowed member)."""
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    p = make(engine, parallel=3)
    assert p.worker.busy() == (False, 0)
    send(p, {"id": "only"})
    engine.wait_running("only")
    assert p.worker.busy() == (True, 0)
    gate.set()
    p.outbox.wait(1)
    p.worker.stop()


def test_a_queued_job_takes_the_slot_a_finished_one_frees() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    p = make(engine, parallel=2)
    for name in ("x", "y", "z"):
        send(p, {"id": name})
    engine.wait_running("y")
    time.sleep(0.05)
    assert "z" not in engine.seen  # two slots, both taken
    assert p.worker.busy() == (True, 1)
    gate.set()
    p.outbox.wait(3)
    p.worker.stop()
    assert engine.seen == ["x", "y", "z"]


def test_jobs_that_fit_only_one_at_a_time_take_turns_instead_of_preempting_for_ever() -> None:
    """Each fits the context alone, never together: the preempted job must not come back
    while the one that pushed it out runs (it would fill the context again, the whole
    decode would fail, and neither job would ever advance)."""

    engine = FakeEngine(delay=0.05, full=lambda tasks: len(tasks) > 1)
    p = make(engine, parallel=3)
    send(p, {"id": "first", "priority": 9})
    send(p, {"id": "second", "priority": 5})
    send(p, {"id": "third", "priority": 1})
    replies = {r.job_id: r.to_dict()["status"] for r in p.outbox.wait(3)}
    p.worker.stop()
    assert replies == {"first": "done", "second": "done", "third": "done"}
    preempted = p.worker.metrics.snapshot()["counters"]["preempted"]
    assert preempted <= 4, preempted  # a few failed tries, not one per step
    alone = [step[0] for step in engine.steps if len(step) == 1]
    assert alone.index("first") < alone.index("second") < alone.index("third")


def test_a_full_context_puts_the_least_urgent_job_back_in_the_queue() -> None:
    full = [True]

    def full_once(tasks: Sequence[Task]) -> bool:
        if full[0] and len(tasks) == 2:
            full[0] = False
            return True
        return False

    engine = FakeEngine(delay=0.05, full=full_once)
    p = make(engine, parallel=2)
    send(p, {"id": "urgent", "priority": 9})
    send(p, {"id": "later", "priority": 1})
    replies = {r.job_id: r.to_dict()["status"] for r in p.outbox.wait(2)}
    p.worker.stop()
    assert replies == {"urgent": "done", "later": "done"}
    assert p.worker.metrics.snapshot()["counters"]["preempted"] == 1
    assert engine.seen.count("later") == 2  # it started again from its prompt


def test_jobs_that_were_running_when_the_agent_died_run_alone() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    p = make(engine, parallel=4, suspects={"SUSPECT"})
    p.intake.stop()
    limits = JobLimits()

    def offer(name: str, digest: str) -> None:
        payload = json.dumps({"id": name, "text": name, "labels": ["a", "b"]}).encode()
        job = parse_job(Delivery("edge/jobs/classify", payload, time.monotonic()), TOPICS, limits)
        p.worker.offer(job, lambda: p.outbox.acks.append(name), digest=digest)

    offer("plain-1", "d1")
    engine.wait_running("plain-1")
    offer("suspect", "SUSPECT")
    offer("plain-2", "d2")
    time.sleep(0.05)
    assert engine.seen == ["plain-1"]  # the suspect waits for an empty scheduler...
    gate.set()
    p.outbox.wait(3)
    p.worker.stop()
    assert engine.seen == ["plain-1", "suspect", "plain-2"]
    assert all(step == ["suspect"] for step in engine.steps if "suspect" in step)
    assert not p.worker.suspects  # ...once, until it is answered


# ---- fair shares (issue 21) --------------------------------------------------------------


def from_(who: str) -> str:
    return f"edge/replies/{who}/r"


def test_a_requester_keeps_a_slot_free_for_another_that_uses_the_agent() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    p = make(engine, parallel=4)
    send(p, {"id": "b-0"}, response_topic=from_("b"))
    engine.wait_running("b-0")
    gate.set()
    p.outbox.wait(1)  # b has used the agent: it counts for fair_window_s
    gate.clear()
    for i in range(6):
        send(p, {"id": f"a-{i}", "priority": 9}, response_topic=from_("a"))
    engine.wait_running("a-2")
    time.sleep(0.05)
    assert "a-3" not in engine.seen  # three of four slots: one stays b's
    send(p, {"id": "b-1", "priority": 0}, response_topic=from_("b"))
    engine.wait_running("b-1")  # at once, beside a's three, whatever the priorities
    gate.set()
    p.outbox.wait(8)
    p.stop()


def test_a_requester_over_its_share_is_answered_overloaded_while_another_uses_the_agent() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    p = make(engine, parallel=2, max_queue=6)  # a window of 8: 4 each for two requesters
    send(p, {"id": "b-0"}, response_topic=from_("b"))
    engine.wait_running("b-0")
    for i in range(7):
        send(p, {"id": f"a-{i}"}, response_topic=from_("a"))
    refused = p.outbox.wait(3)
    assert sorted(r.job_id or "" for r in refused) == ["a-4", "a-5", "a-6"]
    body = refused[0].to_dict()
    assert body["error"]["code"] == "overloaded" and body["error"]["retry_after_ms"] > 0
    assert "share" in body["error"]["message"]
    assert p.worker.metrics.snapshot()["counters"]["fair_share_refused"] == 3
    gate.set()
    p.outbox.wait(8)
    p.stop()


def test_a_lone_requester_may_fill_the_agent() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    p = make(engine, parallel=2, max_queue=10)  # a window of 12: a share of two would be 6
    for i in range(8):
        send(p, {"id": f"a-{i}"}, response_topic=from_("a"))
    p.intake.stop()
    assert p.worker.depth == 8 and p.outbox.replies == []  # nobody else: no share to keep
    gate.set()
    p.outbox.wait(8)
    p.worker.stop()


def test_requesters_take_turns_for_one_slot_whatever_their_priorities() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    p = make(engine, parallel=1)
    send(p, {"id": "a-0", "priority": 9}, response_topic=from_("a"))
    engine.wait_running("a-0")
    for i in range(1, 4):
        send(p, {"id": f"a-{i}", "priority": 9}, response_topic=from_("a"))
    send(p, {"id": "b-0", "priority": 1}, response_topic=from_("b"))
    p.intake.stop()
    gate.set()
    p.outbox.wait(5)
    p.worker.stop()
    assert engine.seen[:2] == ["a-0", "b-0"]  # b's turn comes next, not after a's backlog


def test_health_names_a_requester_that_saturates_the_engine_while_others_wait() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    p = make(engine, parallel=1)
    assert p.worker.condition() is None
    send(p, {"id": "a-0"}, response_topic=from_("a"))
    engine.wait_running("a-0")
    send(p, {"id": "a-1"}, response_topic=from_("a"))
    send(p, {"id": "b-0"}, response_topic=from_("b"))
    p.intake.stop()
    deadline = time.monotonic() + 5
    while p.worker.condition() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the scheduler looks between steps
    gate.set()
    p.outbox.wait(3)
    p.worker.stop()
    why = p.worker.condition()  # held for HOLD_S after it was seen
    assert why is not None and "saturated" in why and "edge/replies/a" in why


def test_new_job_shapes_cost_their_requester_not_everyone() -> None:
    p = make(FakeEngine(), max_queue=8, shapes=ShapeBudget(per_minute=6, burst=2))
    for i in range(3):  # every job a label set never seen: a prefix and a calibration each
        send(p, {"id": f"a-{i}", "labels": [f"x{i}", "y"]}, response_topic=from_("a"))
    send(p, {"id": "a-known", "labels": ["x0", "y"]}, response_topic=from_("a"))
    send(p, {"id": "b-new", "labels": ["x9", "y"]}, response_topic=from_("b"))
    replies = {r.job_id: r.to_dict() for r in p.outbox.wait(5)}
    p.stop()
    refused = replies.pop("a-2")
    assert (refused["status"], refused["error"]["code"]) == ("rejected", "overloaded")
    assert 9_000 <= refused["error"]["retry_after_ms"] <= 10_001  # a token every 10 s
    assert {r["status"] for r in replies.values()} == {"done"}
    assert p.worker.metrics.snapshot()["counters"]["new_shapes_refused"] == 1


def test_a_stop_drops_a_job_still_running_after_its_grace_unanswered_and_uncounted(
    tmp_path: Path,
) -> None:
    """A clean stop is not a crash: the job is neither answered nor acknowledged (the
    broker delivers it again to the next process) and the running marker is cleared, so
    two stops during a long job cannot make it poison (issue 21)."""
    gate = threading.Event()  # never opened: the job runs for ever
    engine = FakeEngine(gate=gate)
    marker = RunningMarker(tmp_path / "running")
    p = make(engine, marker=marker)
    send(p, {"id": "long"})
    engine.wait_running("long")
    assert marker.path.exists()
    p.intake.stop()
    started = time.monotonic()
    p.worker.stop(grace=0.2)
    assert time.monotonic() - started < 3
    assert p.outbox.replies == [] and p.outbox.acks == []
    assert not marker.path.exists() and marker.take() == []
