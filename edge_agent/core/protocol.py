"""Wire contract v1: topics, job and reply messages (docs/protocol.md is the reference).

Pure: bytes and dicts in, typed values or `JobError` out. The MQTT adapter hands over the
payload with whatever MQTT 5 properties came with it (`Delivery`); everything else is
decided here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.core.errors import Code, JobError, clip
from edge_agent.core.prompt import Example, canonical_json
from edge_agent.core.schema import ObjectNode, SchemaLimits, compile_schema
from edge_agent.core.wire import (
    WIRE_VERSION,
    ClassifyResult,
    ExtractResult,
    ModelRef,
    ReplyError,
    ReplyMessage,
    ReplyTimings,
)

KINDS = ("classify", "extract")
Kind = Literal["classify", "extract"]
CONTENT_TYPE = "application/json"
MAX_ID_CHARS = 128
MAX_TOPIC_BYTES = 1024
# The furthest ahead a deadline may lie, counted from receipt: later ones (a `deadline` in
# year 9999, a Message Expiry of 136 years) are clamped to it. Seven days, like `ttl_ms`'s
# upper bound; it keeps every expiry the agent publishes far inside MQTT's 32-bit range.
MAX_DEADLINE_S = 7 * 24 * 3600
# MQTT 5 Message Expiry Interval is a four-byte integer.
MAX_EXPIRY_S = 0xFFFFFFFF
# A reply lists at most this many of a job's unknown field names, each cut to this many
# characters: the names are the sender's, and a 57 KB job of them made a 169 KB reply.
MAX_IGNORED = 16
MAX_IGNORED_CHARS = 64


class Status(StrEnum):
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    # progress messages, only for jobs that ask for them
    ACCEPTED = "accepted"
    RUNNING = "running"


@dataclass(frozen=True)
class TopicMatch:
    """What an incoming topic is for: a job of some kind (fleet or device), a control
    message, or something the agent never subscribed to."""

    role: Literal["job", "cancel", "rebirth", "ha_status", "operation", "unknown"]
    kind: str | None = None  # for jobs: the kind the topic names (maybe not one we know)
    fleet: bool = False  # for jobs and cancels: the fleet topic, not this device's
    requester: str | None = None  # for operations: the operator, the topic's last level


@dataclass(frozen=True)
class Topics:
    """Every topic the agent uses, built and parsed in one place."""

    prefix: str
    device_id: str
    share_group: str
    discovery_prefix: str = "homeassistant"

    def fleet_jobs(self, kind: str) -> str:
        return f"{self.prefix}/jobs/{kind}"

    def shared_fleet_jobs(self, kind: str) -> str:
        return f"$share/{self.share_group}/{self.prefix}/jobs/{kind}"

    def device_jobs(self, kind: str) -> str:
        return f"{self.prefix}/devices/{self.device_id}/jobs/{kind}"

    def results(self) -> str:
        return f"{self.prefix}/devices/{self.device_id}/results"

    def status(self) -> str:
        return f"{self.prefix}/devices/{self.device_id}/status"

    def telemetry(self) -> str:
        return f"{self.prefix}/devices/{self.device_id}/telemetry"

    def info(self) -> str:
        return f"{self.prefix}/devices/{self.device_id}/info"

    def fleet_cancel(self) -> str:
        return f"{self.prefix}/jobs/cancel"

    def device_cancel(self) -> str:
        return f"{self.prefix}/devices/{self.device_id}/cancel"

    def fleet_rebirth(self) -> str:
        return f"{self.prefix}/cmd/rebirth"

    def device_rebirth(self) -> str:
        return f"{self.prefix}/devices/{self.device_id}/cmd/rebirth"

    def operate(self, operator: str = "+") -> str:
        """Where an operator sends this device operations (docs/operations.md); the last
        level is the operator's name, which the fleet's acl confines it to."""
        return f"{self.prefix}/devices/{self.device_id}/operate/{operator}"

    def operation(self, op_id: str) -> str:
        """The retained state of one operation."""
        return f"{self.prefix}/devices/{self.device_id}/operations/{op_id}"

    def operation_logs(self, op_id: str) -> str:
        """The chunks a `logs` operation publishes."""
        return f"{self.operation(op_id)}/logs"

    def all_devices(self, leaf: str) -> str:
        """Wildcard over every device's `leaf` topic (for the fleet view)."""
        return f"{self.prefix}/devices/+/{leaf}"

    def device_leaf(self, topic: str) -> tuple[str, str] | None:
        """(device, leaf) of any device's `<prefix>/devices/<device>/<leaf>` topic (for
        the fleet view), else None."""
        levels = topic.split("/")
        if len(levels) != 4 or levels[0] != self.prefix or levels[1] != "devices":
            return None
        return levels[2], levels[3]

    def requester_of(self, reply_topic: str) -> str:
        """Who takes a job's replies, for fair shares (core/fairness.py): the first three
        levels of a topic under `<prefix>/replies/<name>/` (the fleet's convention, to which
        its ACLs confine each sensor), else the whole reply topic."""
        levels = reply_topic.split("/", 3)
        if len(levels) >= 3 and levels[0] == self.prefix and levels[1] == "replies":
            return "/".join(levels[:3])
        return reply_topic

    def of_device(self, device_id: str) -> Topics:
        """The same fleet's topics as another device sees them (for requesters)."""
        return replace(self, device_id=device_id)

    def replies(self, *parts: str) -> str:
        """Where requesters take answers: `<prefix>/replies/<their name>/...`."""
        return "/".join((self.prefix, "replies", *parts))

    def ha_config(self, component: str, node: str, key: str) -> str:
        """A Home Assistant discovery config topic."""
        return f"{self.discovery_prefix}/{component}/{node}/{key}/config"

    def ha_status(self) -> str:
        """Home Assistant's birth/last-will topic: `online` when it (re)starts."""
        return f"{self.discovery_prefix}/status"

    def parse(self, topic: str) -> TopicMatch:
        """What a topic the agent received is for. Control topics first: the fleet cancel
        topic, <prefix>/jobs/cancel, has the shape of a job topic."""
        if topic == self.fleet_cancel():
            return TopicMatch("cancel", fleet=True)
        if topic == self.device_cancel():
            return TopicMatch("cancel")
        if topic in (self.fleet_rebirth(), self.device_rebirth()):
            return TopicMatch("rebirth")
        if topic == self.ha_status():
            return TopicMatch("ha_status")
        levels = topic.split("/")
        if len(levels) == 5 and "/".join(levels[:4]) + "/" == self.operate(""):
            return TopicMatch("operation", requester=levels[4])
        kind = self.kind_of(topic)
        if kind is not None:
            return TopicMatch("job", kind=kind, fleet=topic.startswith(f"{self.prefix}/jobs/"))
        return TopicMatch("unknown")

    def reserved(self, topic: str) -> bool:
        """A topic no reply may be published to: the fleet's job, cancel and command
        topics, every device's topics but this agent's own results topic, and Home
        Assistant's discovery tree. A reply there could fake another board's status, feed
        a job loop, or rewrite a dashboard."""
        if topic == self.results():
            return False
        head = topic.split("/", 1)[0]
        levels = topic.split("/")
        if head == self.discovery_prefix:
            return True
        return head == self.prefix and len(levels) > 1 and levels[1] in ("jobs", "cmd", "devices")

    def kind_of(self, topic: str) -> str | None:
        """The job kind a job topic names (fleet or device form), else None."""
        levels = topic.split("/")
        if levels[:2] == [self.prefix, "jobs"] and len(levels) == 3:
            return levels[2]
        if (
            len(levels) == 5
            and levels[:2] == [self.prefix, "devices"]
            and levels[2] == self.device_id
            and levels[3] == "jobs"
        ):
            return levels[4]
        return None


@dataclass(frozen=True)
class JobLimits:
    """What a job may ask for (the `jobs.*` settings); defaults match the settings'."""

    max_payload_bytes: int = 65536
    max_text_chars: int = 2000
    max_labels: int = 32
    max_label_chars: int = 64
    max_instructions_chars: int = 1500
    max_examples: int = 16
    max_prompt_chars: int = 4000
    schema: SchemaLimits = field(default_factory=SchemaLimits)
    reply_topic_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delivery:
    """One job message as it came off the broker."""

    topic: str
    payload: bytes
    # When the agent got it, on the clock every duration and deadline runs on (the agent:
    # time.monotonic(), which NTP's steps do not move).
    received_at: float
    response_topic: str | None = None  # MQTT 5 Response Topic
    correlation_data: bytes | None = None  # MQTT 5 Correlation Data
    expiry_s: int | None = None  # MQTT 5 Message Expiry Interval (remaining, as forwarded)
    dup: bool = False  # the broker redelivers it (DUP flag)
    shared: bool = False  # came through the fleet's shared subscription
    hops: int = 0  # times agents handed it back to the fleet (user property edge-hops)
    retained: bool = False  # replayed from the broker's retained store at subscribe time
    kind: str | None = None  # the kind its topic names, when the topic was already parsed
    # The wall clock (time.time()) at receipt, when `received_at` is on another clock: only
    # an absolute `deadline` is read against it. None: `received_at` is wall-clock time.
    wall_at: float | None = None


class _Wire(BaseModel):
    # Strict: JSON's types are the contract. `true` is not the number 1 and "7" is not a
    # priority; a sensor that sends them gets `invalid_field` naming the field.
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)


class ExampleIn(_Wire):
    text: str = Field(min_length=1)
    answer: str | dict[str, Any]


class JobIn(_Wire):
    """A job as sent. Unknown fields are ignored (and listed in the reply's `ignored`)."""

    v: int = 1
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    kind: Kind | None = None
    text: str
    labels: list[str] | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    reply_to: str | None = None
    correlation_id: str | None = Field(None, max_length=256)
    priority: int = Field(5, ge=0, le=9)
    deadline: str | None = Field(None, max_length=64)  # ISO 8601 with a zone; see _deadline
    ttl_ms: int | None = Field(None, ge=1, le=MAX_DEADLINE_S * 1000)
    progress: bool = False
    instructions: str | None = None
    examples: list[ExampleIn] | None = None
    profile: str | None = Field(None, max_length=64)
    label_descriptions: dict[str, str] | None = None
    min_confidence: float | None = Field(None, ge=0.0, le=1.0)


@dataclass(frozen=True)
class Profile:
    """A job shape defined in the agent's settings ([profiles.<name>]), so sensors send
    only `{"id", "profile", "text"}`. A job's own fields override the profile's."""

    kind: Kind
    instructions: str | None = None
    labels: tuple[str, ...] | None = None
    schema: dict[str, Any] | None = None
    examples: tuple[tuple[str, Any], ...] = ()  # (text, answer)
    label_descriptions: tuple[tuple[str, str], ...] = ()
    min_confidence: float | None = None


def check_profile(name: str, profile: Profile, limits: JobLimits) -> None:
    """Raise JobError if a configured profile could never make a valid job."""
    if profile.kind == "classify":
        labels = _labels(list(profile.labels) if profile.labels else None, limits)
        for text, answer in profile.examples:
            _classify_example(ExampleIn(text=text, answer=answer), labels)
        _descriptions(dict(profile.label_descriptions), labels)
    else:
        if profile.schema is None:
            raise JobError(
                Code.MISSING_FIELD, f"profiles.{name}.schema: an extract profile needs one"
            )
        compile_schema(profile.schema, limits.schema)
        for text, answer in profile.examples:
            _extract_example(ExampleIn(text=text, answer=answer))


@dataclass(frozen=True)
class ReplyRoute:
    """Where and how a job's reply goes; known even for jobs that fail to parse."""

    topic: str
    correlation_data: bytes | None = None
    correlation_id: str | None = None
    job_id: str | None = None


@dataclass(frozen=True)
class Job:
    """A validated job, ready for the queue."""

    id: str
    kind: Kind
    text: str
    route: ReplyRoute
    priority: int
    received_at: float  # on the delivery's clock (the agent's: monotonic)
    deadline: float | None  # on the same clock: after it, the job is answered `expired`
    progress: bool
    labels: tuple[str, ...] = ()
    schema: dict[str, Any] | None = None
    node: ObjectNode | None = None
    instructions: str | None = None
    examples: tuple[Example, ...] = ()
    profile: str | None = None
    ignored: tuple[str, ...] = ()
    label_descriptions: tuple[tuple[str, str], ...] = ()  # (label, description)
    min_confidence: float | None = None  # below it, the answer is marked uncertain
    requester: str = ""  # who takes its replies (Topics.requester_of), for fair shares


def parse_job(
    delivery: Delivery,
    topics: Topics,
    limits: JobLimits,
    profiles: Mapping[str, Profile] | None = None,
    data: dict[str, Any] | None = None,
    route: ReplyRoute | None = None,
) -> Job:
    """Validate one job message; raises JobError with the code to reply with. The intake
    passes what it already worked out (the payload decoded as `data`, the reply `route`,
    the topic's kind in `delivery.kind`), so nothing is read twice."""
    topic_kind = delivery.kind if delivery.kind is not None else topics.kind_of(delivery.topic)
    if data is None:
        data = decode_payload(delivery.payload, limits)
    check_characters(data, delivery.payload)
    if route is None:
        route = reply_route(delivery, data, topics, limits)
    problem = reply_to_problem(delivery, data, topics, limits)
    if problem is not None:
        raise JobError(Code.INVALID_REPLY_TO, problem)
    if delivery.retained:
        raise JobError(
            Code.RETAINED_JOB,
            "the job came from the broker's retained store (published with retain): jobs "
            "must not be retained; clear it with an empty retained message on its topic",
        )
    version = data.get("v", WIRE_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version != WIRE_VERSION:
        raise JobError(Code.UNSUPPORTED_VERSION, f"v: this agent speaks version {WIRE_VERSION}")
    try:
        raw = JobIn.model_validate(data)
    except ValidationError as exc:
        raise _job_error(exc) from None
    kind, profile = _kind_and_profile(raw, topic_kind, profiles)
    _check_text(raw.text, limits)
    instructions = raw.instructions
    if instructions is None and profile is not None:
        instructions = profile.instructions
    if raw.instructions is not None and len(raw.instructions) > limits.max_instructions_chars:
        raise JobError(
            Code.INVALID_FIELD,
            f"instructions: longer than {limits.max_instructions_chars} characters",
        )
    examples = _examples(raw, profile, limits)
    deadline = _deadline(raw, delivery)
    ignored = echoed_names(set(data) - set(JobIn.model_fields) - {"schema"})
    common: dict[str, Any] = {
        "id": raw.id,
        "kind": kind,
        "text": raw.text,
        "route": route,
        "priority": raw.priority,
        "received_at": delivery.received_at,
        "deadline": deadline,
        "progress": raw.progress,
        "instructions": instructions,
        "profile": raw.profile,
        "ignored": ignored,
        "requester": topics.requester_of(route.topic),
        "min_confidence": raw.min_confidence
        if raw.min_confidence is not None
        else (profile.min_confidence if profile else None),
    }
    if kind == "classify":
        wanted = raw.labels
        if wanted is None and profile is not None and profile.labels:
            wanted = list(profile.labels)
        labels = _labels(wanted, limits)
        shots = tuple(_classify_example(e, labels) for e in examples)
        described = raw.label_descriptions
        if described is None and profile is not None and raw.labels is None:
            described = dict(profile.label_descriptions)
        descriptions = _descriptions(described or {}, labels)
        job = Job(labels=labels, examples=shots, label_descriptions=descriptions, **common)
    else:
        schema = raw.schema_ if raw.schema_ is not None else (profile.schema if profile else None)
        if schema is None:
            raise JobError(Code.MISSING_FIELD, "schema: an extract job needs a JSON Schema")
        node = compile_schema(schema, limits.schema)
        shots = tuple(_extract_example(e) for e in examples)
        job = Job(schema=schema, node=node, examples=shots, **common)
    _check_prompt_size(job, limits)
    return job


def _examples(raw: JobIn, profile: Profile | None, limits: JobLimits) -> list[ExampleIn]:
    examples = raw.examples
    own_shape = raw.labels is not None or raw.schema_ is not None
    if examples is None and profile is not None and not own_shape:
        # A profile's examples answer with its labels or schema: a job that brings its
        # own labels or schema does not get them.
        examples = [ExampleIn(text=t, answer=a) for t, a in profile.examples]
    examples = examples or []
    if len(examples) > limits.max_examples:
        raise JobError(Code.INVALID_FIELD, f"examples: more than {limits.max_examples}")
    for i, example in enumerate(examples):
        if len(example.text) > limits.max_text_chars:
            raise JobError(
                Code.INVALID_FIELD,
                f"examples.{i}.text: longer than {limits.max_text_chars} characters",
            )
    return examples


def echoed_names(names: set[str]) -> tuple[str, ...]:
    """Unknown field names as a reply lists them: the first MAX_IGNORED in sorted order,
    each cut to MAX_IGNORED_CHARS."""
    return tuple(clip(name, MAX_IGNORED_CHARS) for name in sorted(names)[:MAX_IGNORED])


def prompt_chars(job: Job) -> int:
    """Characters of everything a job puts in the prompt: instructions, labels or schema,
    examples and its text (what `jobs.max_prompt_chars` bounds)."""
    total = len(job.text) + len(job.instructions or "")
    total += sum(len(label) + 3 for label in job.labels)
    total += sum(len(text) + 2 for _label, text in job.label_descriptions)
    total += sum(len(e.text) + len(e.answer) for e in job.examples)
    if job.schema is not None:
        total += _schema_chars(job.schema)
    return total


def _schema_chars(schema: Any) -> int:
    """What a schema adds to the prompt: its property names, descriptions and fixed values."""
    if not isinstance(schema, dict):
        return 0
    total = 0
    description = schema.get("description")
    if isinstance(description, str):
        total += len(description)
    for key in ("enum", "const"):
        if key in schema:
            total += len(canonical_json(schema[key]))
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for name, sub in properties.items():
            total += len(name) + 12 + _schema_chars(sub)
    return total + _schema_chars(schema.get("items"))


def _check_prompt_size(job: Job, limits: JobLimits) -> None:
    size = prompt_chars(job)
    if size > limits.max_prompt_chars:
        raise JobError(
            Code.CONTEXT_TOO_LONG,
            f"the prompt (instructions, labels or schema, examples and text) is {size} "
            f"characters; this agent takes at most {limits.max_prompt_chars} "
            "(jobs.max_prompt_chars)",
        )


def _kind_and_profile(
    raw: JobIn, topic_kind: str | None, profiles: Mapping[str, Profile] | None
) -> tuple[Kind, Profile | None]:
    profile = None
    if raw.profile is not None:
        profile = (profiles or {}).get(raw.profile)
        if profile is None:
            raise JobError(
                Code.UNKNOWN_PROFILE, f"profile: {raw.profile!r} is not defined on this agent"
            )
    kind = raw.kind or topic_kind or (profile.kind if profile else None)
    if kind not in KINDS:
        raise JobError(Code.UNKNOWN_KIND, f"kind: must be one of {', '.join(KINDS)}")
    if topic_kind is not None and raw.kind is not None and raw.kind != topic_kind:
        raise JobError(
            Code.INVALID_FIELD, f"kind: {raw.kind!r} sent on the {topic_kind!r} job topic"
        )
    if profile is not None and profile.kind != kind:
        raise JobError(
            Code.INVALID_FIELD, f"profile: {raw.profile!r} is a {profile.kind} profile, not {kind}"
        )
    return kind, profile  # type: ignore[return-value]  # kind is checked to be a Kind


def _check_text(text: str, limits: JobLimits) -> None:
    if len(text) > limits.max_text_chars:
        raise JobError(
            Code.TEXT_TOO_LONG,
            f"text: {len(text)} characters, the limit is {limits.max_text_chars}",
        )
    if not text.strip():
        raise JobError(Code.INVALID_FIELD, "text: must not be empty")


def decode_payload(payload: bytes, limits: JobLimits) -> dict[str, Any]:
    if len(payload) > limits.max_payload_bytes:
        raise JobError(
            Code.PAYLOAD_TOO_LARGE,
            f"payload is {len(payload)} bytes, the limit is {limits.max_payload_bytes}",
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobError(Code.BAD_ENCODING, f"payload is not UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise JobError(Code.BAD_JSON, "payload nests too deeply") from None
    except ValueError as exc:
        raise JobError(Code.BAD_JSON, f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise JobError(Code.NOT_AN_OBJECT, "payload must be a JSON object")
    return data


def check_characters(data: dict[str, Any], payload: bytes) -> None:
    """Every string must be Unicode text. UTF-8 bytes cannot carry a lone surrogate, but a
    JSON escape can ("\\ud800"): such a string cannot be encoded again, nor tokenized.
    Only escapes make them, so look only when the payload has one."""
    if b"\\u" not in payload:
        return
    where = _surrogate_path(data, "")
    if where is not None:
        raise JobError(
            Code.INVALID_FIELD,
            f"{where or 'payload'}: contains a lone surrogate (a \\uD800-\\uDFFF escape "
            "without its pair), which is not a Unicode character",
        )


def _surrogate_path(value: Any, path: str) -> str | None:
    """The path of the first string (or key) holding a lone surrogate, else None."""
    if isinstance(value, str):
        return path if _has_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if _has_surrogate(key):
                return path or "payload"
            found = _surrogate_path(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _surrogate_path(item, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def reply_route(
    delivery: Delivery, data: Mapping[str, Any] | None, topics: Topics, limits: JobLimits
) -> ReplyRoute:
    """Where to answer, from MQTT 5 properties, else the payload, else the results topic.
    A reply topic that may not be used (see `reply_to_problem`) falls back to the results
    topic, where the rejection that says why goes."""
    payload = data or {}
    job_id = payload.get("id")
    corr_id = payload.get("correlation_id")
    route_id = job_id if isinstance(job_id, str) and 0 < len(job_id) <= MAX_ID_CHARS else None
    corr = corr_id if isinstance(corr_id, str) and len(corr_id) <= 256 else None
    wanted = _wanted_reply_topic(delivery, payload)
    usable = isinstance(wanted, str) and _reply_topic_problem(wanted, topics, limits) is None
    return ReplyRoute(
        topic=wanted if usable and isinstance(wanted, str) else topics.results(),
        correlation_data=delivery.correlation_data,
        correlation_id=corr if isinstance(corr, str) and not _has_surrogate(corr) else None,
        job_id=route_id if route_id is not None and not _has_surrogate(route_id) else None,
    )


def _wanted_reply_topic(delivery: Delivery, payload: Mapping[str, Any]) -> Any:
    if delivery.response_topic is not None:
        return delivery.response_topic
    return payload.get("reply_to")


def reply_to_problem(
    delivery: Delivery, data: Mapping[str, Any], topics: Topics, limits: JobLimits
) -> str | None:
    """Why the reply topic a job asked for cannot be used; None when it asked for none or
    for a usable one."""
    wanted = _wanted_reply_topic(delivery, data)
    if wanted is None:
        return None
    if not isinstance(wanted, str):
        return "reply_to: must be a string"
    return _reply_topic_problem(wanted, topics, limits)


def _reply_topic_problem(topic: str, topics: Topics, limits: JobLimits) -> str | None:
    if not valid_reply_topic(topic, limits):
        if limits.reply_topic_prefixes and valid_reply_topic(topic, JobLimits()):
            allowed = ", ".join(limits.reply_topic_prefixes)
            return f"reply_to: must start with one of: {allowed}"
        return "reply_to: not a valid topic to publish to (empty, wildcards, '$' or too long)"
    if topics.reserved(topic):
        return (
            "reply_to: a topic of the fleet's own (jobs, commands, device status, telemetry, "
            "Home Assistant discovery) cannot take replies; use e.g. "
            f"{topics.prefix}/replies/<you>/..."
        )
    return None


def valid_reply_topic(topic: str, limits: JobLimits) -> bool:
    if not topic or len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return False
    if topic_name_problem(topic) is not None or topic.startswith("$"):
        return False
    return not limits.reply_topic_prefixes or topic.startswith(limits.reply_topic_prefixes)


def topic_name_problem(topic: str) -> str | None:
    """Why `topic` cannot be published to, by the strictest reading of MQTT's rules, which
    is Mosquitto's: it drops the connection of a client that sends one (and the client's
    session resends it after every reconnect: one bad reply topic would cut a board off for
    good). None when it can."""
    if not topic:
        return "empty"
    if len(topic.encode("utf-8", "surrogatepass")) > 65535:
        return "longer than 65535 bytes"
    for c in topic:
        code = ord(c)
        if c in "+#":
            return "wildcards (+, #) cannot be published to"
        if code <= 0x1F or 0x7F <= code <= 0x9F:
            return "control characters are not allowed"
        if 0xD800 <= code <= 0xDFFF:
            return "not Unicode text (a lone surrogate)"
        if 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE:
            return "Unicode noncharacters are not allowed"
    return None


def _labels(labels: list[str] | None, limits: JobLimits) -> tuple[str, ...]:
    if labels is None:
        raise JobError(Code.MISSING_FIELD, "labels: a classify job needs a list of labels")
    if not labels:
        raise JobError(Code.INVALID_LABELS, "labels: must not be empty")
    if len(labels) > limits.max_labels:
        raise JobError(Code.INVALID_LABELS, f"labels: more than {limits.max_labels}")
    seen: set[str] = set()
    for label in labels:
        if not label.strip() or len(label) > limits.max_label_chars:
            raise JobError(
                Code.INVALID_LABELS,
                f"labels: each must be 1-{limits.max_label_chars} characters, not blank",
            )
        if any(ord(c) < 0x20 for c in label):
            raise JobError(Code.INVALID_LABELS, "labels: control characters are not allowed")
        if label in seen:
            raise JobError(Code.INVALID_LABELS, f"labels: {label!r} is listed twice")
        seen.add(label)
    return tuple(labels)


MAX_DESCRIPTION_CHARS = 200


def _descriptions(
    described: Mapping[str, str], labels: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    """Label descriptions, in the labels' order; each must describe one of the labels."""
    unknown = sorted(set(described) - set(labels))
    if unknown:
        raise JobError(
            Code.INVALID_LABELS,
            f"label_descriptions: {unknown[0]!r} is not one of the labels",
        )
    for label, text in described.items():
        if (
            not text.strip()
            or len(text) > MAX_DESCRIPTION_CHARS
            or any(ord(c) < 0x20 for c in text)
        ):
            raise JobError(
                Code.INVALID_LABELS,
                f"label_descriptions.{label}: 1-{MAX_DESCRIPTION_CHARS} characters of one line",
            )
    return tuple((label, described[label]) for label in labels if label in described)


def _classify_example(example: ExampleIn, labels: tuple[str, ...]) -> Example:
    if not isinstance(example.answer, str) or example.answer not in labels:
        raise JobError(Code.INVALID_FIELD, "examples: each answer must be one of the labels")
    return Example(text=example.text, answer=example.answer)


def _extract_example(example: ExampleIn) -> Example:
    if not isinstance(example.answer, dict):
        raise JobError(Code.INVALID_FIELD, "examples: each answer must be a JSON object")
    return Example(text=example.text, answer=canonical_json(example.answer))


def _deadline(raw: JobIn, delivery: Delivery) -> float | None:
    """The earliest of: MQTT 5 message expiry, `deadline`, `ttl_ms` (all from receipt),
    clamped to MAX_DEADLINE_S after receipt, so every deadline maps to a Message Expiry
    MQTT can carry. None when the job set none."""
    candidates: list[float] = []
    if delivery.expiry_s is not None:
        candidates.append(delivery.received_at + max(0, delivery.expiry_s))
    if raw.deadline is not None:
        # An absolute time, read once against the wall clock at receipt and kept as a
        # duration from then: a clock step later neither expires nor revives the job.
        wall = delivery.wall_at if delivery.wall_at is not None else delivery.received_at
        candidates.append(delivery.received_at + (parse_deadline(raw.deadline) - wall))
    if raw.ttl_ms is not None:
        candidates.append(delivery.received_at + raw.ttl_ms / 1000.0)
    if not candidates:
        return None
    return min(*candidates, delivery.received_at + MAX_DEADLINE_S)


def parse_deadline(text: str) -> float:
    """An ISO 8601 time with a zone, as a POSIX timestamp (any year 1-9999, any offset)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise JobError(
            Code.INVALID_FIELD, "deadline: not an ISO 8601 time (e.g. 2026-11-27T10:00:00Z)"
        ) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise JobError(Code.INVALID_FIELD, "deadline: needs a time zone (e.g. ...Z)")
    # timestamp() subtracts offsets without building the UTC datetime, which would
    # overflow for 9999-12-31T23:59:59-12:00 (astimezone raised OverflowError here).
    return moment.timestamp()


def _job_error(exc: ValidationError) -> JobError:
    err = exc.errors()[0]
    loc = [str(part) for part in err["loc"]]
    name = ".".join(loc) or "payload"
    top = loc[0] if loc else ""
    if err["type"] == "missing":
        return JobError(Code.MISSING_FIELD, f"{name}: required")
    if top == "labels":
        return JobError(Code.INVALID_LABELS, f"{name}: {err['msg']}")
    if top == "schema":
        return JobError(Code.INVALID_SCHEMA, f"{name}: {err['msg']}")
    if top == "kind":
        return JobError(Code.UNKNOWN_KIND, f"kind: must be one of {', '.join(KINDS)}")
    return JobError(Code.INVALID_FIELD, f"{name}: {err['msg']}")


# ---- replies ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One answer to one job, in the wire's own typed parts (`core.wire`); `encode()`
    gives the bytes sent."""

    job_id: str | None
    status: Status
    device: str
    route: ReplyRoute
    model: ModelRef | None = None
    result: ClassifyResult | ExtractResult | None = None
    error_code: Code | None = None
    error_message: str | None = None
    retry_after_ms: int | None = None
    timings: ReplyTimings | None = None
    ignored: tuple[str, ...] = ()

    def message(self) -> ReplyMessage:
        """The wire message: a reply that does not fit the documented shape raises here
        instead of reaching a sensor."""
        error = None
        if self.error_code is not None:
            error = ReplyError(
                code=str(self.error_code),
                message=self.error_message or "",
                retry_after_ms=self.retry_after_ms,
            )
        return ReplyMessage(
            v=WIRE_VERSION,
            id=self.job_id,
            status=str(self.status),  # type: ignore[arg-type]  # Status's values are the Literal's
            device=self.device,
            model=self.model,
            result=self.result,
            error=error,
            timings=self.timings,
            correlation_id=self.route.correlation_id,
            ignored=list(self.ignored) if self.ignored else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object sent (`ReplyMessage.wire`)."""
        return self.message().wire()

    def encode(self) -> bytes:
        return encode_json(self.to_dict())


def encode_json(body: Any) -> bytes:
    """Compact UTF-8 JSON. Non-ASCII text is written as UTF-8 (2-4 bytes a character), not
    as `\\uXXXX` escapes (6 or 12), which tripled the size of echoed input."""
    try:
        text = json.dumps(body, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only an escape can carry it
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def fit_reply(payload: bytes, room: int) -> bytes | None:
    """A reply of at most `room` bytes that says what it can of `payload` (an encoded
    reply): the reply itself; else without its echoes (`ignored`, `raw_scores`); else, in
    its place, `failed` / `reply_too_large` with its id and correlation id; None when not
    even that fits (a broker limit smaller than any reply)."""
    if len(payload) <= room:
        return payload
    body = json.loads(payload)
    body.pop("ignored", None)
    if isinstance(body.get("result"), dict):
        body["result"].pop("raw_scores", None)
    slim = encode_json(body)
    if len(slim) <= room:
        return slim
    small: dict[str, Any] = {
        "v": WIRE_VERSION,
        "id": body.get("id"),
        "status": str(Status.FAILED),
        "device": body.get("device"),
        "model": body.get("model"),
        "result": None,
        "error": {
            "code": str(Code.REPLY_TOO_LARGE),
            "message": f"the answer is {len(slim)} bytes; the broker takes messages of at "
            f"most {room} bytes here (MQTT Maximum Packet Size)",
        },
        "timings": body.get("timings"),
    }
    if body.get("correlation_id") is not None:
        small["correlation_id"] = body["correlation_id"]
    for attempt in (small, {**small, "model": None, "timings": None}):
        encoded = encode_json(ReplyMessage.model_validate(attempt).wire())
        if len(encoded) <= room:
            return encoded
    return None


def rejection(
    route: ReplyRoute, device: str, error: JobError, retry_after_ms: int | None = None
) -> Reply:
    return Reply(
        job_id=route.job_id,
        status=Status.REJECTED,
        device=device,
        route=route,
        error_code=error.code,
        error_message=error.message,
        retry_after_ms=retry_after_ms,
    )
