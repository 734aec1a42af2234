"""The worker: queue order, overload, deadlines, cancel and failures, on an owned fake engine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.constraint import JsonConstraint
from edge_agent.errors import Code, EngineError
from edge_agent.inference import Classification, Extraction, Interrupted, StopCheck, Timings
from edge_agent.journal import Journal, Stored
from edge_agent.metrics import Metrics
from edge_agent.outbox import Handoff, Memo
from edge_agent.prompt import PromptPlan
from edge_agent.protocol import Delivery, JobLimits, ModelRef, Reply, Status, Topics
from edge_agent.runner import JobRunner
from edge_agent.worker import Handing, Worker

TOPICS = Topics("edge", "pi-1", "g")


@dataclass
class FakeEngine:
    """Answers with the first label after `delay` s, checking `stop` like the real engine."""

    delay: float = 0.0
    fail_on: set[str] = field(default_factory=set)
    seen: list[str] = field(default_factory=list)
    gate: threading.Event | None = None

    def _work(self, text: str, stop: StopCheck) -> None:
        self.seen.append(text)
        if self.gate is not None:
            while not self.gate.wait(0.005):
                if stop():
                    raise Interrupted
        end = time.monotonic() + self.delay
        while time.monotonic() < end:
            if stop():
                raise Interrupted
            time.sleep(0.002)
        if text in self.fail_on:
            raise EngineError(Code.INFERENCE_ERROR, "scripted failure")

    def classify(
        self, plan: PromptPlan, text: str, labels: Sequence[str], stop: StopCheck
    ) -> Classification:
        self._work(text, stop)
        scores = {label: (1.0 if i == 0 else 0.0) for i, label in enumerate(labels)}
        return Classification(
            labels[0], scores, Timings(prompt_ms=1, gen_ms=1, prompt_tokens=3, completion_tokens=0)
        )

    def extract(
        self,
        plan: PromptPlan,
        text: str,
        constraint: JsonConstraint,
        max_tokens: int,
        stop: StopCheck,
    ) -> Extraction:
        self._work(text, stop)
        return Extraction(
            '{"v": 1}', Timings(prompt_ms=1, gen_ms=2, prompt_tokens=3, completion_tokens=5), False
        )


@dataclass
class RecordingOutbox:
    replies: list[Reply] = field(default_factory=list)
    progress: list[Reply] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    memos: list[Memo | None] = field(default_factory=list)
    resent: list[Stored] = field(default_factory=list)
    handed: list[Handoff] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def deliver(self, reply: Reply, ack: Callable[[], None], memo: Memo | None = None) -> None:
        with self.cond:
            self.replies.append(reply)
            self.memos.append(memo)
            ack()
            self.cond.notify_all()

    def notify(self, reply: Reply) -> None:
        self.progress.append(reply)

    def resend(self, stored: Stored, correlation_data: bytes | None) -> None:
        self.resent.append(stored)

    def hand_back(self, job: Handoff, ack: Callable[[], None], undo: Callable[[], None]) -> bool:
        self.handed.append(job)
        ack()
        return True

    def wait(self, count: int, timeout: float = 5.0) -> list[Reply]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.replies) >= count, timeout), self.replies
            return list(self.replies)


def make_worker(
    engine: FakeEngine, max_queue: int = 8, start: bool = True
) -> tuple[Worker, RecordingOutbox]:
    outbox = RecordingOutbox()
    worker = Worker(
        JobRunner(engine),
        outbox,
        Metrics(),
        topics=TOPICS,
        limits=JobLimits(),
        model=ModelRef("fake", "Q0", None),
        max_queue=max_queue,
    )
    if start:
        worker.start()
    return worker, outbox


def send(
    worker: Worker, outbox: RecordingOutbox, job: dict[str, Any], kind: str = "classify"
) -> None:
    body = {"labels": ["a", "b"], "text": job["id"], **job}
    if kind == "extract":
        body.pop("labels")
        body["schema"] = {"type": "object", "properties": {"v": {"type": "integer"}}}
    worker.receive(
        Delivery(
            topic=f"edge/jobs/{kind}", payload=json.dumps(body).encode(), received_at=time.time()
        ),
        lambda: outbox.acks.append(body["id"]),
    )


def wait_running(engine: FakeEngine, job_id: str, timeout: float = 5.0) -> None:
    """Until the fake engine has started `job_id` (the worker thread is asynchronous)."""
    end = time.monotonic() + timeout
    while job_id not in engine.seen:
        assert time.monotonic() < end, f"{job_id} never started"
        time.sleep(0.002)


def test_done_reply_carries_result_model_and_timings() -> None:
    worker, outbox = make_worker(FakeEngine())
    send(worker, outbox, {"id": "j1"})
    send(worker, outbox, {"id": "j2"}, kind="extract")
    replies = {r.job_id: r.to_dict() for r in outbox.wait(2)}
    worker.stop()
    assert replies["j1"]["result"] == {"label": "a", "scores": {"a": 1.0, "b": 0.0}}
    assert replies["j2"]["result"] == {"data": {"v": 1}}
    assert replies["j2"]["model"] == {"name": "fake", "quant": "Q0", "sha256": None}
    assert replies["j2"]["timings"]["tokens_per_second"] == 2500.0
    assert sorted(outbox.acks) == ["j1", "j2"]


def test_higher_priority_runs_first() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    worker, outbox = make_worker(engine)
    send(worker, outbox, {"id": "first"})
    wait_running(engine, "first")  # now blocked on the gate
    for i, prio in enumerate([1, 9, 5]):
        send(worker, outbox, {"id": f"p{prio}-{i}", "priority": prio})
    gate.set()
    outbox.wait(4)
    worker.stop()
    assert engine.seen == ["first", "p9-1", "p5-2", "p1-0"]


def test_full_queue_rejects_with_retry_after() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    worker, outbox = make_worker(engine, max_queue=2)
    send(worker, outbox, {"id": "j0"})
    wait_running(engine, "j0")
    for i in range(1, 4):
        send(worker, outbox, {"id": f"j{i}"})
    rejected = outbox.wait(1)
    assert [r.job_id for r in rejected] == ["j3"]
    body = rejected[0].to_dict()
    assert body["status"] == "rejected"
    assert body["error"]["code"] == "overloaded"
    assert body["error"]["retry_after_ms"] > 0
    gate.set()
    outbox.wait(4)
    worker.stop()
    assert sorted(outbox.acks) == ["j0", "j1", "j2", "j3"]


def test_job_expired_in_the_queue_is_not_run() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    worker, outbox = make_worker(engine)
    send(worker, outbox, {"id": "blocker"})
    wait_running(engine, "blocker")
    send(worker, outbox, {"id": "late", "ttl_ms": 30})
    time.sleep(0.1)
    gate.set()
    replies = {r.job_id: r.to_dict() for r in outbox.wait(2)}
    worker.stop()
    assert replies["late"]["status"] == "expired"
    assert replies["late"]["error"]["code"] == "deadline_exceeded"
    assert "late" not in engine.seen


def test_running_job_past_its_deadline_stops() -> None:
    worker, outbox = make_worker(FakeEngine(delay=5.0))
    t0 = time.monotonic()
    send(worker, outbox, {"id": "slow", "ttl_ms": 100})
    reply = outbox.wait(1)[0].to_dict()
    worker.stop()
    assert reply["status"] == "expired"
    assert time.monotonic() - t0 < 2.0


def test_cancel_a_queued_and_a_running_job() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    worker, outbox = make_worker(engine)
    send(worker, outbox, {"id": "running"})
    wait_running(engine, "running")
    send(worker, outbox, {"id": "queued"})
    assert worker.cancel("queued")
    assert worker.cancel("running")
    assert not worker.cancel("unknown")
    replies = {r.job_id: r.to_dict() for r in outbox.wait(2)}
    worker.stop()
    assert replies["queued"]["status"] == "cancelled"
    assert replies["running"]["status"] == "cancelled"
    assert sorted(outbox.acks) == ["queued", "running"]


def test_engine_failure_is_a_failed_reply_and_the_worker_goes_on() -> None:
    worker, outbox = make_worker(FakeEngine(fail_on={"bad"}))
    send(worker, outbox, {"id": "bad"})
    send(worker, outbox, {"id": "good"})
    replies = {r.job_id: r.to_dict() for r in outbox.wait(2)}
    worker.stop()
    assert replies["bad"]["status"] == "failed"
    assert replies["bad"]["error"]["code"] == "inference_error"
    assert replies["good"]["status"] == "done"


def test_bad_payload_is_rejected_and_acknowledged() -> None:
    worker, outbox = make_worker(FakeEngine())
    worker.receive(
        Delivery("edge/jobs/classify", b"\x00garbage", time.time()), lambda: outbox.acks.append("x")
    )
    reply = outbox.wait(1)[0].to_dict()
    worker.stop()
    assert reply["status"] == "rejected"
    assert reply["error"]["code"] == "bad_encoding" or reply["error"]["code"] == "bad_json"
    assert outbox.acks == ["x"]


def test_redelivered_job_in_flight_runs_once_and_both_deliveries_are_acked() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    worker, outbox = make_worker(engine)
    send(worker, outbox, {"id": "dup"})
    wait_running(engine, "dup")
    send(worker, outbox, {"id": "dup"})
    gate.set()
    outbox.wait(1)
    time.sleep(0.1)
    worker.stop()
    assert engine.seen == ["dup"]
    assert len(outbox.replies) == 1
    assert outbox.acks == ["dup", "dup"]


def send_as(
    worker: Worker, outbox: RecordingOutbox, body: dict[str, Any], correlation: bytes
) -> None:
    """A classify job asking for its reply on edge/replies/s with this Correlation Data."""
    worker.receive(
        Delivery(
            topic="edge/jobs/classify",
            payload=json.dumps({"labels": ["a", "b"], **body}).encode(),
            received_at=time.time(),
            response_topic="edge/replies/s",
            correlation_data=correlation,
        ),
        lambda: outbox.acks.append(correlation.decode()),
    )


def test_a_retry_of_a_job_in_flight_gets_the_reply_too_and_it_runs_once() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    worker, outbox = make_worker(engine)
    send_as(worker, outbox, {"id": "r", "text": "t"}, b"first")
    wait_running(engine, "t")
    send_as(worker, outbox, {"id": "r", "text": "t"}, b"retry")  # new attempt, same job
    gate.set()
    replies = outbox.wait(2)
    worker.stop()
    assert engine.seen == ["t"]
    assert sorted(r.route.correlation_data or b"" for r in replies) == [b"first", b"retry"]
    assert {r.status for r in replies} == {Status.DONE}
    assert sorted(outbox.acks) == ["first", "retry"]


def test_a_different_job_under_an_id_in_flight_is_rejected_not_lost() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    worker, outbox = make_worker(engine)
    send_as(worker, outbox, {"id": "same", "text": "one"}, b"1")
    wait_running(engine, "one")
    send_as(worker, outbox, {"id": "same", "text": "two"}, b"2")
    rejected = outbox.wait(1)[0]
    assert rejected.status == Status.REJECTED
    assert rejected.error_code == Code.DUPLICATE_ID
    assert rejected.route.correlation_data == b"2"
    gate.set()
    done = outbox.wait(2)[1]
    worker.stop()
    assert done.status == Status.DONE and done.route.correlation_data == b"1"
    assert engine.seen == ["one"]
    assert sorted(outbox.acks) == ["1", "2"]


def test_progress_messages_when_asked() -> None:
    worker, outbox = make_worker(FakeEngine())
    send(worker, outbox, {"id": "p", "progress": True})
    outbox.wait(1)
    worker.stop()
    assert [str(r.status) for r in outbox.progress] == ["accepted", "running"]


def journaled_worker(
    tmp_path: Any, engine: FakeEngine, **kw: Any
) -> tuple[Worker, RecordingOutbox, Journal]:
    journal = Journal(tmp_path / "j.db", dedup_window_s=3600, spool_max=100)
    outbox = RecordingOutbox()
    worker = Worker(
        JobRunner(engine),
        outbox,
        Metrics(),
        topics=TOPICS,
        limits=JobLimits(),
        model=ModelRef("fake", "Q0", None),
        max_queue=8,
        journal=journal,
        **kw,
    )
    worker.start()
    return worker, outbox, journal


def deliver(worker: Worker, outbox: RecordingOutbox, body: dict[str, Any], **kw: Any) -> None:
    payload = json.dumps({"labels": ["a", "b"], "text": body["id"], **body}).encode()
    worker.receive(
        Delivery(
            topic=kw.pop("topic", "edge/jobs/classify"),
            payload=payload,
            received_at=time.time(),
            **kw,
        ),
        lambda: outbox.acks.append(body["id"]),
    )


def test_a_job_that_ran_is_answered_from_the_journal_and_never_runs_twice(tmp_path: Any) -> None:
    engine = FakeEngine()
    worker, outbox, journal = journaled_worker(tmp_path, engine)
    deliver(worker, outbox, {"id": "once"})
    first = outbox.wait(1)[0]
    memo = outbox.memos[0]
    assert memo is not None and memo.key is not None
    # the outbox would journal it; do what it does, as delivered
    row = journal.record(
        key=memo.key,
        digest=memo.digest,
        job_id="once",
        status="done",
        topic=first.route.topic,
        payload=first.encode(),
        correlation=None,
        deadline=None,
    )
    journal.mark_delivered(row)
    deliver(worker, outbox, {"id": "once"}, dup=True)  # the broker redelivers: ack, no reply
    deliver(worker, outbox, {"id": "once"})  # the requester retries: the stored reply again
    time.sleep(0.1)
    worker.stop()
    assert engine.seen == ["once"]
    assert len(outbox.resent) == 1 and outbox.resent[0].payload == first.encode()
    assert outbox.acks == ["once", "once", "once"]


def test_same_id_with_a_different_payload_is_a_new_job(tmp_path: Any) -> None:
    engine = FakeEngine()
    worker, outbox, journal = journaled_worker(tmp_path, engine)
    deliver(worker, outbox, {"id": "reused", "text": "first"})
    reply = outbox.wait(1)[0]
    memo = outbox.memos[0]
    assert memo is not None
    journal.record(
        key=memo.key,
        digest=memo.digest,
        job_id="reused",
        status="done",
        topic=reply.route.topic,
        payload=reply.encode(),
        correlation=None,
        deadline=None,
    )
    deliver(worker, outbox, {"id": "reused", "text": "second"})
    outbox.wait(2)
    worker.stop()
    assert engine.seen == ["first", "second"]


def test_only_jobs_that_ran_are_remembered(tmp_path: Any) -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    worker, outbox, _ = journaled_worker(tmp_path, engine)
    worker.max_queue = 1
    deliver(worker, outbox, {"id": "runs"})
    wait_running(engine, "runs")
    deliver(worker, outbox, {"id": "waits"})
    deliver(worker, outbox, {"id": "overflow"})
    gate.set()
    replies = outbox.wait(3)
    worker.stop()
    memos = {r.job_id: m for r, m in zip(replies, outbox.memos, strict=True)}
    assert memos["overflow"] is None or memos["overflow"].key is None  # a retry must run
    assert memos["runs"] is not None and memos["runs"].key is not None


def test_busy_agent_hands_fleet_jobs_back(tmp_path: Any) -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    worker, outbox, _ = journaled_worker(tmp_path, engine, handing=Handing(keep=1, max_hops=3))
    deliver(worker, outbox, {"id": "j1"}, shared=True)
    wait_running(engine, "j1")
    deliver(worker, outbox, {"id": "j2"}, shared=True)  # waits: 1 waiting now
    deliver(worker, outbox, {"id": "j3"}, shared=True, response_topic="r/1", correlation_data=b"c")
    deliver(worker, outbox, {"id": "j4"}, shared=True, hops=3)  # handed back enough: kept
    deliver(
        worker, outbox, {"id": "j5"}, topic="edge/devices/pi-1/jobs/classify"
    )  # for this device
    gate.set()
    outbox.wait(4)
    worker.stop()
    assert [h.hops for h in outbox.handed] == [1]
    handed = outbox.handed[0]
    assert (handed.topic, handed.response_topic, handed.correlation_data) == (
        "edge/jobs/classify",
        "r/1",
        b"c",
    )
    assert json.loads(handed.payload)["id"] == "j3"
    assert sorted(engine.seen) == ["j1", "j2", "j4", "j5"]
