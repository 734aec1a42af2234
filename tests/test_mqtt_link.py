"""The MQTT adapter against a real Mosquitto (the deploy configuration's packet limit): the
agent's packet-size arithmetic is exact, so a message at the limit goes out and one byte
more is refused before it could get the connection dropped."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import LinkConfig, MqttLink, PacketTooLarge

LIMIT = 131072  # LocalBroker's max_packet_size, as deploy/mosquitto/mosquitto.conf's


@pytest.fixture(params=["5", "3.1.1"])
def link(broker: LocalBroker, request: pytest.FixtureRequest) -> Iterator[MqttLink]:
    acked: dict[int, int] = {}
    done = threading.Condition()

    def published(mid: int, reason: int) -> None:
        with done:
            acked[mid] = reason
            done.notify_all()

    config = LinkConfig(
        host="127.0.0.1",
        port=broker.port,
        client_id=f"link-{uuid.uuid4().hex[:8]}",
        protocol=request.param,
        keepalive_s=30,
        session_expiry_s=0,
        receive_maximum=8,
        persistent=False,
        max_packet_bytes=LIMIT if request.param == "3.1.1" else 1 << 20,
    )
    connected = threading.Event()
    running = MqttLink(
        config, lambda: [], lambda *_: None, on_connected=lambda _p: connected.set(),
        on_published=published,
    )  # fmt: skip
    running.start()
    assert connected.wait(10)
    running.acked = acked  # type: ignore[attr-defined]
    running.done = done  # type: ignore[attr-defined]
    yield running
    running.stop()


def test_the_broker_states_its_limit_or_the_setting_holds(link: MqttLink) -> None:
    assert link.max_packet == LIMIT  # CONNACK's on MQTT 5; the setting on 3.1.1


def test_a_message_of_exactly_the_limit_goes_out_and_one_more_byte_is_refused(
    link: MqttLink,
) -> None:
    topic = "t/limit/é"
    props = {"correlation_data": b"x" * 300, "content_type": "application/json", "expiry_s": 60}
    room = link.payload_room(topic, **props)
    assert LIMIT - 400 < room < LIMIT
    mid = link.publish(topic, b"a" * room, **props)
    assert mid is not None
    done: threading.Condition = link.done  # type: ignore[attr-defined]
    with done:
        assert done.wait_for(lambda: mid in link.acked, 10)  # type: ignore[attr-defined]
    assert link.acked[mid] < 0x80  # type: ignore[attr-defined]
    with pytest.raises(PacketTooLarge):
        link.publish(topic, b"a" * (room + 1), **props)
    assert link.connected
