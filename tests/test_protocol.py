"""Wire contract v1: job parsing, error codes, reply routing (pure, no broker)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.core.errors import MAX_MESSAGE_CHARS, Code, JobError
from edge_agent.core.inference import Timings
from edge_agent.core.protocol import (
    MAX_IGNORED,
    MAX_IGNORED_CHARS,
    Delivery,
    JobLimits,
    Profile,
    Reply,
    ReplyRoute,
    Status,
    Topics,
    check_profile,
    fit_reply,
    parse_job,
    reply_route,
    topic_name_problem,
)
from edge_agent.core.wire import ClassifyResult, ModelRef, ReplyTimings

TOPICS = Topics(prefix="edge", device_id="pi-1", share_group="g")
LIMITS = JobLimits()
SCHEMA = {"type": "object", "properties": {"v": {"type": "number"}}, "required": ["v"]}


def delivery(payload: Any, topic: str = "edge/jobs/classify", **kw: Any) -> Delivery:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Delivery(topic=topic, payload=raw, received_at=1000.0, **kw)


def code_of(payload: Any, topic: str = "edge/jobs/classify", limits: JobLimits = LIMITS) -> Code:
    with pytest.raises(JobError) as info:
        parse_job(delivery(payload, topic), TOPICS, limits)
    return info.value.code


def test_classify_job_parses_with_kind_from_topic() -> None:
    job = parse_job(delivery({"id": "a", "text": "t", "labels": ["x", "y"]}), TOPICS, LIMITS)
    assert (job.kind, job.labels, job.priority) == ("classify", ("x", "y"), 5)
    assert job.route.topic == "edge/devices/pi-1/results"


def test_extract_job_compiles_its_schema() -> None:
    job = parse_job(
        delivery(
            {"id": "b", "kind": "extract", "text": "v=1", "schema": SCHEMA}, "edge/jobs/extract"
        ),
        TOPICS,
        LIMITS,
    )
    assert job.kind == "extract"
    assert job.node is not None


def test_device_topic_gives_the_kind() -> None:
    job = parse_job(
        delivery({"id": "c", "text": "t", "schema": SCHEMA}, "edge/devices/pi-1/jobs/extract"),
        TOPICS,
        LIMITS,
    )
    assert job.kind == "extract"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", Code.BAD_JSON),
        (b"\xff\xfe\x00", Code.BAD_ENCODING),
        ([1, 2], Code.NOT_AN_OBJECT),
        ({"text": "t", "labels": ["a"]}, Code.MISSING_FIELD),
        ({"id": "x", "labels": ["a"]}, Code.MISSING_FIELD),
        ({"id": "x", "text": "t"}, Code.MISSING_FIELD),
        ({"id": "x", "text": "t", "labels": []}, Code.INVALID_LABELS),
        ({"id": "x", "text": "t", "labels": ["a", "a"]}, Code.INVALID_LABELS),
        ({"id": "x", "text": "t", "labels": [" "]}, Code.INVALID_LABELS),
        ({"id": "x", "text": "t", "labels": "a,b"}, Code.INVALID_LABELS),
        ({"id": "x", "text": "t", "labels": [1, 2]}, Code.INVALID_LABELS),
        ({"id": "x", "text": 5, "labels": ["a"]}, Code.INVALID_FIELD),
        ({"id": "x", "text": "", "labels": ["a"]}, Code.INVALID_FIELD),
        ({"id": "", "text": "t", "labels": ["a"]}, Code.INVALID_FIELD),
        ({"id": "x", "text": "t", "labels": ["a"], "priority": 12}, Code.INVALID_FIELD),
        ({"id": "x", "text": "t", "labels": ["a"], "v": 2}, Code.UNSUPPORTED_VERSION),
        ({"id": "x", "text": "t", "labels": ["a"], "kind": "summarise"}, Code.UNKNOWN_KIND),
        ({"id": "x", "text": "t", "labels": ["a"], "kind": "extract"}, Code.INVALID_FIELD),
        ({"id": "x", "text": "t", "labels": ["a"], "reply_to": "a/+/b"}, Code.INVALID_REPLY_TO),
        ({"id": "x", "text": "t", "labels": ["a"], "reply_to": "$SYS/x"}, Code.INVALID_REPLY_TO),
        ({"id": "x", "text": "t", "labels": ["a"], "reply_to": 7}, Code.INVALID_REPLY_TO),
        (
            {"id": "x", "text": "t", "labels": ["a"], "deadline": "2030-01-01T00:00:00"},
            Code.INVALID_FIELD,
        ),
        (
            {"id": "x", "text": "t", "labels": ["a"], "examples": [{"text": "q", "answer": "z"}]},
            Code.INVALID_FIELD,
        ),
    ],
)
def test_bad_classify_jobs_get_stable_codes(payload: Any, code: Code) -> None:
    assert code_of(payload) == code


@pytest.mark.parametrize(
    ("schema", "code"),
    [
        ({"type": "string"}, Code.INVALID_SCHEMA),
        ("not a schema", Code.INVALID_SCHEMA),
        (
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "^x"}}},
            Code.UNSUPPORTED_SCHEMA,
        ),
        ({"type": "object", "properties": {"a": {"$ref": "#/x"}}}, Code.UNSUPPORTED_SCHEMA),
        (
            {"type": "object", "properties": {"a": {"type": "number", "minimum": 0}}},
            Code.UNSUPPORTED_SCHEMA,
        ),
        ({"type": "object", "properties": {"a": {"type": "wat"}}}, Code.INVALID_SCHEMA),
        (
            {"type": "object", "required": ["b"], "properties": {"a": {"type": "string"}}},
            Code.INVALID_SCHEMA,
        ),
        ({"type": "object", "properties": {"a": {"type": "array"}}}, Code.INVALID_SCHEMA),
        ({"type": "object", "properties": {"a": {"enum": []}}}, Code.INVALID_SCHEMA),
        (
            {"type": "object", "properties": {"a": {"type": "object", "oneOf": []}}},
            Code.UNSUPPORTED_SCHEMA,
        ),
    ],
)
def test_bad_schemas_are_rejected_before_running(schema: Any, code: Code) -> None:
    job = {"id": "x", "kind": "extract", "text": "t", "schema": schema}
    assert code_of(job, "edge/jobs/extract") == code


def test_schema_nesting_limit() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(10):
        schema = {"type": "object", "properties": {"n": schema}}
    assert (
        code_of({"id": "x", "text": "t", "schema": schema}, "edge/jobs/extract")
        == Code.INVALID_SCHEMA
    )


def test_text_over_the_limit_is_rejected() -> None:
    limits = JobLimits(max_text_chars=10)
    assert (
        code_of({"id": "x", "text": "0123456789A", "labels": ["a"]}, limits=limits)
        == Code.TEXT_TOO_LONG
    )


def test_payload_over_the_limit_is_rejected_before_parsing() -> None:
    limits = JobLimits(max_payload_bytes=1024)
    assert code_of(b"{" + b" " * 2000 + b"}", limits=limits) == Code.PAYLOAD_TOO_LARGE


def test_deeply_nested_json_is_bad_json_not_a_crash() -> None:
    assert (
        code_of(b"[" * 100_000 + b"]" * 100_000, limits=JobLimits(max_payload_bytes=1 << 20))
        == Code.BAD_JSON
    )


def test_nan_is_not_json() -> None:
    assert code_of(b'{"id": "x", "text": "t", "labels": ["a"], "priority": NaN}') == Code.BAD_JSON


def test_mqtt5_response_topic_wins_and_correlation_is_kept() -> None:
    d = delivery(
        {"id": "x", "text": "t", "labels": ["a"], "reply_to": "edge/replies/other"},
        response_topic="edge/replies/s1",
        correlation_data=b"\x01\x02",
    )
    job = parse_job(d, TOPICS, LIMITS)
    assert job.route.topic == "edge/replies/s1"
    assert job.route.correlation_data == b"\x01\x02"


def test_reply_to_and_correlation_id_in_the_payload_for_mqtt311() -> None:
    job = parse_job(
        delivery(
            {"id": "x", "text": "t", "labels": ["a"], "reply_to": "r/1", "correlation_id": "c9"}
        ),
        TOPICS,
        LIMITS,
    )
    assert (job.route.topic, job.route.correlation_id) == ("r/1", "c9")


def test_reply_prefixes_confine_reply_topics() -> None:
    limits = JobLimits(reply_topic_prefixes=("edge/replies/",))
    assert (
        code_of(
            {"id": "x", "text": "t", "labels": ["a"], "reply_to": "edge/devices/b/status"},
            limits=limits,
        )
        == Code.INVALID_REPLY_TO
    )
    job = parse_job(
        delivery({"id": "x", "text": "t", "labels": ["a"], "reply_to": "edge/replies/s/1"}),
        TOPICS,
        limits,
    )
    assert job.route.topic == "edge/replies/s/1"


def test_route_of_an_unparseable_job_is_the_results_topic() -> None:
    route = reply_route(delivery(b"garbage"), None, TOPICS, LIMITS)
    assert route == ReplyRoute(topic="edge/devices/pi-1/results")


def test_deadline_is_the_earliest_of_expiry_ttl_and_deadline() -> None:
    d = delivery(
        {
            "id": "x",
            "text": "t",
            "labels": ["a"],
            "ttl_ms": 5000,
            "deadline": "1970-01-01T00:20:00Z",
        },
        expiry_s=3,
    )
    assert parse_job(d, TOPICS, LIMITS).deadline == 1003.0


def test_unknown_fields_are_ignored_and_listed() -> None:
    job = parse_job(
        delivery({"id": "x", "text": "t", "labels": ["a"], "colour": "red"}), TOPICS, LIMITS
    )
    assert job.ignored == ("colour",)


def test_reply_wire_form() -> None:
    reply = Reply(
        job_id="x",
        status=Status.REJECTED,
        device="pi-1",
        route=ReplyRoute(topic="r", correlation_id="c"),
        error_code=Code.OVERLOADED,
        error_message="full",
        retry_after_ms=300,
    )
    body = json.loads(reply.encode())
    assert body == {
        "v": 1,
        "id": "x",
        "status": "rejected",
        "device": "pi-1",
        "model": None,
        "result": None,
        "error": {"code": "overloaded", "message": "full", "retry_after_ms": 300},
        "timings": None,
        "correlation_id": "c",
    }


def test_timings_rates_are_the_engines_rounded_once() -> None:
    t = ReplyTimings.of(Timings(100, 500, 30, 10, 50), queue_ms=1, total_ms=601.04)
    assert t.tokens_per_second == 100.0
    assert t.prompt_tokens_per_second == 300.0
    assert t.total_ms == 601.0
    assert ReplyTimings.of(Timings(), 0, 0).tokens_per_second is None
    assert ReplyTimings.of(Timings(gen_ms=float("nan")), 0, float("inf")).total_ms == 0.0


def test_a_done_reply_carries_the_typed_result_model_and_timings_as_sent() -> None:
    reply = Reply(
        job_id="x", status=Status.DONE, device="pi-1", route=ReplyRoute(topic="r"),
        model=ModelRef(name="m", quant="Q4_1", sha256=None),
        result=ClassifyResult(label="ok", scores={"ok": 0.9, "bad": 0.1}, confidence=0.9),
        timings=ReplyTimings.of(Timings(10, 20, 5, 0, 1), 0, 30),
    )  # fmt: skip
    body = json.loads(reply.encode())
    assert body["result"] == {"label": "ok", "scores": {"ok": 0.9, "bad": 0.1}, "confidence": 0.9}
    assert body["model"] == {"name": "m", "quant": "Q4_1", "sha256": None}
    assert body["timings"]["tokens_per_second"] == 50.0


def test_topics_are_built_in_one_place() -> None:
    assert TOPICS.shared_fleet_jobs("extract") == "$share/g/edge/jobs/extract"
    assert TOPICS.kind_of("edge/jobs/classify") == "classify"
    assert TOPICS.kind_of("edge/devices/pi-1/jobs/extract") == "extract"
    assert TOPICS.kind_of("edge/devices/pi-2/jobs/extract") is None
    assert TOPICS.kind_of("edge/devices/pi-1/status") is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
job_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=5), st.integers()),
        "text": st.one_of(st.text(max_size=20), st.integers()),
        "kind": st.sampled_from(["classify", "extract", "x", ""]),
        "labels": st.one_of(st.lists(st.text(max_size=6), max_size=4), json_values),
        "schema": json_values,
        "reply_to": st.one_of(st.text(max_size=10), json_values),
        "priority": json_values,
        "ttl_ms": json_values,
        "deadline": st.one_of(st.text(max_size=25), json_values),
        "examples": json_values,
        "progress": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        job_like.map(lambda v: json.dumps(v).encode()),
    )
)
def test_parser_never_fails_other_than_with_a_job_error(payload: bytes) -> None:
    for topic in ("edge/jobs/classify", "edge/jobs/extract"):
        try:
            job = parse_job(Delivery(topic=topic, payload=payload, received_at=0.0), TOPICS, LIMITS)
        except JobError as exc:
            assert exc.code in set(Code)
            assert exc.message
        else:
            assert job.id and job.text.strip()
            assert job.kind in ("classify", "extract")


PROFILES = {
    "severity": Profile(
        kind="classify",
        instructions="Rate it.",
        labels=("normal", "critical"),
        examples=(("Fire!", "critical"),),
    ),
    "reading": Profile(kind="extract", schema=SCHEMA),
}


def test_a_profile_supplies_the_job_shape() -> None:
    job = parse_job(
        delivery({"id": "p", "profile": "severity", "text": "Smoke in hall 2."}),
        TOPICS,
        LIMITS,
        PROFILES,
    )
    assert (job.labels, job.instructions, job.profile) == (
        ("normal", "critical"),
        "Rate it.",
        "severity",
    )
    assert job.examples[0].answer == "critical"
    job = parse_job(
        delivery({"id": "q", "profile": "reading", "text": "v=2"}, "edge/jobs/extract"),
        TOPICS,
        LIMITS,
        PROFILES,
    )
    assert job.schema == SCHEMA


def test_the_job_overrides_its_profile() -> None:
    job = parse_job(
        delivery({"id": "p", "profile": "severity", "text": "t", "labels": ["x", "y"]}),
        TOPICS,
        LIMITS,
        PROFILES,
    )
    assert job.labels == ("x", "y")


def test_profile_errors() -> None:
    with pytest.raises(JobError) as info:
        parse_job(delivery({"id": "p", "profile": "nope", "text": "t"}), TOPICS, LIMITS, PROFILES)
    assert info.value.code == Code.UNKNOWN_PROFILE
    with pytest.raises(JobError) as info:
        parse_job(
            delivery({"id": "p", "profile": "reading", "text": "t"}), TOPICS, LIMITS, PROFILES
        )
    assert info.value.code == Code.INVALID_FIELD  # an extract profile on the classify topic


def test_profiles_are_checked_when_configured() -> None:
    check_profile("ok", PROFILES["severity"], LIMITS)
    with pytest.raises(JobError, match="labels"):
        check_profile("bad", Profile(kind="classify", labels=()), LIMITS)
    with pytest.raises(JobError, match="one of the labels"):
        check_profile(
            "bad", Profile(kind="classify", labels=("a",), examples=(("t", "b"),)), LIMITS
        )
    with pytest.raises(JobError, match="needs one"):
        check_profile("bad", Profile(kind="extract"), LIMITS)


@pytest.mark.parametrize(
    ("topic", "ok"),
    [
        ("edge/replies/s1", True),
        ("edge/r\u00e9plies/\U0001f600", True),
        ("", False),
        ("a/+/b", False),
        ("a/#", False),
        ("a\x00b", False),
        ("bell\x07", False),
        ("del\x7f", False),
        ("nel\x85", False),
        ("non\ufdd0char", False),
        ("non\uffffchar", False),
        ("non\U0001fffechar", False),
        ("lone\ud800", False),
        ("x" * 65536, False),
    ],
)
def test_topic_names_follow_the_strictest_brokers_rules(topic: str, ok: bool) -> None:
    assert (topic_name_problem(topic) is None) is ok


# ---- replies within the broker's limits (issue 21) ---------------------------------------


def test_a_reply_lists_a_bounded_number_of_unknown_fields_each_cut_short() -> None:
    body = {
        "id": "a",
        "text": "t",
        "labels": ["x"],
        **{f"{i:03d}" + "ж" * 90: 1 for i in range(100)},
    }
    job = parse_job(delivery(body), TOPICS, LIMITS)
    assert len(job.ignored) == MAX_IGNORED
    assert all(len(name) <= MAX_IGNORED_CHARS for name in job.ignored)
    assert job.ignored[0].startswith("000ж") and job.ignored[0].endswith("…")


def test_an_error_message_quoting_a_huge_key_is_cut_short() -> None:
    huge = "ж" * 10_000
    with pytest.raises(JobError) as info:
        parse_job(
            delivery({"id": "a", "text": "t", "labels": ["x"], "label_descriptions": {huge: "d"}}),
            TOPICS,
            LIMITS,
        )
    assert info.value.code == Code.INVALID_LABELS
    assert len(info.value.message) <= MAX_MESSAGE_CHARS


def test_replies_are_written_as_utf8_not_escapes() -> None:
    reply = Reply(
        job_id="ж", status=Status.REJECTED, device="d", route=ReplyRoute("r"),
        error_code=Code.BAD_JSON, error_message="ж" * 100,
    )  # fmt: skip
    encoded = reply.encode()
    assert b"\\u" not in encoded
    assert len(encoded) < 2 * 101 + 150  # 2 bytes a character, not 6
    assert json.loads(encoded)["error"]["message"] == "ж" * 100


def done_reply(ignored: int = 0, labels: int = 2) -> bytes:
    scores = {f"label-{i}": 1.0 / labels for i in range(labels)}
    return Reply(
        job_id="j", status=Status.DONE, device="d", route=ReplyRoute("r", correlation_id="c"),
        result=ClassifyResult(label="label-0", scores=scores, raw_scores=scores, confidence=0.5),
        ignored=tuple(f"{i:03d}" for i in range(ignored)),
    ).encode()  # fmt: skip


def test_a_reply_that_fits_is_sent_as_it_is() -> None:
    payload = done_reply(ignored=3)
    assert fit_reply(payload, len(payload)) is payload


def test_a_reply_slightly_too_large_loses_its_echoes_first() -> None:
    payload = done_reply(ignored=16)
    fitted = fit_reply(payload, len(payload) - 1)
    assert fitted is not None and len(fitted) < len(payload)
    body = json.loads(fitted)
    assert body["status"] == "done" and "ignored" not in body and "raw_scores" not in body["result"]
    assert body["result"]["scores"] == json.loads(payload)["result"]["scores"]


def test_a_reply_far_too_large_is_replaced_by_reply_too_large() -> None:
    payload = done_reply(labels=32)
    fitted = fit_reply(payload, 400)
    assert fitted is not None and len(fitted) <= 400
    body = json.loads(fitted)
    assert (body["status"], body["error"]["code"]) == ("failed", "reply_too_large")
    assert (body["id"], body["correlation_id"]) == ("j", "c")
    assert fit_reply(payload, 40) is None  # nothing can be that small
