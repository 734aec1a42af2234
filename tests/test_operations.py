"""Remote operations without a model: the request's checks, the state machine, the ledger,
and the operations service driven through an owned fake of the agent's controls.
(tests/test_operations_live.py runs them on real agents over a real broker.)"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.adapters.ledger import Ledger, LedgerData
from edge_agent.adapters.log import Tail
from edge_agent.adapters.mqtt import Incoming
from edge_agent.core.operations import (
    KEEP_FINISHED,
    MAX_PENDING,
    MAX_REQUEST_BYTES,
    IllegalTransition,
    Mode,
    Op,
    OpCode,
    OperationError,
    OperationState,
    OpState,
    Record,
    accepted,
    advance,
    parse_request,
    recovered,
    to_retire,
)
from edge_agent.core.protocol import Topics
from edge_agent.service.operations import Operations, _chunks

TOPICS = Topics(prefix="edge", device_id="pi-1", share_group="g")


def request(op_id: str = "op-1", operation: str = "drain", **args: Any) -> bytes:
    return json.dumps({"id": op_id, "operation": operation, "args": args}).encode()


# ---- the request ---------------------------------------------------------------------


def test_a_good_request_is_read_with_its_defaults() -> None:
    got = parse_request(request("a.b_c-1", "log-level", level="debug"), "alice")
    assert got.id == "a.b_c-1" and got.operation == Op.LOG_LEVEL and got.requester == "alice"
    assert got.args.level == "debug" and got.args.expiry_s == 600


HOSTILE = [
    (b"\xff\xfe", OpCode.BAD_REQUEST, None),
    (b"[1, 2]", OpCode.BAD_REQUEST, None),
    (b"{", OpCode.BAD_REQUEST, None),
    (b"[" * 4000, OpCode.BAD_REQUEST, None),  # found by the operations fuzzer
    (b" " * (MAX_REQUEST_BYTES + 1), OpCode.BAD_REQUEST, None),
    (json.dumps({"operation": "drain"}).encode(), OpCode.INVALID_ARGUMENT, None),
    (json.dumps({"id": "a/b", "operation": "drain"}).encode(), OpCode.INVALID_ARGUMENT, None),
    (json.dumps({"id": "+", "operation": "drain"}).encode(), OpCode.INVALID_ARGUMENT, None),
    (json.dumps({"id": "x" * 65, "operation": "drain"}).encode(), OpCode.INVALID_ARGUMENT, None),
    (json.dumps({"id": 7, "operation": "drain"}).encode(), OpCode.INVALID_ARGUMENT, None),
    (json.dumps({"id": "é", "operation": "drain"}).encode(), OpCode.INVALID_ARGUMENT, None),
    (json.dumps({"id": "k", "operation": 3}).encode(), OpCode.INVALID_ARGUMENT, "k"),
    (json.dumps({"id": "k", "operation": "drain", "v": 2}).encode(), OpCode.INVALID_ARGUMENT, "k"),
    (json.dumps({"id": "k", "operation": "drain", "extra": 1}).encode(),
     OpCode.INVALID_ARGUMENT, "k"),
    (json.dumps({"id": "k", "operation": "reboot-everything"}).encode(),
     OpCode.UNKNOWN_OPERATION, "k"),
    (json.dumps({"id": "k", "operation": "bench", "args": {"x": 1}}).encode(),
     OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "bench", rounds=11), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "config", set={"jobs": {"max_queue": 1}}, persist="yes"),
     OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "model"), OpCode.INVALID_ARGUMENT, "k"),  # name is required
    (request("k", "model", name="../etc"), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "model", name="gemma", url="http://mirror.lan/g.gguf"),
     OpCode.INVALID_ARGUMENT, "k"),  # a URL in a request must be HTTPS
    (request("k", "model", name="gemma", url="https://a b"), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "model", name="gemma", url="https://" + "x" * 3000), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "model", name="gemma", plan="alongside"), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "model", name="gemma", timeout_s=1), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "log-level"), OpCode.INVALID_ARGUMENT, "k"),  # level is required
    (request("k", "log-level", level="trace"), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "log-level", level="debug", expiry_s=0), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "log-level", level="debug", expiry_s=10**12), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "log-level", level="debug", expiry_s=True), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "log-level", level="debug", expiry_s="60"), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "logs", lines=10**9), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "logs", lines=-1), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "logs", lines=1.5), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "drain", timeout_s=-5), OpCode.INVALID_ARGUMENT, "k"),
    (request("k", "drain", everything=True), OpCode.INVALID_ARGUMENT, "k"),
    (json.dumps({"id": "k", "operation": "drain", "args": []}).encode(),
     OpCode.INVALID_ARGUMENT, "k"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "code", "op_id"), HOSTILE)
def test_a_hostile_request_is_refused_with_a_code(
    payload: bytes, code: OpCode, op_id: str | None
) -> None:
    with pytest.raises(OperationError) as caught:
        parse_request(payload, "alice")
    assert caught.value.code == code
    assert caught.value.op_id == op_id  # only a usable id gets a `rejected` state
    assert len(caught.value.message) <= 300


def test_the_field_at_fault_is_named() -> None:
    with pytest.raises(OperationError, match=r"args\.expiry_s"):
        parse_request(request("k", "log-level", level="info", expiry_s=-1), "alice")


# ---- the state machine ---------------------------------------------------------------


def make(state: OpState = OpState.ACCEPTED) -> Record:
    r = accepted(parse_request(request(), "alice"), "t0", 1, "d")
    return r if state == OpState.ACCEPTED else advance(r, state, "t1", result={})


def test_the_steps_the_machine_allows() -> None:
    r = make()
    r = advance(r, OpState.EXECUTING, "t1", progress={"message": "1 left"})
    r = advance(r, OpState.EXECUTING, "t2", progress={"message": "0 left"})
    done = advance(r, OpState.SUCCESSFUL, "t3", result={"mode": "drained"})
    assert done.final and done.progress is None and done.result == {"mode": "drained"}
    failed = advance(r, OpState.FAILED, "t3", error=(OpCode.TIMEOUT, "too slow"))
    assert failed.error == {"code": "timeout", "message": "too slow"}
    assert advance(make(), OpState.SUCCESSFUL, "t1").final  # quick ones skip executing


@pytest.mark.parametrize("final", [OpState.SUCCESSFUL, OpState.FAILED, OpState.REJECTED])
@pytest.mark.parametrize("to", list(OpState))
def test_a_final_state_never_changes(final: OpState, to: OpState) -> None:
    r = make()
    r = (
        advance(r, final, "t1", error=(OpCode.TIMEOUT, "x"))
        if final == OpState.FAILED
        else advance(r, final, "t1")
        if final == OpState.SUCCESSFUL
        else Record(**{**r.__dict__, "state": OpState.REJECTED})
    )
    with pytest.raises(IllegalTransition):
        advance(r, to, "t2", error=(OpCode.TIMEOUT, "x") if to == OpState.FAILED else None)


def test_rejected_is_only_a_first_state_and_failed_carries_an_error() -> None:
    with pytest.raises(IllegalTransition):
        advance(make(), OpState.REJECTED, "t1")
    with pytest.raises(IllegalTransition):
        advance(make(), OpState.FAILED, "t1")
    with pytest.raises(IllegalTransition):
        advance(make(), OpState.SUCCESSFUL, "t1", error=(OpCode.TIMEOUT, "x"))


def test_after_a_restart_nothing_stays_executing() -> None:
    r = advance(make(), OpState.EXECUTING, "t1", progress={"message": "m"})
    after = recovered(r, "t2", session=2)
    assert after.state == OpState.FAILED and after.error is not None
    assert after.error["code"] == "interrupted" and after.session == 2
    restart = accepted(parse_request(request("r", "restart"), "alice"), "t0", 1, "d")
    exiting = advance(restart, OpState.EXECUTING, "t1", memo={"stage": "exiting"})
    assert recovered(exiting, "t2", 2).state == OpState.SUCCESSFUL
    draining = advance(restart, OpState.EXECUTING, "t1", memo={"stage": "draining"})
    assert recovered(draining, "t2", 2).state == OpState.FAILED
    config = accepted(parse_request(request("c", "config", set={}), "alice"), "t0", 1, "d")
    kept = advance(config, OpState.EXECUTING, "t1",
                   memo={"stage": "draining", "kept": True, "result": {"restart": True}})  # fmt: skip
    after = recovered(kept, "t2", 2)  # persisted before its drain: the new start applies it
    assert after.state == OpState.SUCCESSFUL and after.result == {"restart": True, "session": 2}
    assert recovered(make(OpState.SUCCESSFUL), "t2", 2) == make(OpState.SUCCESSFUL)


def test_the_oldest_finished_states_are_retired_and_unfinished_ones_never() -> None:
    records = [
        advance(accepted(parse_request(request(f"o{i:03d}"), "a"), f"t{i:03d}", 1, "d"),
                OpState.SUCCESSFUL, f"t{i:03d}")
        for i in range(KEEP_FINISHED + 5)
    ]  # fmt: skip
    running = accepted(parse_request(request("early"), "a"), "t000", 1, "d")
    assert to_retire([running, *records]) == [f"o{i:03d}" for i in range(5)]


def test_a_state_is_the_documented_message() -> None:
    wire = advance(make(), OpState.EXECUTING, "t1", progress={"message": "2 left"}).wire("pi-1")
    OperationState.model_validate(wire)
    assert wire["state"] == "executing" and wire["device"] == "pi-1"
    assert "memo" not in wire and "digest" not in wire


# ---- the ledger ------------------------------------------------------------------------


def test_the_ledger_keeps_mode_and_records(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "operations.json")
    assert ledger.load().mode == "serving"
    r = make(OpState.SUCCESSFUL)
    assert ledger.save(LedgerData(mode="drained", records={r.id: r}))
    back = ledger.load()
    assert back.mode == "drained" and back.records == {r.id: r}


def test_a_corrupt_ledger_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "operations.json"
    path.write_text('{"mode": "sideways"')
    assert Ledger(path).load() == LedgerData()
    assert (tmp_path / "operations.json.bad").exists() and not path.exists()


def test_a_ledger_that_cannot_be_written_says_so(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    ledger = Ledger(blocked / "operations.json")  # a directory that is a file
    assert not ledger.save(LedgerData())
    assert ledger.problem is not None and "not saved" in ledger.problem


# ---- the service, with an owned fake of the agent ------------------------------------------


class FakeAgent:
    """The agent's side of service.operations.Controls: jobs held, a log, a link."""

    def __init__(self) -> None:
        self.held = 0
        self.in_fleet = True
        self.level = "info"
        self.exit_code: int | None = None
        self.modes: list[Mode] = []
        self.cancelled: list[str] = []
        self.room = 100_000
        self.tail = Tail()

    def leave_fleet(self) -> None:
        self.in_fleet = False

    def join_fleet(self) -> None:
        self.in_fleet = True

    def in_flight(self) -> int:
        return self.held

    def cancel_all(self, why: str) -> tuple[int, int]:
        self.cancelled.append(why)
        held, self.held = self.held, 0
        return held, 0

    def set_log_level(self, level: str) -> None:
        self.level = level

    def configured_log_level(self) -> str:
        return "info"

    def log_tail(self, lines: int, since_s: float | None) -> list[str]:
        return self.tail.last(lines, since_s)

    def payload_room(self, topic: str) -> int:
        return self.room

    def mode_changed(self, mode: Mode) -> None:
        self.modes.append(mode)

    def exit_for_restart(self, code: int) -> None:
        self.exit_code = code


class Broker:
    """What the service published, per topic, latest retained value kept."""

    def __init__(self) -> None:
        self.retained: dict[str, bytes] = {}
        self.sent: list[tuple[str, bytes]] = []
        self.up = True
        self.lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        if not self.up:
            return None
        with self.lock:
            self.sent.append((topic, payload))
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
        return 1

    def state(self, op_id: str) -> dict[str, Any] | None:
        raw = self.retained.get(TOPICS.operation(op_id))
        return json.loads(raw) if raw else None

    def states(self, op_id: str) -> list[str]:
        topic = TOPICS.operation(op_id)
        return [json.loads(p)["state"] for t, p in self.sent if t == topic and p]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    agent, broker, clock = FakeAgent(), Broker(), Clock()
    ops = Operations(topics=TOPICS, controls=agent, ledger=Ledger(tmp_path / "ops.json"),
                     publish=broker.publish, session=1, clock=clock)  # fmt: skip
    ops.recover()

    class Rig:
        pass

    r = Rig()
    r.agent, r.broker, r.clock, r.ops, r.path = agent, broker, clock, ops, tmp_path / "ops.json"  # type: ignore[attr-defined]

    def send(op_id: str, operation: str, requester: str = "alice", **args: Any) -> None:
        ops.submit(incoming(request(op_id, operation, **args)), requester)

    def settle() -> None:  # run what is queued, and one tick (what the thread does)
        while not ops._queue.empty():
            item = ops._queue.get_nowait()
            assert item is not None
            ops._pending -= 1
            ops._run_guarded(item)
        ops._tick()

    r.send, r.settle = send, settle  # type: ignore[attr-defined]
    return r


def incoming(payload: bytes) -> Incoming:
    return Incoming(topic=TOPICS.operate("alice"), payload=payload, qos=1, retain=False,
                    response_topic=None, correlation_data=None, expiry_s=None, dup=False,
                    user_properties=(), received_at=time.monotonic(), wall_at=time.time())  # fmt: skip


def test_drain_waits_for_the_jobs_held_then_is_successful(rig: Any) -> None:
    rig.agent.held = 3
    rig.send("d1", "drain")
    rig.settle()
    assert rig.ops.mode == "draining" and not rig.agent.in_fleet
    assert rig.broker.state("d1")["state"] == "executing"
    rig.agent.held = 0
    rig.settle()
    assert rig.ops.mode == "drained" and rig.agent.modes == ["draining", "drained"]
    assert rig.broker.state("d1")["state"] == "successful"
    assert rig.broker.states("d1") == ["accepted", "executing", "successful"]
    # the mode survives a restart: a drained board stays out of the fleet
    assert Ledger(rig.path).load().mode == "drained"


def test_a_drain_out_of_time_fails_and_the_board_stays_draining(rig: Any) -> None:
    rig.agent.held = 1
    rig.send("d1", "drain", timeout_s=5)
    rig.settle()
    rig.clock.t += 6
    rig.settle()
    state = rig.broker.state("d1")
    assert state["state"] == "failed" and state["error"]["code"] == "timeout"
    assert rig.ops.mode == "draining" and not rig.agent.in_fleet


def test_resume_during_a_drain_supersedes_it(rig: Any) -> None:
    rig.agent.held = 2
    rig.send("d1", "drain")
    rig.send("r1", "resume")
    rig.settle()
    assert rig.broker.state("d1")["error"]["code"] == "superseded"
    assert rig.broker.state("r1")["state"] == "successful"
    assert rig.ops.mode == "serving" and rig.agent.in_fleet


def test_the_same_id_twice_is_one_operation(rig: Any) -> None:
    rig.agent.held = 4
    rig.send("c1", "cancel")
    rig.settle()
    rig.send("c1", "cancel")
    rig.send("c1", "drain")  # a different request under a used id: its state, nothing run
    rig.settle()
    assert len(rig.agent.cancelled) == 1 and rig.ops.mode == "serving"
    assert rig.broker.states("c1") == ["accepted", "successful", "successful", "successful"]
    assert rig.broker.state("c1")["result"] == {"queued": 4, "running": 0}


def test_a_flood_is_answered_busy_beyond_the_queue_and_bounded_on_the_broker(rig: Any) -> None:
    for i in range(MAX_PENDING + 10):
        rig.send(f"f{i}", "cancel")
    busy = [i for i in range(MAX_PENDING + 10)
            if (s := rig.broker.state(f"f{i}")) and s["state"] == "rejected"]  # fmt: skip
    assert busy == list(range(MAX_PENDING, MAX_PENDING + 10))
    assert rig.broker.state(f"f{MAX_PENDING}")["error"]["code"] == "busy"
    rig.settle()
    for i in range(KEEP_FINISHED * 2):
        rig.send(f"g{i}", "cancel")
        rig.settle()
    kept = [t for t in rig.broker.retained if "/operations/" in t]
    assert len(kept) == KEEP_FINISHED  # older states cleared (empty retained message)


def test_rejected_requests_get_a_state_and_unreadable_ones_a_log_line(rig: Any) -> None:
    rig.send("k", "log-level", level="loud")
    assert rig.broker.state("k")["error"]["code"] == "invalid_argument"
    rig.ops.submit(incoming(b"\x00garbage"), "alice")
    rig.ops.submit(incoming(request("m", "drain")), "al+ice")  # a name the acl never makes
    assert rig.ops.counts["unreadable"] == 2 and rig.broker.state("m") is None


def test_log_level_reverts_by_itself(rig: Any) -> None:
    rig.send("l1", "log-level", level="debug", expiry_s=60)
    rig.settle()
    assert rig.agent.level == "debug" and rig.broker.state("l1")["result"]["reverts_to"] == "info"
    rig.clock.t += 59
    rig.settle()
    assert rig.agent.level == "debug"
    rig.clock.t += 2
    rig.settle()
    assert rig.agent.level == "info"


def test_logs_come_in_chunks_the_broker_takes_without_the_password(rig: Any) -> None:
    rig.agent.tail.redact("hunter2-secret")
    for i in range(300):
        rig.agent.tail.add(json.dumps({"event": "x", "i": i, "pad": "é" * 50,
                                       "note": "password hunter2-secret"}))  # fmt: skip
    rig.agent.room = 4096
    rig.send("g1", "logs", lines=250)
    rig.settle()
    state = rig.broker.state("g1")
    assert state["state"] == "successful" and state["result"]["lines"] == 250
    chunks = [json.loads(p) for t, p in rig.broker.sent if t == TOPICS.operation_logs("g1")]
    assert len(chunks) == state["result"]["chunks"] > 1
    assert all(len(json.dumps(c, separators=(",", ":")).encode()) <= 4096 for c in chunks)
    lines = [line for c in chunks for line in c["lines"]]
    assert [json.loads(line)["i"] for line in lines] == list(range(50, 300))
    assert all("hunter2" not in line for line in lines)


def test_a_line_longer_than_a_chunk_is_cut() -> None:
    chunks = _chunks(["x" * 10_000, "y"], 1000)
    assert all(len(json.dumps(c)) <= 1000 for c in chunks) and chunks[-1][-1] == "y"


def test_restart_drains_exits_and_the_next_process_reports_it(rig: Any, tmp_path: Path) -> None:
    rig.agent.held = 1
    rig.send("r1", "restart")
    rig.settle()
    assert rig.agent.exit_code is None and rig.broker.state("r1")["state"] == "executing"
    rig.agent.held = 0
    rig.settle()
    assert rig.agent.exit_code == 75
    # the next process: the restart is successful, and the board serves again
    broker = Broker()
    again = Operations(topics=TOPICS, controls=FakeAgent(), ledger=Ledger(rig.path),
                       publish=broker.publish, session=2)  # fmt: skip
    assert again.recover() == "serving"
    again.republish()
    assert broker.state("r1")["state"] == "successful" and broker.state("r1")["session"] == 2


def test_an_operation_cut_short_by_a_crash_fails_after_the_restart(rig: Any) -> None:
    rig.agent.held = 1
    rig.send("d1", "drain")
    rig.settle()  # executing; the process dies here
    broker = Broker()
    again = Operations(topics=TOPICS, controls=FakeAgent(), ledger=Ledger(rig.path),
                       publish=broker.publish, session=2)  # fmt: skip
    assert again.recover() == "draining"  # still out of the fleet: the operator asked
    again.republish()
    assert broker.state("d1")["error"]["code"] == "interrupted"


def test_states_sent_while_the_broker_was_away_go_out_on_connect(rig: Any) -> None:
    rig.broker.up = False
    rig.send("c1", "cancel")
    rig.settle()
    rig.broker.up = True
    rig.ops.republish()
    assert rig.broker.state("c1")["state"] == "successful"


def test_a_crashing_operation_fails_and_the_thread_goes_on(rig: Any) -> None:
    def boom(why: str) -> tuple[int, int]:
        raise RuntimeError("worker gone")

    rig.agent.cancel_all = boom
    rig.send("c1", "cancel")
    rig.settle()
    assert rig.broker.state("c1")["error"]["code"] == "internal_error"
    rig.agent.cancel_all = FakeAgent().cancel_all
    rig.send("c2", "cancel")
    rig.settle()
    assert rig.broker.state("c2")["state"] == "successful"


def test_the_generated_schema_takes_what_the_agent_sends_and_reads() -> None:
    import jsonschema

    schema = json.loads((Path(__file__).parent.parent / "docs" / "operations.schema.json")
                        .read_text())  # fmt: skip
    defs = schema["$defs"]

    def valid(name: str, message: Any) -> bool:
        return jsonschema.Draft202012Validator({**defs[name], "$defs": defs}).is_valid(message)

    assert valid("OperationIn", json.loads(request("a-1", "log-level", level="debug")))
    assert not valid("OperationIn", {"id": "a/1", "operation": "drain"})
    assert not valid("OperationIn", {"id": "a", "operation": "drain", "force": True})
    assert valid("LogsArgs", {"lines": 10}) and not valid("LogsArgs", {"lines": 10**9})
    done = advance(make(), OpState.SUCCESSFUL, "t1", result={"mode": "drained"})
    assert valid("OperationState", done.wire("pi-1"))
    assert not valid("OperationState", {**done.wire("pi-1"), "state": "done"})


def test_operations_run_while_the_board_drains(rig: Any) -> None:
    """A drain finishes in the background: other operations run meanwhile."""
    rig.agent.held = 2
    rig.send("d1", "drain")
    rig.send("l1", "logs", lines=5)
    rig.send("c1", "cancel")
    rig.settle()
    assert rig.broker.state("l1")["state"] == "successful"
    assert rig.broker.state("c1")["result"] == {"queued": 2, "running": 0}
    rig.settle()  # the cancel emptied the board: the drain is done
    assert rig.broker.state("d1")["state"] == "successful" and rig.ops.mode == "drained"


def test_a_restart_cut_short_in_its_drain_comes_back_serving(rig: Any) -> None:
    """The drain was the restart's means, not the operator's wish: a crash during it does
    not leave the board out of the fleet."""
    rig.agent.held = 1
    rig.send("r1", "restart")
    rig.settle()
    assert rig.ops.mode == "draining" and Ledger(rig.path).load().mode == "draining"
    again = Operations(topics=TOPICS, controls=FakeAgent(), ledger=Ledger(rig.path),
                       publish=Broker().publish, session=2)  # fmt: skip
    assert again.recover() == "serving"


def test_the_log_tail_keeps_to_its_size_in_lines_and_characters() -> None:
    tail = Tail(size=100, max_chars=10_000)
    for i in range(50):
        tail.add(f"{i:03d}" + "x" * 997)  # 1000 characters each
    kept = tail.last(100)
    assert len(kept) == 10 and kept[-1].startswith("049") and kept[0].startswith("040")
    for i in range(300):
        tail.add(f"s{i}")
    assert len(tail.last(1000)) == 100
