"""End to end: a real Mosquitto, the agent as a subprocess with the bundled model, jobs
published by paho (MQTT 5) and by `mosquitto_pub -V 311`, as sensors would."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import Requester
from edge_agent.core.schema import schema_for_fields
from edge_agent.service.worker import SHARE_MEMORY_S
from tests.harness.clients import eval_rows, replies_retrying_overloaded, reply_for
from tests.harness.process import AgentProcess, start_agent_process, wait_for_log

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def e2e_prefix() -> str:
    return f"e2e{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def agent(
    broker: LocalBroker, e2e_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    running = start_agent_process(broker.url, e2e_prefix, tmp_path_factory.mktemp("agent"))
    yield running
    running.kill()


@pytest.fixture
def client(broker: LocalBroker, e2e_prefix: str) -> Iterator[Requester]:
    c = Requester("127.0.0.1", broker.port, f"sensor-{uuid.uuid4().hex[:6]}")
    c.connect()
    c.subscribe(f"{e2e_prefix}/replies/#")
    c.subscribe(f"{e2e_prefix}/devices/+/results")
    yield c
    c.close()


def mixed_jobs(n: int) -> list[dict[str, Any]]:
    classify = eval_rows("sensor_classify.jsonl") + eval_rows("loghub_openssh_classify.jsonl")
    extract = eval_rows("sensor_extract.jsonl") + eval_rows("loghub_openssh_extract.jsonl")
    jobs = []
    for i in range(n):
        if i % 2 == 0:
            row = classify[i * 3 % len(classify)]
            jobs.append(
                {
                    "id": f"c{i}-{uuid.uuid4().hex[:4]}",
                    "kind": "classify",
                    "text": row["text"],
                    "labels": row["labels"],
                }
            )
        else:
            row = extract[i * 5 % len(extract)]
            jobs.append(
                {
                    "id": f"x{i}-{uuid.uuid4().hex[:4]}",
                    "kind": "extract",
                    "text": row["text"],
                    "schema": schema_for_fields(row["fields"]),
                }
            )
    return jobs


def check_done(job: dict[str, Any], reply: dict[str, Any]) -> None:
    assert reply["status"] == "done", reply
    assert reply["model"]["name"] == "smollm2-135m-instruct-q4_1"
    assert (
        reply["model"]["sha256"]
        == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    )
    assert reply["timings"]["total_ms"] >= reply["timings"]["prompt_ms"] > 0
    if job["kind"] == "classify":
        assert reply["result"]["label"] in job["labels"]
        assert set(reply["result"]["scores"]) == set(job["labels"])
        assert sum(reply["result"]["scores"].values()) == pytest.approx(1.0, abs=1e-3)
        label = reply["result"]["label"]
        assert reply["result"]["confidence"] == reply["result"]["scores"][label]
        assert set(reply["result"]["raw_scores"]) == set(job["labels"])
    else:
        jsonschema.validate(reply["result"]["data"], job["schema"])
        assert set(reply["result"]["confidence"]) <= set(reply["result"]["data"])
        assert reply["timings"]["completion_tokens"] > 0
        assert reply["timings"]["tokens_per_second"] > 0


def test_twenty_mixed_jobs_over_mqtt5_and_mqtt311_are_all_answered(
    agent: AgentProcess, client: Requester, e2e_prefix: str
) -> None:
    mosquitto_pub = shutil.which("mosquitto_pub")
    assert mosquitto_pub, "mosquitto_pub (Debian package mosquitto-clients) is needed"
    port = client.port
    jobs = mixed_jobs(20)

    def publish(i: int, job: dict[str, Any]) -> None:
        topic = f"{e2e_prefix}/jobs/{job['kind']}"
        if i < 10:  # an MQTT 5 sensor: Response Topic and Correlation Data
            client.publish(
                topic,
                json.dumps(job).encode(),
                response_topic=f"{e2e_prefix}/replies/v5",
                correlation_data=job["id"].encode(),
            )
            return
        # an MQTT 3.1.1 sensor: reply_to and correlation_id in the payload
        body = {**job, "reply_to": f"{e2e_prefix}/replies/v311", "correlation_id": f"corr-{i}"}
        subprocess.run(
            [mosquitto_pub, "-V", "311", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
             "-t", topic, "-m", json.dumps(body)],
            check=True,
            timeout=10,
        )  # fmt: skip

    # two sensors bursting at once: each job may be told to retry, and is, on its own clock
    index = {job["id"]: i for i, job in enumerate(jobs)}
    replies = replies_retrying_overloaded(
        client, list(index), lambda job_id: publish(index[job_id], jobs[index[job_id]])
    )
    for i, job in enumerate(jobs):
        reply = replies[job["id"]]
        check_done(job, reply)
        if i < 10:
            assert reply["_topic"] == f"{e2e_prefix}/replies/v5"
            assert reply["_correlation"] == job["id"].encode()
        else:
            assert reply["_topic"] == f"{e2e_prefix}/replies/v311"
            assert reply["correlation_id"] == f"corr-{i}"


MALFORMED: list[tuple[bytes, str]] = [
    (b"{this is not json", "bad_json"),
    (b"\xff\xfe\xfd", "bad_encoding"),
    (b'["a", "list"]', "not_an_object"),
    (b'{"id": "m4", "labels": ["a"]}', "missing_field"),
    (b'{"id": "m5", "text": "t", "labels": []}', "invalid_labels"),
    (
        b'{"id": "m6", "kind": "extract", "text": "t", "schema": {"type": "object", "properties": {"a": {"type": "frobnicate"}}}}',
        "invalid_schema",
    ),
    (json.dumps({"id": "m7", "text": "x" * 5000, "labels": ["a", "b"]}).encode(), "text_too_long"),
    (b'{"id": "m8", "text": 42, "labels": ["a"]}', "invalid_field"),
    (b"[" * 20000 + b"]" * 20000, "bad_json"),  # nested past the parser's recursion limit
    (b'{"id": "m10", "kind": "summarise", "text": "t", "labels": ["a"]}', "unknown_kind"),
]


def test_ten_malformed_payloads_are_rejected_and_the_agent_keeps_serving(
    agent: AgentProcess, client: Requester, e2e_prefix: str
) -> None:
    reply_topic = f"{e2e_prefix}/replies/bad"
    for i, (payload, _) in enumerate(MALFORMED):
        kind = "extract" if b'"kind": "extract"' in payload else "classify"
        # MQTT 5 lets even an unparseable job say where its answer goes
        client.publish(
            f"{e2e_prefix}/jobs/{kind}",
            payload,
            response_topic=reply_topic,
            correlation_data=f"bad-{i}".encode(),
        )
    for i, (_, code) in enumerate(MALFORMED):
        msg = client.wait_for(lambda m, i=i: m.correlation_data == f"bad-{i}".encode(), 30)
        assert msg is not None, f"no reply for malformed payload {i}"
        body = json.loads(msg.payload)
        assert body["status"] == "rejected"
        assert body["error"]["code"] == code, (i, body)
    assert agent.alive()
    job = mixed_jobs(1)[0]
    client.publish(
        f"{e2e_prefix}/jobs/classify", json.dumps(job).encode(), response_topic=reply_topic
    )
    check_done(job, reply_for(client, job["id"]))
    rejected = [e for e in agent.log_events() if e.get("event") == "job.rejected"]
    assert len(rejected) >= len(MALFORMED)
    assert all("code" in e for e in rejected)


def test_job_without_reply_topic_is_answered_on_the_device_results_topic(
    agent: AgentProcess, client: Requester, e2e_prefix: str
) -> None:
    job = {
        "id": f"plain-{uuid.uuid4().hex[:6]}",
        "text": "Door D-1 opened.",
        "labels": ["open", "closed"],
    }
    client.publish(
        f"{e2e_prefix}/devices/{agent.device_id}/jobs/classify", json.dumps(job).encode()
    )
    reply = reply_for(client, job["id"])
    assert reply["_topic"] == f"{e2e_prefix}/devices/{agent.device_id}/results"
    assert reply["device"] == agent.device_id


def test_presence_and_telemetry(agent: AgentProcess, client: Requester, e2e_prefix: str) -> None:
    client.subscribe(f"{e2e_prefix}/devices/{agent.device_id}/status")
    status = client.wait_for(lambda m: m.topic.endswith("/status"), 10)
    assert status is not None and status.payload == b"online" and status.retain
    client.subscribe(f"{e2e_prefix}/devices/{agent.device_id}/telemetry", qos=0)
    msg = client.wait_for(lambda m: m.topic.endswith("/telemetry"), 10)
    assert msg is not None
    body = json.loads(msg.payload)
    assert body["device"] == agent.device_id
    assert body["memory"]["agent_rss_bytes"] > 0
    assert body["cpu_percent"] >= 0
    assert set(body["jobs"]) >= {"done", "failed", "rejected"}
    assert body["queue_depth"] >= 0


def test_sigterm_publishes_stopped_and_exits_cleanly(
    broker: LocalBroker, prefix: str, tmp_path: Path, requester: Requester
) -> None:
    agent = start_agent_process(broker.url, prefix, tmp_path / "s")
    try:
        requester.subscribe(f"{prefix}/devices/{agent.device_id}/status")
        first = requester.wait_for(lambda m: m.topic.endswith("/status"), 10)
        assert first is not None and first.payload == b"online"
        assert agent.terminate() == 0
        last = requester.wait_for(lambda m: m.topic.endswith("/status"), 10)
        assert last is not None and last.payload == b"stopped"
    finally:
        agent.kill()


def test_mqtt311_agent_serves_fleet_jobs(
    broker: LocalBroker, prefix: str, tmp_path: Path, requester: Requester
) -> None:
    agent = start_agent_process(broker.url, prefix, tmp_path / "v311", protocol="3.1.1")
    try:
        requester.subscribe(f"{prefix}/replies/#")
        job = {
            "id": "old-1",
            "text": "Valve V-9 stuck open.",
            "labels": ["ok", "fault"],
            "reply_to": f"{prefix}/replies/x",
        }
        requester.publish(f"{prefix}/jobs/classify", json.dumps(job).encode())
        reply = reply_for(requester, "old-1")
        assert reply["status"] == "done"
        assert reply["result"]["label"] in ("ok", "fault")
    finally:
        agent.kill()


def test_retained_device_info_carries_the_model_choice(
    agent: AgentProcess, client: Requester, e2e_prefix: str
) -> None:
    client.subscribe(f"{e2e_prefix}/devices/{agent.device_id}/info")
    msg = client.wait_for(lambda m: m.topic.endswith("/info"), 10)
    assert msg is not None and msg.retain
    info = json.loads(msg.payload)
    assert info["device"] == agent.device_id
    assert info["session"] >= 1
    model = info["model"]
    assert model["name"] == "smollm2-135m-instruct-q4_1"
    assert model["sha256"].startswith("b179c952")
    assert model["reason"]
    assert model["context"] == 2048
    assert any(s["reason"] == "not downloaded" for s in model["skipped"])  # the chain above it
    assert info["capabilities"]["kinds"] == ["classify", "extract"]
    assert info["board"]["ram_total_bytes"] > 0


def test_progress_then_cancel_of_a_running_job(
    agent: AgentProcess, client: Requester, e2e_prefix: str
) -> None:
    job = {
        "id": f"long-{uuid.uuid4().hex[:6]}",
        "kind": "extract",
        "progress": True,
        "text": "Write everything you know about pumps.",
        "schema": {
            "type": "object",
            "properties": {"notes": {"type": "array", "items": {"type": "string"}, "minItems": 16}},
        },
    }
    client.publish(
        f"{e2e_prefix}/jobs/extract",
        json.dumps(job).encode(),
        response_topic=f"{e2e_prefix}/replies/p",
    )
    statuses = []
    for _ in range(2):
        msg = client.wait_for(lambda m: json.loads(m.payload).get("id") == job["id"], 30)
        assert msg is not None
        statuses.append(json.loads(msg.payload)["status"])
    assert statuses == ["accepted", "running"]
    # A cancel names the job by its id and its reply topic (its key), as the job did.
    client.publish(f"{e2e_prefix}/jobs/cancel", json.dumps({"id": job["id"]}).encode())
    client.publish(
        f"{e2e_prefix}/jobs/cancel",
        json.dumps({"id": job["id"]}).encode(),
        response_topic=f"{e2e_prefix}/replies/other",
    )
    still = client.wait_for(lambda m: json.loads(m.payload).get("id") == job["id"], 1.0)
    assert still is None, "a cancel without the job's reply topic must not cancel it"
    client.publish(
        f"{e2e_prefix}/jobs/cancel",
        json.dumps({"id": job["id"]}).encode(),
        response_topic=f"{e2e_prefix}/replies/p",
    )
    reply = reply_for(client, job["id"], timeout=30)
    assert reply["status"] == "cancelled"
    assert reply["error"]["code"] == "cancelled"


@pytest.mark.timeout(900)
def test_message_expiry_is_the_deadline(
    agent: AgentProcess, client: Requester, e2e_prefix: str
) -> None:
    # One blocker per job the agent runs at once (jobs.parallel), so the late job queues.
    # Each writes 64 strings over the slots (16 per array, the default limit): seconds of
    # generation, so the late job waits well past its 1 s expiry, and no more than the
    # shared context holds (more would preempt a blocker and let the late job in).
    slots = wait_for_log(agent, "model.loaded", 5)["parallel"]
    arrays = 4
    blocker = {
        "id": f"block-{uuid.uuid4().hex[:6]}",
        "kind": "extract",
        "text": "Write a long note.",
        "progress": True,
        "schema": {
            "type": "object",
            "properties": {
                f"n{i}": {"type": "array", "items": {"type": "string"}, "minItems": 16}
                for i in range(arrays)
            },
            "required": [f"n{i}" for i in range(arrays)],
        },
    }
    late = {"id": f"late-{uuid.uuid4().hex[:6]}", "text": "Door open.", "labels": ["a", "b"]}
    blockers = [{**blocker, "id": f"{blocker['id']}-{i}"} for i in range(slots)]
    time.sleep(SHARE_MEMORY_S + 0.2)  # the module's earlier requesters hold no share now
    for job in blockers:
        client.publish(
            f"{e2e_prefix}/devices/{agent.device_id}/jobs/extract",
            json.dumps(job).encode(),
            response_topic=f"{e2e_prefix}/replies/e",
        )
    # Only once the blockers run: queued side by side, the late job's earlier deadline
    # would put it first (earliest deadline first), and it would be answered in time. All
    # run, or all but one while the module's earlier requesters count as using the agent
    # (fair shares keep a slot free for them, docs/delivery.md): the late job, of the
    # blockers' requester, cannot take that one either.
    ids = {job["id"] for job in blockers}
    for _ in range(slots - 1):
        running = client.wait_for(
            lambda m: (
                json.loads(m.payload).get("id") in ids
                and json.loads(m.payload).get("status") == "running"
            ),
            60,
        )
        assert running is not None, "a blocker never started"
    time.sleep(1.0)  # the scheduler starts what it will between two steps
    client.publish(
        f"{e2e_prefix}/devices/{agent.device_id}/jobs/classify",
        json.dumps(late).encode(),
        response_topic=f"{e2e_prefix}/replies/e",
        expiry_s=1,
    )
    # its expired reply comes when a blocker ends: seconds quiet, minutes beside a CPU hog
    reply = reply_for(client, late["id"], timeout=420)
    assert reply["status"] == "expired"
    assert reply["error"]["code"] == "deadline_exceeded"
    blocked = reply_for(client, blockers[0]["id"], timeout=120)
    for job in blockers[1:]:  # the agent is idle again for the next test
        assert reply_for(client, job["id"], timeout=120)["status"] == "done"
    print(f"\nblocker ran {blocked['timings']['total_ms']:.0f} ms")
