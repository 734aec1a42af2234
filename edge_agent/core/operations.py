"""Remote operations (docs/operations.md): what an operator may ask a board over the broker,
the request as sent, the state the board keeps of each operation, and the rules of the
state machine.

Pure: bytes in, a checked `Request` or an `OperationError` out; records in, records out.
The service (service/operations.py) runs the operations; the ledger adapter keeps the
records across restarts.

    accepted ──► executing ──► successful
        │            │    └──► failed
        │            └───────► (executing again, with progress)
        ├──────────────────────► successful | failed
    rejected (only ever the first and last state: the request was not taken)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.core.errors import MAX_MESSAGE_CHARS, clip

OPERATIONS_VERSION: Literal[1] = 1
# An operation id and the requester's name become topic levels: the same rule as device
# ids (no '+', '#', '/' or '$' can widen a subscription or an acl rule).
SEGMENT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_REQUEST_BYTES = 4096  # an operation request is a few fields
MAX_PENDING = 16  # operations waiting behind the running one; more are rejected `busy`
KEEP_FINISHED = 64  # finished operations whose state stays retained; older ones are cleared
MAX_LOG_LINES = 5000
LOG_LEVELS = ("debug", "info", "warning", "error")


class Op(StrEnum):
    DRAIN = "drain"
    RESUME = "resume"
    CANCEL = "cancel"
    LOG_LEVEL = "log-level"
    LOGS = "logs"
    RESTART = "restart"
    # named in the design (docs/operations.md) and not built yet: rejected `not_supported`
    MODEL = "model"
    CONFIG = "config"
    BENCH = "bench"


NOT_BUILT: frozenset[Op] = frozenset()


class OpState(StrEnum):
    ACCEPTED = "accepted"
    EXECUTING = "executing"
    SUCCESSFUL = "successful"
    FAILED = "failed"
    REJECTED = "rejected"


FINAL = frozenset({OpState.SUCCESSFUL, OpState.FAILED, OpState.REJECTED})
_NEXT: dict[OpState, frozenset[OpState]] = {
    OpState.ACCEPTED: frozenset({OpState.EXECUTING, OpState.SUCCESSFUL, OpState.FAILED}),
    OpState.EXECUTING: frozenset({OpState.EXECUTING, OpState.SUCCESSFUL, OpState.FAILED}),
}


class OpCode(StrEnum):
    """`error.code` of a failed or rejected operation; stable, like the job codes."""

    BAD_REQUEST = "bad_request"  # not JSON, not an object, no usable id
    INVALID_ARGUMENT = "invalid_argument"  # a field of the request or its args; names it
    UNKNOWN_OPERATION = "unknown_operation"
    NOT_SUPPORTED = "not_supported"  # an operation this version does not run yet
    BUSY = "busy"  # MAX_PENDING operations wait already
    SUPERSEDED = "superseded"  # a later operation made this one moot (resume during a drain)
    INTERRUPTED = "interrupted"  # the agent stopped while it was executing
    TIMEOUT = "timeout"
    INTERNAL_ERROR = "internal_error"
    # operation `model`: the board serves with the model it had in every one of these
    UNKNOWN_MODEL = "unknown_model"  # not in models.lock (or none is on this board, auto)
    DOWNLOAD_FAILED = "download_failed"
    HASH_MISMATCH = "hash_mismatch"
    LOAD_FAILED = "load_failed"
    TEST_FAILED = "test_failed"


Mode = Literal["serving", "draining", "drained"]


class Failed(Exception):
    """An accepted operation that could not finish: its `failed` state's code and message."""

    def __init__(self, code: OpCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = clip(message, MAX_MESSAGE_CHARS)


class OperationError(Exception):
    """A request that cannot be run; `op_id` when the request named a usable one (then a
    `rejected` state is published for it)."""

    def __init__(self, code: OpCode, message: str, op_id: str | None = None) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        self.message = message
        self.op_id = op_id


# ---- the request ---------------------------------------------------------------------


class _Strict(BaseModel):
    # JSON's types are the contract, and an unknown field is refused: a misspelt
    # `expiry` must not quietly mean the default.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class OperationIn(_Strict):
    """An operation request, published to <prefix>/devices/<device>/operate/<operator>."""

    model_config = ConfigDict(title="edge-agent operation request v1")

    v: Literal[1] = 1
    id: str = Field(pattern=SEGMENT.pattern, description="Unique per device; a topic level.")
    operation: str = Field(max_length=32)
    args: dict[str, Any] = Field(default_factory=dict)


class NoArgs(_Strict):
    pass


class DrainArgs(_Strict):
    timeout_s: int = Field(900, ge=1, le=86400, description="failed `timeout` past it")


class LogLevelArgs(_Strict):
    level: Literal["debug", "info", "warning", "error"]
    expiry_s: int = Field(600, ge=1, le=86400, description="then the configured level again")


class LogsArgs(_Strict):
    lines: int = Field(200, ge=1, le=MAX_LOG_LINES)
    since_s: int | None = Field(None, ge=1, le=7 * 86400, description="only lines this recent")


class ModelArgs(_Strict):
    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="a models.lock entry, or `auto`: back to the configured or automatic choice",
    )
    url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https://[^\s]+$",
        description="where to download it from (HTTPS only; default: model.mirror, then the "
        "entry's URL); the file must match the entry's sha256 whatever its source",
    )
    plan: Literal["auto", "drain_first"] = Field(
        "auto",
        description="auto: load the new model beside the old one when memory allows, else "
        "drain first; drain_first: always drain first",
    )
    timeout_s: int = Field(1800, ge=10, le=86400, description="the whole switch, at most")


class ConfigArgs(_Strict):
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="settings to change, nested as in config.toml: "
        '{"jobs": {"max_queue": 32}, "log": {"level": "debug"}}',
    )
    persist: bool = Field(False, description="keep the change across restarts")
    reset: bool = Field(False, description="forget every change operations persisted")
    timeout_s: int = Field(300, ge=1, le=3600, description="a needed restart drains this long")


class BenchArgs(_Strict):
    rounds: int = Field(2, ge=1, le=10, description="as `edge-agent bench --rounds`")


class RestartArgs(_Strict):
    timeout_s: int = Field(300, ge=1, le=3600, description="drain this long at most, then exit")


ARGS: dict[Op, type[_Strict]] = {
    Op.DRAIN: DrainArgs,
    Op.RESUME: NoArgs,
    Op.CANCEL: NoArgs,
    Op.LOG_LEVEL: LogLevelArgs,
    Op.LOGS: LogsArgs,
    Op.RESTART: RestartArgs,
    Op.MODEL: ModelArgs,
    Op.CONFIG: ConfigArgs,
    Op.BENCH: BenchArgs,
}


@dataclass(frozen=True)
class Request:
    id: str
    operation: Op
    args: Any  # the operation's args model
    requester: str
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)


def parse_request(payload: bytes, requester: str) -> Request:
    """A checked request, or OperationError (with `op_id` when the id was usable)."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise OperationError(
            OpCode.BAD_REQUEST, f"request is {len(payload)} bytes; at most {MAX_REQUEST_BYTES}"
        )
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise OperationError(OpCode.BAD_REQUEST, f"not UTF-8 JSON: {exc}") from exc
    except RecursionError:  # "[[[[..." of 4 KB: Python's parser gives up, found by the fuzzer
        raise OperationError(OpCode.BAD_REQUEST, "JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise OperationError(OpCode.BAD_REQUEST, "the request must be a JSON object")
    raw_id = data.get("id")
    op_id = raw_id if isinstance(raw_id, str) and SEGMENT.match(raw_id) else None
    try:
        request = OperationIn.model_validate(data)
    except ValidationError as exc:
        raise OperationError(OpCode.INVALID_ARGUMENT, _first_error(exc), op_id) from exc
    try:
        op = Op(request.operation)
    except ValueError:
        known = ", ".join(o.value for o in Op)
        raise OperationError(
            OpCode.UNKNOWN_OPERATION,
            f"unknown operation {clip(request.operation, 40)!r}; known: {known}",
            request.id,
        ) from None
    if op in NOT_BUILT:
        raise OperationError(
            OpCode.NOT_SUPPORTED,
            f"operation {op.value!r} is not supported by this agent version yet",
            request.id,
        )
    try:
        args = ARGS[op].model_validate(request.args)
    except ValidationError as exc:
        raise OperationError(
            OpCode.INVALID_ARGUMENT, _first_error(exc, "args"), request.id
        ) from exc
    return Request(request.id, op, args, requester, data)


def _first_error(exc: ValidationError, root: str | None = None) -> str:
    problem = exc.errors()[0]
    loc = ".".join(str(p) for p in ((root,) if root else ()) + tuple(problem["loc"]))
    return f"{loc or 'request'}: {problem['msg']}"


# ---- the state of an operation ----------------------------------------------------------


class Progress(_Strict):
    message: str
    done: int | None = None
    total: int | None = None


class OperationErrorOut(_Strict):
    code: str
    message: str


class OperationState(_Strict):
    """Retained on <prefix>/devices/<device>/operations/<id>: the latest state."""

    model_config = ConfigDict(title="edge-agent operation state v1")

    v: Literal[1]
    id: str
    operation: str
    device: str
    requester: str
    state: Literal["accepted", "executing", "successful", "failed", "rejected"]
    session: int = Field(ge=0, description="the agent session that wrote this state")
    progress: Progress | None = None
    result: dict[str, Any] | None = None
    error: OperationErrorOut | None = None
    accepted_at: str
    updated_at: str


@dataclass(frozen=True)
class Record:
    """What the board keeps of one operation (the ledger persists these)."""

    id: str
    operation: str
    requester: str
    state: OpState
    accepted_at: str
    updated_at: str
    session: int = 0
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    # what a restart needs to finish the operation (e.g. the restart op's stage); not sent
    memo: dict[str, Any] = field(default_factory=dict)
    digest: str = ""  # the request as first received, to warn when an id is reused

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def wire(self, device: str) -> dict[str, Any]:
        state = OperationState(
            v=OPERATIONS_VERSION,
            id=self.id,
            operation=self.operation,
            device=device,
            requester=self.requester,
            state=self.state.value,
            session=self.session,
            progress=Progress.model_validate(self.progress) if self.progress else None,
            result=self.result,
            error=OperationErrorOut.model_validate(self.error) if self.error else None,
            accepted_at=self.accepted_at,
            updated_at=self.updated_at,
        )
        return state.model_dump(mode="json")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "operation": self.operation,
            "requester": self.requester,
            "state": str(self.state),
            "accepted_at": self.accepted_at,
            "updated_at": self.updated_at,
            "session": self.session,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "memo": self.memo,
            "digest": self.digest,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        return cls(
            id=str(data["id"]),
            operation=str(data["operation"]),
            requester=str(data["requester"]),
            state=OpState(data["state"]),
            accepted_at=str(data["accepted_at"]),
            updated_at=str(data["updated_at"]),
            session=int(data.get("session") or 0),
            progress=data.get("progress"),
            result=data.get("result"),
            error=data.get("error"),
            memo=dict(data.get("memo") or {}),
            digest=str(data.get("digest") or ""),
        )


class IllegalTransition(ValueError):
    """A bug: the state machine does not allow this step."""


def advance(
    record: Record,
    state: OpState,
    now: str,
    *,
    session: int | None = None,
    progress: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    error: tuple[OpCode, str] | None = None,
    memo: dict[str, Any] | None = None,
) -> Record:
    """The record one step on; IllegalTransition for a step the machine does not have
    (a final state never changes; `rejected` is only ever a first state)."""
    if state not in _NEXT.get(record.state, frozenset()):
        raise IllegalTransition(f"{record.id}: {record.state} -> {state}")
    if (state == OpState.FAILED) != (error is not None):
        raise IllegalTransition(f"{record.id}: `failed` and only it carries an error")
    return replace(
        record,
        state=state,
        updated_at=now,
        session=record.session if session is None else session,
        progress=progress if state == OpState.EXECUTING else None,
        result=result,
        error={"code": str(error[0]), "message": clip(error[1], MAX_MESSAGE_CHARS)}
        if error
        else None,
        memo=record.memo if memo is None else memo,
    )


def accepted(request: Request, now: str, session: int, digest: str) -> Record:
    return Record(
        id=request.id,
        operation=request.operation.value,
        requester=request.requester,
        state=OpState.ACCEPTED,
        accepted_at=now,
        updated_at=now,
        session=session,
        digest=digest,
    )


def rejected(
    op_id: str, operation: str, requester: str, error: OperationError, now: str, session: int
) -> Record:
    return Record(
        id=op_id,
        operation=clip(operation, 32) if operation else "?",
        requester=requester,
        state=OpState.REJECTED,
        accepted_at=now,
        updated_at=now,
        session=session,
        error={"code": str(error.code), "message": error.message},
    )


def recovered(record: Record, now: str, session: int) -> Record:
    """An operation found unfinished when the agent starts: one that got as far as exiting
    for its restart (a restart), or whose work was done and kept before its restart (a
    config change that needs one), has done it; anything else was cut short: `failed`."""
    if record.final:
        return record
    if record.memo.get("stage") == "exiting" or record.memo.get("kept"):
        result = {**(record.memo.get("result") or {}), "session": session}
        return advance(record, OpState.SUCCESSFUL, now, session=session, result=result)
    return advance(
        record,
        OpState.FAILED,
        now,
        session=session,
        error=(OpCode.INTERRUPTED, "the agent stopped while this operation was unfinished"),
    )


def to_retire(records: Iterable[Record], keep: int = KEEP_FINISHED) -> list[str]:
    """The ids of finished operations beyond the newest `keep`, oldest first (their
    retained states are cleared). Unfinished ones always stay."""
    finished = sorted((r for r in records if r.final), key=lambda r: (r.updated_at, r.id))
    return [r.id for r in finished[: max(0, len(finished) - keep)]]


def mode_after(mode: Mode, idle: bool) -> Mode:
    """Draining becomes drained once nothing is queued, running or being read."""
    return "drained" if mode == "draining" and idle else mode
