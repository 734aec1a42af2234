"""Remote operations (docs/operations.md): requests read off the intake's thread, run one
at a time on a thread of their own, each with a retained state on the broker and in the
ledger.

The intake only hands a request over (`submit`): it is checked at once, answered
`rejected` when it cannot run, or queued `accepted`. The thread "operations" runs the
queued ones in order and, between them, moves what runs over time (a drain until the
board is idle, a restart after its drain, a log level until its expiry). Nothing here
touches the model or waits on the inference thread: a flood of operations costs the
jobs nothing but the intake's reading of them.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from edge_agent.adapters.ledger import Ledger, LedgerData
from edge_agent.adapters.mqtt import Incoming
from edge_agent.core.operations import (
    FINAL,
    MAX_PENDING,
    SEGMENT,
    ConfigArgs,
    Failed,
    Mode,
    ModelArgs,
    Op,
    OpCode,
    OperationError,
    OpState,
    Record,
    Request,
    accepted,
    advance,
    mode_after,
    parse_request,
    recovered,
    rejected,
    to_retire,
)
from edge_agent.core.protocol import Topics, encode_json
from edge_agent.service.health import Beat, loop_thread
from edge_agent.service.modelswap import Fleet, Progress

log = structlog.get_logger("edge_agent.operations")

TICK_S = 0.2
PROGRESS_EVERY_S = 1.0
MAX_CHUNK_BYTES = 64 * 1024  # a `logs` chunk, at most (less when the broker takes less)
RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: systemd's Restart=on-failure starts it again


class Controls(Protocol):
    """What operations may do to the agent (the composition root implements it)."""

    def leave_fleet(self) -> None:
        """Stop taking fleet jobs: unsubscribe the shared subscription."""

    def join_fleet(self) -> None:
        """Take fleet jobs again."""

    def in_flight(self) -> int:
        """Jobs queued, running or still being read."""

    def cancel_all(self, why: str) -> tuple[int, int]:
        """Cancel every queued and running job: (queued, running)."""

    def set_log_level(self, level: str) -> None: ...

    def configured_log_level(self) -> str: ...

    def log_tail(self, lines: int, since_s: float | None) -> list[str]: ...

    def payload_room(self, topic: str) -> int:
        """The largest payload the broker takes on `topic` now."""

    def mode_changed(self, mode: Mode) -> None:
        """Tell dashboards (telemetry, status line) at once."""

    def exit_for_restart(self, code: int) -> None: ...

    def switch_model(self, args: ModelArgs, fleet: Fleet, progress: Progress) -> dict[str, Any]:
        """Operation `model` (service/modelswap.py); raises Failed."""

    def run_bench(self, rounds: int, progress: Progress) -> dict[str, Any]:
        """Operation `bench`: the board's benchmark between jobs; raises Failed."""

    def apply_config(
        self, args: ConfigArgs, op_id: str, requester: str
    ) -> tuple[dict[str, Any], bool]:
        """Operation `config` (service/reconfigure.py): (result, a restart is needed);
        raises Failed."""


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Timed:
    """An operation that finishes later: its id and when it gives up (monotonic)."""

    op_id: str
    until: float
    shown: int = -1  # the last count published in its progress
    shown_at: float = 0.0


class Operations:
    def __init__(
        self,
        *,
        topics: Topics,
        controls: Controls,
        ledger: Ledger,
        publish: Callable[..., int | None],
        session: int,
        beat: Beat | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], str] = _now_iso,
    ) -> None:
        self.topics = topics
        self.controls = controls
        self.ledger = ledger
        self._publish = publish
        self.session = session
        self.beat = beat
        self.clock = clock
        self.now = now
        self._lock = threading.RLock()
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._pending = 0
        self._data = LedgerData()
        self._dirty = False
        self._uncleared: set[str] = set()
        self._drain: _Timed | None = None
        self._restart: _Timed | None = None
        self._level_until: float | None = None
        self._shown: Mode | None = None  # a mode held while a model switch drains, not kept
        self._thread: threading.Thread | None = None
        self.counts = {"accepted": 0, "rejected": 0, "unreadable": 0}

    # ---- start ----------------------------------------------------------------------

    def recover(self) -> Mode:
        """Read the ledger (before the link connects): operations left unfinished by the
        last process end now; the mode it left stays (a drained board stays drained).
        Returns the mode to start in."""
        data = self.ledger.load()
        now = self.now()
        for op_id, record in list(data.records.items()):
            if not record.final:
                before = record.memo.get("mode_before")
                if before in ("serving", "drained") and data.mode == "draining":
                    # a restart's drain, cut short: the operator never asked for draining
                    data.mode = before
                after = recovered(record, now, self.session)
                data.records[op_id] = after
                self._audit(after, recovered=True)
        self._data = data
        self.ledger.save(data)
        return data.mode

    @property
    def mode(self) -> Mode:
        return self._shown or self._data.mode

    def start(self) -> None:
        self._thread = loop_thread("operations", self.beat, self._loop)

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            if self._dirty:
                self.ledger.save(self._data)

    def republish(self) -> None:
        """On every connect: every kept state again (retained), and the clears that could
        not be sent while the broker was away."""
        with self._lock:
            for op_id in list(self._uncleared):
                if self._publish(self.topics.operation(op_id), b"", qos=1, retain=True):
                    self._uncleared.discard(op_id)
            for record in self._data.records.values():
                self._send(record)

    # ---- the intake's thread --------------------------------------------------------

    def submit(self, incoming: Incoming, requester: str) -> None:
        """One request: rejected now, its state again (the same id twice), or queued."""
        if not incoming.payload:  # a retained request being cleared: nothing was asked
            return
        if not SEGMENT.match(requester):
            self.counts["unreadable"] += 1
            log.warning("operation.unreadable", reason="operator name", topic=incoming.topic)
            return
        digest = hashlib.sha256(incoming.payload).hexdigest()[:16]
        try:
            request = parse_request(incoming.payload, requester)
        except OperationError as exc:
            self._refuse(exc, requester, incoming.payload, digest)
            return
        with self._lock:
            known = self._data.records.get(request.id)
            if known is not None:
                self._again(known, digest)
                return
            if self._pending >= MAX_PENDING:
                busy = OperationError(
                    OpCode.BUSY,
                    f"{MAX_PENDING} operations wait on this device already; send it again later",
                    request.id,
                )
                self._refuse(busy, requester, incoming.payload, digest, request.operation.value)
                return
            record = accepted(request, self.now(), self.session, digest)
            self._store(record)
            self._pending += 1
            self.counts["accepted"] += 1
        self._queue.put(request)

    def _refuse(
        self,
        exc: OperationError,
        requester: str,
        payload: bytes,
        digest: str,
        operation: str | None = None,
    ) -> None:
        if exc.op_id is None:
            self.counts["unreadable"] += 1
            log.warning(
                "operation.unreadable",
                requester=requester,
                code=str(exc.code),
                reason=exc.message,
                bytes=len(payload),
                notice=True,
            )
            return
        with self._lock:
            known = self._data.records.get(exc.op_id)
            if known is not None:
                self._again(known, digest)
                return
            self.counts["rejected"] += 1
            name = operation or _operation_name(payload)
            record = rejected(exc.op_id, name, requester, exc, self.now(), self.session)
            self._store(record)
            self._retire()

    def _again(self, known: Record, digest: str) -> None:
        """The same operation id again: its state again, nothing run twice."""
        if known.digest and digest != known.digest:
            log.warning("operation.id_reused", id=known.id, state=str(known.state))
        self._send(known)

    # ---- the operations thread --------------------------------------------------------

    def _loop(self) -> None:
        while True:
            request: Request | bool | None
            try:
                request = self._queue.get(timeout=TICK_S)
            except queue.Empty:
                request = False  # nothing new: only the tick
            if request is None:
                return
            if self.beat is not None:
                self.beat.busy()
            try:
                if isinstance(request, Request):
                    with self._lock:
                        self._pending -= 1
                    self._run_guarded(request)
                self._tick()
            finally:
                if self.beat is not None:
                    self.beat.idle()

    def _run_guarded(self, request: Request) -> None:
        with self._lock:  # kept before it runs: a process that dies in it says so later
            if self._dirty:
                self._dirty = False
                self.ledger.save(self._data)
        try:
            self._run(request)
        except Exception as exc:  # one operation failing never stops the thread
            log.exception("operation.crashed", id=request.id)
            if self.beat is not None:
                self.beat.error()
            with self._lock:
                record = self._data.records.get(request.id)
                if record is not None and not record.final:
                    self._fail(record, OpCode.INTERNAL_ERROR, f"internal error: {exc!r}")

    def _run(self, request: Request) -> None:
        op = request.operation
        with self._lock:
            record = self._data.records[request.id]
        if op == Op.DRAIN:
            self._start_drain(record, request.args.timeout_s)
        elif op == Op.RESUME:
            self._resume(record)
        elif op == Op.CANCEL:
            why = f"cancelled by operator {request.requester} (operation {request.id})"
            queued, running = self.controls.cancel_all(why)
            self._succeed(record, {"queued": queued, "running": running})
        elif op == Op.LOG_LEVEL:
            self._log_level(record, request.args.level, request.args.expiry_s)
        elif op == Op.LOGS:
            self._logs(record, request.args.lines, request.args.since_s)
        elif op == Op.RESTART:
            self._start_restart(record, request.args.timeout_s)
        elif op == Op.MODEL:
            self._model(record, request.args)
        elif op == Op.CONFIG:
            self._config(record, request.args)
        elif op == Op.BENCH:
            self._bench(record, request.args.rounds)
        else:  # parse_request lets through only what is built
            self._fail(record, OpCode.NOT_SUPPORTED, f"operation {op.value!r} is not built")

    # drain and resume

    def _start_drain(self, record: Record, timeout_s: int) -> None:
        with self._lock:
            if self._data.mode == "drained":
                self._succeed(record, {"mode": "drained", "jobs_left": 0})
                return
            if self._drain is not None:  # a drain in progress: this one ends with it
                older = self._data.records.get(self._drain.op_id)
                if older is not None and not older.final:
                    self._fail(older, OpCode.SUPERSEDED, f"operation {record.id} drains now")
            self._set_mode("draining")
            self.controls.leave_fleet()
            self._drain = _Timed(record.id, self.clock() + timeout_s)
            self._progress(record, self._drain, "finishing the jobs this device holds")

    def _resume(self, record: Record) -> None:
        with self._lock:
            for timed in (self._drain, self._restart):
                older = self._data.records.get(timed.op_id) if timed else None
                if older is not None and not older.final:
                    self._fail(older, OpCode.SUPERSEDED, f"operation {record.id} resumed")
            self._drain = self._restart = None
            if self._data.mode != "serving":
                self._set_mode("serving")
                self.controls.join_fleet()
            self._succeed(record, {"mode": "serving"})

    def _set_mode(self, mode: Mode) -> None:
        if self._data.mode == mode:
            return
        self._data.mode = mode
        self._dirty = True
        log.warning("agent.mode", mode=mode, notice=True)
        self.controls.mode_changed(mode)

    # model

    def _model(self, record: Record, args: ModelArgs) -> None:
        self._update(record, OpState.EXECUTING, progress={"message": f"switching to {args.name}"})
        progress = self._reporter(record)
        fleet = Fleet(
            leave=self.controls.leave_fleet,
            join=self.controls.join_fleet,
            in_flight=self.controls.in_flight,
            serving=lambda: self._data.mode == "serving",
            show=self._show,
        )
        try:
            result = self.controls.switch_model(args, fleet, progress)
        except Failed as exc:
            self._fail(record, exc.code, exc.message)
            return
        with self._lock:
            if result.get("changed"):
                # the next start loads it (service.app.switched_model); `auto` forgets it
                self._data.model = None if args.name == "auto" else str(result["model"])
                self.ledger.save(self._data)
            self._succeed(record, result)

    def _bench(self, record: Record, rounds: int) -> None:
        try:
            result = self.controls.run_bench(rounds, self._reporter(record))
        except Failed as exc:
            self._fail(record, exc.code, exc.message)
            return
        self._succeed(record, result)

    def _config(self, record: Record, args: ConfigArgs) -> None:
        try:
            result, restart = self.controls.apply_config(args, record.id, record.requester)
        except Failed as exc:
            self._fail(record, exc.code, exc.message)
            return
        if restart:  # a drained restart; the next process reports `successful`
            self._start_restart(record, args.timeout_s, result=result)
        else:
            self._succeed(record, result)

    def _reporter(self, record: Record) -> Progress:
        """Progress of a long operation into its `executing` state: a new message at
        once, the same one with new figures at most once a second."""
        last: dict[str, Any] = {"at": 0.0, "message": ""}

        def progress(message: str, done: int | None, total: int | None) -> None:
            now = self.clock()
            if message == last["message"] and now - last["at"] < PROGRESS_EVERY_S:
                return
            last.update(at=now, message=message)
            figures = {"message": message, "done": done, "total": total}
            self._update(record, OpState.EXECUTING, progress=figures)

        return progress

    def _show(self, mode: Mode) -> None:
        """A mode dashboards see (and the intake obeys) while a switch drains; the kept
        mode is not touched, so a process that dies meanwhile comes back as it was."""
        shown = None if mode == self._data.mode else mode
        if shown != self._shown:
            self._shown = shown
            self.controls.mode_changed(self.mode)

    # restart

    def _start_restart(
        self, record: Record, timeout_s: int, result: dict[str, Any] | None = None
    ) -> None:
        with self._lock:
            before = "serving" if self._data.mode == "serving" else "drained"
            memo: dict[str, Any] = {"stage": "draining", "mode_before": before}
            if result is not None:
                memo["result"] = result  # reported by the next process
                memo["kept"] = True  # done already: the next start applies it, even after a crash
            if self._data.mode == "serving":
                self._set_mode("draining")
                self.controls.leave_fleet()
            self._restart = _Timed(record.id, self.clock() + timeout_s)
            record = self._update(record, OpState.EXECUTING, memo=memo,
                                  progress={"message": "draining before the restart"})  # fmt: skip
        self._tick()

    def _exit(self, record: Record) -> None:
        """Drained (or out of time): save that the restart got this far, put back the mode
        it found, and stop the process; the next one reports `successful`."""
        with self._lock:
            before = record.memo.get("mode_before", "serving")
            memo = {**record.memo, "stage": "exiting"}
            progress = {"message": "exiting; systemd starts the agent again"}
            record = self._update(record, OpState.EXECUTING, memo=memo, progress=progress)
            self._data.mode = "drained" if before == "drained" else "serving"
            self.ledger.save(self._data)
            self._dirty = False
            self._restart = None
        log.warning("operation.restarting", id=record.id, requester=record.requester, notice=True)
        self.controls.exit_for_restart(RESTART_EXIT_CODE)

    # log level and logs

    def _log_level(self, record: Record, level: str, expiry_s: int) -> None:
        configured = self.controls.configured_log_level()
        self.controls.set_log_level(level)
        self._level_until = self.clock() + expiry_s
        until = datetime.now(UTC).timestamp() + expiry_s
        self._succeed(
            record,
            {
                "level": level,
                "until": datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds"),
                "reverts_to": configured,
            },
        )

    def _logs(self, record: Record, lines: int, since_s: int | None) -> None:
        topic = self.topics.operation_logs(record.id)
        tail = self.controls.log_tail(lines, since_s)
        room = min(MAX_CHUNK_BYTES, self.controls.payload_room(topic))
        chunks = _chunks(tail, room - 128)
        total_bytes = 0
        for seq, chunk in enumerate(chunks):
            body = encode_json(
                {"v": 1, "id": record.id, "seq": seq, "of": len(chunks), "lines": chunk}
            )
            total_bytes += len(body)
            if self._publish(topic, body, qos=1, retain=False) is None:
                self._fail(record, OpCode.INTERNAL_ERROR,
                           f"the broker went away after {seq} of {len(chunks)} chunks")  # fmt: skip
                return
            if len(chunks) > 4 and seq % 4 == 3:
                progress = {"message": "publishing log chunks", "done": seq + 1,
                            "total": len(chunks)}  # fmt: skip
                self._update(record, OpState.EXECUTING, progress=progress)
        self._succeed(
            record,
            {"lines": sum(len(c) for c in chunks), "chunks": len(chunks), "bytes": total_bytes,
             "topic": topic},
        )  # fmt: skip

    # ---- what runs over time ---------------------------------------------------------

    def _tick(self) -> None:
        now = self.clock()
        with self._lock:
            if self._data.mode == "draining":
                left = self.controls.in_flight()
                mode = mode_after(self._data.mode, left == 0)
                if mode != self._data.mode:
                    self._set_mode(mode)
                for timed in (self._drain, self._restart):
                    record = self._data.records.get(timed.op_id) if timed else None
                    if timed is not None and record is not None:
                        self._progress(record, timed, f"{left} job(s) left to finish", left)
            drain = self._drain
            if drain is not None:
                record = self._data.records.get(drain.op_id)
                if record is None or record.final:
                    self._drain = None
                elif self._data.mode == "drained":
                    self._succeed(record, {"mode": "drained", "jobs_left": 0})
                    self._drain = None
                elif now >= drain.until:
                    self._fail(record, OpCode.TIMEOUT,
                               f"{self.controls.in_flight()} job(s) still held after the "
                               "timeout; the device stays draining")  # fmt: skip
                    self._drain = None
            restart = self._restart
            exit_record: Record | None = None
            if restart is not None:
                record = self._data.records.get(restart.op_id)
                if record is None or record.final:
                    self._restart = None
                elif self._data.mode == "drained" or now >= restart.until:
                    exit_record = record
            if self._level_until is not None and now >= self._level_until:
                self._level_until = None
                level = self.controls.configured_log_level()
                self.controls.set_log_level(level)
                log.warning("operation.log_level_reverted", level=level, notice=True)
            if self._dirty:
                self._dirty = False
                self.ledger.save(self._data)
        if exit_record is not None:
            self._exit(exit_record)

    # ---- records --------------------------------------------------------------------

    def _progress(self, record: Record, timed: _Timed, message: str, left: int = -1) -> None:
        """`executing`, with how many jobs are left: at once the first time, then when
        the count changes, at most once a second."""
        now = self.clock()
        first = record.state == OpState.ACCEPTED
        if not first and (left == timed.shown or now - timed.shown_at < PROGRESS_EVERY_S):
            return
        timed.shown, timed.shown_at = left, now
        self._update(record, OpState.EXECUTING, progress={"message": message})

    def _succeed(self, record: Record, result: dict[str, Any]) -> None:
        self._update(record, OpState.SUCCESSFUL, result=result)

    def _fail(self, record: Record, code: OpCode, message: str) -> None:
        self._update(record, OpState.FAILED, error=(code, message))

    def _update(self, record: Record, state: OpState, **kwargs: Any) -> Record:
        with self._lock:
            current = self._data.records.get(record.id, record)
            after = advance(current, state, self.now(), session=self.session, **kwargs)
            self._store(after)
            if after.state in FINAL:
                self._retire()
            return after

    def _store(self, record: Record) -> None:
        self._data.records[record.id] = record
        self._dirty = True
        self._send(record)
        if record.state != OpState.EXECUTING:
            self._audit(record)

    def _retire(self) -> None:
        for op_id in to_retire(self._data.records.values()):
            del self._data.records[op_id]
            if not self._publish(self.topics.operation(op_id), b"", qos=1, retain=True):
                self._uncleared.add(op_id)
        while len(self._uncleared) > 1024:
            self._uncleared.pop()

    def _send(self, record: Record) -> None:
        payload = encode_json(record.wire(self.topics.device_id))
        try:
            self._publish(self.topics.operation(record.id), payload, qos=1, retain=True)
        except ValueError as exc:  # too large for the broker, or a topic it would refuse
            log.error("operation.state_not_sent", id=record.id, error=str(exc))

    def _audit(self, record: Record, recovered: bool = False) -> None:
        log.warning(
            f"operation.{record.state}",
            id=record.id,
            operation=record.operation,
            requester=record.requester,
            error=record.error,
            result=record.result,
            recovered=recovered or None,
            notice=True,
        )


def _operation_name(payload: bytes) -> str:
    """The operation a refused request named, for its state ('?' when it named none)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return "?"
    name = data.get("operation") if isinstance(data, dict) else None
    return name[:32] if isinstance(name, str) and name else "?"


def _chunks(lines: list[str], room: int) -> list[list[str]]:
    """Lines grouped so each chunk's JSON stays within `room` bytes (a line longer than a
    chunk is cut). At least one chunk, even with no lines."""
    room = max(256, room)
    out: list[list[str]] = [[]]
    size = 0
    for whole in lines:
        line = whole
        cost = len(encode_json(line)) + 1
        if cost > room:
            line = whole[: room // 8] + "…"  # worst case: every character escaped
            cost = len(encode_json(line)) + 1
        if size + cost > room and out[-1]:
            out.append([])
            size = 0
        out[-1].append(line)
        size += cost
    return out
