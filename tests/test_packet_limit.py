"""Every reply fits the broker: the reproductions of issue 21's oversize messages, against a
real Mosquitto with the deploy configuration's `max_packet_size 131072` and the agent (real
model) as a subprocess.

A job whose reply would be larger than the broker takes used to cut the board off for good:
the broker dropped the agent for the oversize packet, paho sent it again after every
reconnect, and the job, never acknowledged, came back after a restart.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import Requester
from tests.harness.clients import reply_for
from tests.harness.process import AgentProcess, start_agent_process

pytestmark = pytest.mark.model

DEPLOY_LIMIT = 131072  # deploy/mosquitto/mosquitto.conf: max_packet_size


@pytest.fixture(scope="module")
def lprefix() -> str:
    return f"pl{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def fleet(
    broker: LocalBroker, lprefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[AgentProcess]]:
    """Two agents sharing the fleet topics, as a small fleet would."""
    agents = [
        start_agent_process(broker.url, lprefix, tmp_path_factory.mktemp(f"agent{i}"))
        for i in range(2)
    ]
    yield agents
    for agent in agents:
        agent.kill()


@pytest.fixture
def client(broker: LocalBroker, lprefix: str) -> Iterator[Requester]:
    c = Requester("127.0.0.1", broker.port, f"sensor-{uuid.uuid4().hex[:6]}")
    c.connect()
    c.subscribe(f"{lprefix}/replies/#")
    yield c
    c.close()


def non_ascii_fields(total_bytes: int) -> dict[str, Any]:
    """Unknown fields whose names are Cyrillic: 2 bytes each in UTF-8, 6 as a JSON escape."""
    fields: dict[str, Any] = {}
    size = 0
    n = 0
    while size < total_bytes:
        name = f"{n:05d}" + "ж" * 200
        fields[name] = 1
        size += len(json.dumps(name, ensure_ascii=False).encode()) + 4
        n += 1
    return fields


def connects(agent: AgentProcess) -> int:
    return sum(1 for e in agent.log_events() if e.get("event") == "mqtt.connected")


def classify(job_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "text": "Door D-4 closed.", "labels": ["ok", "alarm"], **extra}


def still_answers(client: Requester, agent: AgentProcess, connects_before: int) -> None:
    """An ordinary job is answered, and the broker never dropped the agent."""
    job_id = f"ok-{uuid.uuid4().hex[:6]}"
    client.publish(
        f"{agent.prefix}/devices/{agent.device_id}/jobs/classify",
        json.dumps(classify(job_id)).encode(),
        response_topic=f"{agent.prefix}/replies/me",
    )
    assert reply_for(client, job_id, timeout=30)["status"] == "done"
    assert connects(agent) == connects_before, "the broker dropped the agent"


def test_deploy_broker_states_its_packet_limit(fleet: list[AgentProcess]) -> None:
    """The agent reads Maximum Packet Size from CONNACK and logs the limit it keeps to."""
    connected = [e for e in fleet[0].log_events() if e.get("event") == "mqtt.connected"]
    assert connected[0]["max_packet_bytes"] == DEPLOY_LIMIT


def test_a_job_whose_echoed_fields_would_make_an_oversize_reply_is_answered(
    fleet: list[AgentProcess], client: Requester
) -> None:
    agent = fleet[0]
    before = connects(agent)
    job = classify("wide-1", **non_ascii_fields(57_000))
    payload = json.dumps(job, ensure_ascii=False).encode()
    assert 50_000 < len(payload) < 65536
    client.publish(
        f"{agent.prefix}/devices/{agent.device_id}/jobs/classify",
        payload,
        response_topic=f"{agent.prefix}/replies/me",
    )
    reply = reply_for(client, "wide-1", timeout=60)
    assert reply["status"] == "done", reply
    # echoed input is bounded: a handful of names, each cut short
    assert 0 < len(reply["ignored"]) <= 16
    assert all(len(name) <= 64 for name in reply["ignored"])
    still_answers(client, agent, before)


def test_a_rejection_quoting_a_huge_key_fits_the_broker(
    fleet: list[AgentProcess], client: Requester
) -> None:
    agent = fleet[0]
    before = connects(agent)
    job = classify("desc-1", label_descriptions={"ж" * 30_000: "x"})
    client.publish(
        f"{agent.prefix}/devices/{agent.device_id}/jobs/classify",
        json.dumps(job, ensure_ascii=False).encode(),
        response_topic=f"{agent.prefix}/replies/me",
    )
    reply = reply_for(client, "desc-1", timeout=30)
    assert reply["status"] == "rejected"
    assert reply["error"]["code"] == "invalid_labels"
    assert len(reply["error"]["message"]) <= 400
    still_answers(client, agent, before)


def test_the_fleet_keeps_answering_after_oversize_jobs_on_the_fleet_topic(
    fleet: list[AgentProcess], client: Requester
) -> None:
    before = [connects(a) for a in fleet]
    prefix = fleet[0].prefix
    for i in range(2):
        job = classify(f"fleet-wide-{i}", **non_ascii_fields(57_000))
        client.publish(
            f"{prefix}/jobs/classify",
            json.dumps(job, ensure_ascii=False).encode(),
            response_topic=f"{prefix}/replies/me",
        )
    for i in range(2):
        assert reply_for(client, f"fleet-wide-{i}", timeout=60)["status"] == "done"
    for i in range(4):
        client.publish(
            f"{prefix}/jobs/classify",
            json.dumps(classify(f"fleet-ok-{i}")).encode(),
            response_topic=f"{prefix}/replies/me",
        )
    for i in range(4):
        assert reply_for(client, f"fleet-ok-{i}", timeout=30)["status"] == "done"
    assert [connects(a) for a in fleet] == before, "the broker dropped an agent"
