"""No single message can stop a board: the reproductions of issue 12, each against a real
Mosquitto and the agent (real model) as a subprocess.

Each test sends the hostile message, checks it gets exactly one documented answer, and then
checks the agent still answers an ordinary job: a board nobody can reach must survive.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import Requester
from tests.harness.clients import reply_for
from tests.harness.process import AgentProcess, start_agent_process, wait_for_log

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def pprefix() -> str:
    return f"ps{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def agent(
    broker: LocalBroker, pprefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    running = start_agent_process(broker.url, pprefix, tmp_path_factory.mktemp("agent"))
    yield running
    running.kill()


@pytest.fixture
def client(broker: LocalBroker, pprefix: str) -> Iterator[Requester]:
    c = Requester("127.0.0.1", broker.port, f"sensor-{uuid.uuid4().hex[:6]}")
    c.connect()
    c.subscribe(f"{pprefix}/replies/#")
    c.subscribe(f"{pprefix}/devices/+/results")
    yield c
    c.close()


def send(
    client: Requester,
    topic: str,
    job: dict[str, Any] | bytes,
    reply_topic: str | None = None,
    **props: Any,
) -> None:
    payload = job if isinstance(job, bytes) else json.dumps(job).encode()
    client.publish(topic, payload, response_topic=reply_topic, **props)


def still_answers(client: Requester, agent: AgentProcess) -> None:
    """The board keeps working: an ordinary job is answered, and nothing crashed."""
    job_id = f"ok-{uuid.uuid4().hex[:6]}"
    send(
        client,
        f"{agent.prefix}/devices/{agent.device_id}/jobs/classify",
        {"id": job_id, "text": "Door D-4 closed.", "labels": ["ok", "alarm"]},
        f"{agent.prefix}/replies/me",
    )
    assert reply_for(client, job_id, timeout=30)["status"] == "done"
    assert agent.alive()
    crashed = [
        e
        for e in agent.log_events()
        if e.get("event") in ("mqtt.callback_failed", "job.crashed", "job.intake_failed")
    ]
    assert crashed == []


def device_topic(agent: AgentProcess, kind: str = "classify") -> str:
    return f"{agent.prefix}/devices/{agent.device_id}/jobs/{kind}"


def test_a_deadline_in_year_9999_is_answered_and_the_board_keeps_working(
    agent: AgentProcess, client: Requester
) -> None:
    send(
        client,
        device_topic(agent),
        {
            "id": "far-1",
            "text": "Door D-1 opened.",
            "labels": ["ok", "alarm"],
            "deadline": "9999-12-31T23:59:59Z",
        },
        f"{agent.prefix}/replies/me",
    )
    assert reply_for(client, "far-1", timeout=30)["status"] == "done"
    still_answers(client, agent)


def test_a_deadline_that_overflows_when_converted_to_utc_is_answered(
    agent: AgentProcess, client: Requester
) -> None:
    send(
        client,
        device_topic(agent),
        {
            "id": "far-2",
            "text": "Door D-1 opened.",
            "labels": ["ok", "alarm"],
            "deadline": "9999-12-31T23:59:59-12:00",
        },
        f"{agent.prefix}/replies/me",
    )
    assert reply_for(client, "far-2", timeout=30)["status"] == "done"
    still_answers(client, agent)


def test_a_hops_property_that_is_a_digit_but_not_a_number_is_harmless(
    agent: AgentProcess, client: Requester
) -> None:
    window = 2 * wait_for_log(agent, "model.loaded", 5)["parallel"]  # Receive Maximum
    for i in range(window + 1):  # more than the broker may have in flight: a stall would show
        send(
            client,
            f"{agent.prefix}/jobs/classify",
            {"id": f"hop-{i}", "text": "Valve V-2 opened.", "labels": ["ok", "alarm"]},
            f"{agent.prefix}/replies/me",
            user_properties=[("edge-hops", "\u00b2")],
        )
    for i in range(window + 1):
        assert reply_for(client, f"hop-{i}", timeout=30)["status"] == "done"
    still_answers(client, agent)


def test_the_largest_job_the_limits_allow_is_refused_at_once_when_it_cannot_fit(
    agent: AgentProcess, client: Requester
) -> None:
    labels = [f"{i:02d}-" + "label-" * 10 + "x" for i in range(32)]
    labels = [label[:64] for label in labels]
    job = {
        "id": "huge-1",
        "text": "The quick brown fox jumps over the lazy dog. " * 44,
        "labels": labels,
        "instructions": "Be careful and precise. " * 62,
        "examples": [
            {"text": f"Example message number {i} about a sensor. " * 40, "answer": labels[i]}
            for i in range(16)
        ],
    }
    started = time.monotonic()
    send(client, device_topic(agent), job, f"{agent.prefix}/replies/me")
    reply = reply_for(client, "huge-1", timeout=60)
    elapsed = time.monotonic() - started
    assert reply["status"] == "rejected", reply
    assert reply["error"]["code"] == "context_too_long", reply
    assert elapsed < 5, elapsed
    still_answers(client, agent)


def test_a_schema_with_a_huge_const_is_refused_at_once(
    agent: AgentProcess, client: Requester
) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"const": int("9" * 4000)}, "s": {"type": "string"}},
    }
    started = time.monotonic()
    send(
        client,
        device_topic(agent, "extract"),
        {"id": "const-1", "text": "n is big", "schema": schema},
        f"{agent.prefix}/replies/me",
    )
    reply = reply_for(client, "const-1", timeout=60)
    assert reply["status"] == "rejected", reply
    assert reply["error"]["code"] in ("invalid_schema", "context_too_long"), reply
    assert time.monotonic() - started < 5
    still_answers(client, agent)


def test_an_integer_enum_written_as_a_float_gives_valid_data(
    agent: AgentProcess, client: Requester
) -> None:
    schema = {"type": "object", "properties": {"level": {"type": "integer", "enum": [1.0, 2]}}}
    send(
        client,
        device_topic(agent, "extract"),
        {"id": "enum-1", "text": "level one", "schema": schema},
        f"{agent.prefix}/replies/me",
    )
    reply = reply_for(client, "enum-1", timeout=60)
    assert reply["status"] == "done", reply
    assert reply["result"]["data"]["level"] in (1, 2)
    assert isinstance(reply["result"]["data"]["level"], int)


@pytest.mark.parametrize(
    ("field", "payload"),
    [
        ("text", b'{"id": "sur-1", "text": "door \\ud800 open", "labels": ["ok", "alarm"]}'),
        ("labels", b'{"id": "sur-2", "text": "door open", "labels": ["ok", "al\\udfffarm"]}'),
        ("v", b'{"id": "typ-1", "v": true, "text": "door open", "labels": ["ok", "alarm"]}'),
        (
            "priority",
            b'{"id": "typ-2", "priority": true, "text": "door open", "labels": ["ok", "alarm"]}',
        ),
        (
            "priority",
            b'{"id": "typ-3", "priority": "7", "text": "door open", "labels": ["ok", "alarm"]}',
        ),
    ],
)
def test_values_of_the_wrong_kind_are_rejected_with_the_field_named(
    agent: AgentProcess, client: Requester, field: str, payload: bytes
) -> None:
    job_id = json.loads(payload)["id"]
    send(client, device_topic(agent), payload, f"{agent.prefix}/replies/me")
    reply = reply_for(client, job_id, timeout=30)
    assert reply["status"] == "rejected", reply
    assert reply["error"]["code"] in ("invalid_field", "invalid_labels"), reply
    assert reply["error"]["message"].startswith(field), reply


@pytest.mark.parametrize(
    "target",
    [
        "{prefix}/devices/other-board/status",
        "{prefix}/devices/{device}/status",
        "{prefix}/jobs/classify",
        "{prefix}-ha/sensor/x/config",
        "{prefix}/devices/other-board/results",
    ],
)
def test_a_reply_cannot_be_routed_onto_the_fleets_own_topics(
    agent: AgentProcess, client: Requester, target: str
) -> None:
    topic = target.format(prefix=agent.prefix, device=agent.device_id)
    job_id = f"route-{uuid.uuid4().hex[:6]}"
    send(
        client,
        device_topic(agent),
        {"id": job_id, "text": "door open", "labels": ["ok", "alarm"]},
        topic,
    )
    reply = reply_for(client, job_id, timeout=30)
    assert reply["_topic"] == f"{agent.prefix}/devices/{agent.device_id}/results"
    assert reply["status"] == "rejected"
    assert reply["error"]["code"] == "invalid_reply_to"


@pytest.mark.parametrize(
    "target", ["{prefix}/replies/bell\x07", "{prefix}/replies/\x85nel", "{prefix}/replies/\ufdd0"]
)
def test_a_reply_topic_the_broker_would_refuse_never_cuts_the_board_off(
    agent: AgentProcess, client: Requester, target: str
) -> None:
    """Found by the fuzz campaign: a `reply_to` with a control character passed the agent's
    check, Mosquitto dropped the agent's connection for the malformed topic, and paho sent
    the reply again after every reconnect: the board never stayed connected again."""
    job_id = f"ctl-{uuid.uuid4().hex[:6]}"
    send(
        client,
        device_topic(agent),
        {
            "id": job_id,
            "text": "door open",
            "labels": ["ok", "alarm"],
            "reply_to": target.format(prefix=agent.prefix),
        },
    )
    reply = reply_for(client, job_id, timeout=30)
    assert reply["_topic"] == f"{agent.prefix}/devices/{agent.device_id}/results"
    assert reply["error"]["code"] == "invalid_reply_to"
    still_answers(client, agent)
    drops = [e for e in agent.log_events() if e.get("event") == "mqtt.disconnected"]
    assert drops == []


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_retained_job_is_never_run_again_on_connect(
    broker: LocalBroker, tmp_path: Any, protocol: str
) -> None:
    """A job published with retain would come back every time an agent subscribes (every
    reconnect). MQTT 5 agents ask the broker not to replay retained jobs at all; an MQTT
    3.1.1 agent gets the replay and refuses it (`retained_job`), never runs it."""
    prefix = f"rt{uuid.uuid4().hex[:6]}"
    device = f"dev-{uuid.uuid4().hex[:6]}"
    c = Requester("127.0.0.1", broker.port, f"s-{uuid.uuid4().hex[:6]}")
    c.connect()
    c.subscribe(f"{prefix}/devices/{device}/results")
    topic = f"{prefix}/devices/{device}/jobs/classify"
    job = {"id": "kept", "text": "door open", "labels": ["ok", "alarm"]}
    c.publish(topic, json.dumps(job).encode(), retain=True)
    agent = start_agent_process(
        broker.url, prefix, tmp_path / "state", device_id=device, protocol=protocol
    )
    try:
        if protocol == "5":
            assert c.wait_for(lambda m: True, 3.0) is None  # not replayed, not answered
        else:
            reply = reply_for(c, "kept", timeout=30)
            assert reply["error"]["code"] == "retained_job"
        assert not any(e.get("event") == "job.completed" for e in agent.log_events())
    finally:
        c.publish(topic, b"", retain=True)  # clear it
        agent.kill()
        c.close()
