"""The MQTT adapter against a real Mosquitto (the deploy configuration's packet limit): the
agent's packet-size arithmetic is exact, so a message at the limit goes out and one byte
more is refused before it could get the connection dropped; and the SUBACK is heard."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import LinkConfig, MqttLink, PacketTooLarge, Subscription

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


def test_the_suback_is_logged_and_a_refused_subscription_is_an_error(link: MqttLink) -> None:
    """The broker delivers from the SUBACK on: `mqtt.subscribed` says when. A subscription it
    refuses would leave a connected agent that never gets a job: `mqtt.subscription_refused`
    names each refused topic with the broker's reason."""
    with structlog.testing.capture_logs() as logs:
        assert link.subscribe([Subscription("t/a"), Subscription("t/b/+", qos=0)])
        deadline = time.monotonic() + 10
        while not any(e["event"] == "mqtt.subscribed" for e in logs):
            assert time.monotonic() < deadline, logs
            time.sleep(0.02)
    done = next(e for e in logs if e["event"] == "mqtt.subscribed")
    assert (done["topics"], done["refused"]) == (2, 0), done
    assert not any(e["event"] == "mqtt.subscription_refused" for e in logs)
    # Mosquitto 2.0's acl file grants every SUBSCRIBE (tests/test_broker_security.py); EMQX,
    # HiveMQ and Mosquitto's dynamic-security plugin refuse at subscribe time. What paho
    # hands the agent then: a failure reason code per refused topic, in order.
    with link._subscribing_lock:
        link._subscribing[60000] = ["edge/devices/pi-1/jobs/+", "$share/edge/edge/jobs/+"]
    granted, refused = (
        ReasonCode(PacketTypes.SUBACK, identifier=1),
        ReasonCode(PacketTypes.SUBACK, identifier=0x87),
    )
    with structlog.testing.capture_logs() as logs:
        link._subscribed(None, None, 60000, [granted, refused], None)
    error = next(e for e in logs if e["event"] == "mqtt.subscription_refused")
    assert error["log_level"] == "error"
    assert error["refused"] == {"$share/edge/edge/jobs/+": "Not authorized"}
    done = next(e for e in logs if e["event"] == "mqtt.subscribed")
    assert (done["topics"], done["refused"]) == (2, 1)
    assert 60000 not in link._subscribing
