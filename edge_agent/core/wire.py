"""The messages the agent publishes, as typed models: replies, telemetry, device info and
status. The agent builds every one of them through these models (so a wrong type or a
stray field is a bug caught before it is sent, not a dashboard that breaks), the CLI and
the fleet view read them through the same models, and docs/protocol.schema.json and
docs/telemetry.schema.json are generated from them (`scripts/gen_wire_schemas.py`; a test
fails when they drift).

Jobs, the messages the agent reads, are `protocol.JobIn` (strict: JSON's types are the
contract); the protocol schema carries it too.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.core.inference import Timings

WIRE_VERSION: Final = 1
TELEMETRY_VERSION = 1

NonNegative = Annotated[int, Field(ge=0)]
Rate = Annotated[float, Field(ge=0)] | None
Status = Literal["online", "offline", "stopped"]
ThrottleFlag = Literal[
    "under_voltage",
    "frequency_capped",
    "throttled",
    "soft_temperature_limit",
    "under_voltage_occurred",
    "frequency_capped_occurred",
    "throttled_occurred",
    "soft_temperature_limit_occurred",
]
Counter = Literal[
    "duplicate_jobs",
    "duplicate_deliveries",
    "handed_back",
    "journal_write_errors",
    "replies_lost",
    "intake_dropped_qos0",
    "preempted",
    "replies_too_large",
    "replies_given_up",
    "replies_refused",
    "fair_share_refused",
    "new_shapes_refused",
    "cost_exceeded",
    "clock_steps",
    "telemetry_clamped",
]


class _Message(BaseModel):
    # What the agent sends is exact: no field it does not document, no type it does not say.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---- replies ---------------------------------------------------------------------------


class ModelRef(_Message):
    name: str
    quant: str
    sha256: str | None


class ReplyError(_Message):
    code: str = Field(description="A stable code (docs/protocol.md, Error codes).")
    message: str
    retry_after_ms: NonNegative | None = Field(
        None, description="With `overloaded`: when to try again."
    )


class ReplyTimings(_Message):
    queue_ms: float
    prompt_ms: float
    gen_ms: float
    total_ms: float
    prompt_tokens: NonNegative
    cached_tokens: NonNegative
    completion_tokens: NonNegative
    tokens_per_second: Rate
    prompt_tokens_per_second: Rate

    @classmethod
    def of(cls, timings: Timings, queue_ms: float, total_ms: float) -> ReplyTimings:
        """A finished job's timings as sent: the rates are the engine's (`Timings`, the one
        place they are computed), everything rounded to 0.1."""
        tps, pps = timings.tokens_per_second, timings.prompt_tokens_per_second
        return cls(
            queue_ms=_ms(queue_ms),
            prompt_ms=_ms(timings.prompt_ms),
            gen_ms=_ms(timings.gen_ms),
            total_ms=_ms(total_ms),
            prompt_tokens=timings.prompt_tokens,
            cached_tokens=timings.cached_tokens,
            completion_tokens=timings.completion_tokens,
            tokens_per_second=None if tps is None else round(tps, 1),
            prompt_tokens_per_second=None if pps is None else round(pps, 1),
        )


def _ms(value: float) -> float:
    return round(value, 1) if math.isfinite(value) else 0.0


class ClassifyResult(_Message):
    label: str
    scores: dict[str, float] = Field(description="Calibrated probability of each label.")
    confidence: float = Field(ge=0, le=1, description="The chosen label's calibrated probability.")
    raw_scores: dict[str, float] | None = Field(
        None, description="Each label's probability before calibration."
    )
    uncertain: bool | None = Field(
        None, description="With a min_confidence: whether the answer is below it."
    )


class ExtractResult(_Message):
    data: dict[str, Any] = Field(description="Valid against the job's schema.")
    confidence: dict[str, float] = Field(
        description="Per property path the model chose (forced values have none)."
    )
    uncertain: list[str] | None = Field(
        None, description="With a min_confidence: the paths below it."
    )
    truncated: bool | None = Field(
        None, description="The token budget ran out and the JSON was closed by the agent."
    )


class ReplyMessage(_Message):
    """The answer to one job: on the job's reply topic (docs/protocol.md, Replies)."""

    v: Literal[1]
    id: str | None
    status: Literal["done", "failed", "rejected", "expired", "cancelled", "accepted", "running"]
    device: str
    model: ModelRef | None
    result: ClassifyResult | ExtractResult | None
    error: ReplyError | None
    timings: ReplyTimings | None
    correlation_id: str | None = None
    ignored: list[str] | None = Field(
        None,
        description="Unknown fields the job carried: the first 16 in sorted order, each cut "
        "to 64 characters.",
    )

    def wire(self) -> dict[str, Any]:
        """The JSON object sent. `id`, `model`, `result`, `error` and `timings` are always
        there (null when empty); the optional members (`correlation_id`, `ignored`, and in
        `result` and `error` the ones marked optional) only when set. `data` is sent as it
        is, nulls included."""
        body = self.model_dump(mode="json")
        _drop_none(body, ("correlation_id", "ignored"))
        if body["result"] is not None:
            _drop_none(body["result"], ("raw_scores", "uncertain", "truncated"))
        if body["error"] is not None:
            _drop_none(body["error"], ("retry_after_ms",))
        return body


def _drop_none(body: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if name in body and body[name] is None:
            del body[name]


# ---- telemetry -------------------------------------------------------------------------


class Memory(_Message):
    total_bytes: int = Field(ge=1)
    available_bytes: NonNegative
    agent_rss_bytes: int = Field(ge=1)
    swap_used_bytes: NonNegative


class ModelName(_Message):
    name: str
    quant: str


class JobCounts(_Message):
    done: NonNegative
    failed: NonNegative
    rejected: NonNegative
    expired: NonNegative
    cancelled: NonNegative


class Spool(_Message):
    spool_pending: NonNegative
    remembered: NonNegative
    spool_dropped_full: NonNegative
    spool_dropped_expired: NonNegative
    spool_dropped_unsendable: NonNegative
    poison_jobs: NonNegative


class HealthReport(_Message):
    state: Literal["ok", "degraded"]
    reasons: list[str]


class Telemetry(_Message):
    """The periodic message on <prefix>/devices/<device_id>/telemetry (docs/telemetry.md)."""

    model_config = ConfigDict(title="edge-agent telemetry v1")

    v: Literal[1]
    device: str = Field(min_length=1)
    ts: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
    session: int = Field(ge=1)
    uptime_s: float = Field(ge=0)
    cpu_percent: float = Field(ge=0, le=100)
    load_1m: float = Field(ge=0)
    memory: Memory
    disk_free_bytes: NonNegative | None
    soc_temperature_c: float | None
    throttled: dict[ThrottleFlag, bool] | None
    model: ModelName
    queue_depth: NonNegative
    jobs: JobCounts
    counters: dict[Counter, NonNegative]
    latency_ms_p50: Rate
    latency_ms_p95: Rate
    latency_window: NonNegative
    puback_ms_p50: Rate
    puback_ms_p99: Rate
    time_to_first_token_ms: Rate
    tokens_per_second: Rate
    tokens_per_second_avg: Rate
    prompt_tokens_per_second: Rate
    prompt_tokens_per_second_avg: Rate
    last_token_at: Rate
    spool: Spool
    health: HealthReport
    intake_backlog: NonNegative
    mode: Literal["serving", "draining", "drained"] = Field(
        "serving",
        description="draining/drained: taken out of the fleet's shared queue by an operator "
        "(operation drain, docs/operations.md)",
    )


# ---- device info -----------------------------------------------------------------------


class Board(_Message):
    model: str | None
    architecture: str | None
    cpu_cores: int | None
    cpu_features: list[str] | None
    ram_total_bytes: int | None
    cgroup_memory_max_bytes: int | None
    memory_cgroup_enabled: bool | None
    kernel: str | None


class Info(_Message):
    """Retained on <prefix>/devices/<device_id>/info: what a dashboard needs to know once
    (docs/telemetry.md). `model`, `runtime` and `capabilities` are open objects: they grow
    with the agent."""

    model_config = ConfigDict(title="edge-agent device info v1")

    v: Literal[1]
    device: str = Field(min_length=1)
    session: int = Field(ge=1)
    agent_version: str
    board: Board
    model: dict[str, Any]
    runtime: dict[str, Any]
    capabilities: dict[str, Any]
    health: HealthReport | None = None
