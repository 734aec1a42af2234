"""The paho adapter: one MQTT connection, kept up, with jobs handed to the app.

Only this module imports paho. Threads:
    paho's network thread ("paho-mqtt-client-..."): socket I/O and callbacks. Callbacks
        validate and enqueue, nothing more, and never raise (see `_guard`).
    "mqtt-supervisor": connects, and after a drop waits a randomised, growing delay
        (exponential backoff with full jitter) before reconnecting, so a fleet
        does not reconnect in waves after a broker restart. paho's own reconnect doubles
        its delay without jitter, so it is turned off.

Delivery semantics: jobs arrive with `manual_ack`; the PUBACK is sent only when the app
calls the job's ack handle, after its reply is stored and published. A handle from an
earlier connection is ignored (packet ids restart per connection; the broker redelivers
the job, and the job store answers it again without running it twice).
"""

from __future__ import annotations

import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.core.errors import ConfigError
from edge_agent.core.protocol import topic_name_problem

log = structlog.get_logger("edge_agent.mqtt")

Ack = Callable[[], None]


# MQTT 5 Message Expiry Interval: a four-byte integer; 0 would mean "no expiry".
MAX_EXPIRY_S = 0xFFFFFFFF
STABLE_CONNECTION_S = 10.0
# The largest packet MQTT can frame (a four-byte Remaining Length).
MQTT_MAX_PACKET = 268_435_460


class PacketTooLarge(ValueError):
    """A message larger than the broker takes (its Maximum Packet Size, or
    `mqtt.max_packet_bytes`): publishing it would get the connection dropped."""

    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(f"a {size}-byte packet to {topic[:80]!r}; the broker takes {limit}")
        self.size = size
        self.limit = limit


def _varint_bytes(value: int) -> int:
    """Bytes of an MQTT Variable Byte Integer."""
    n = 1
    while value >= 128:
        value //= 128
        n += 1
    return n


def publish_packet_size(topic: str, payload_bytes: int, qos: int, properties: bytes | None) -> int:
    """The bytes of a PUBLISH packet on the wire, as a broker counts them against its
    Maximum Packet Size: fixed header, topic, packet id (QoS 1 and 2), properties (MQTT 5:
    `properties` is their packed form, length included; None on MQTT 3.1.1), payload."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + payload_bytes
    remaining += len(properties) if properties is not None else 0
    return 1 + _varint_bytes(remaining) + remaining


@dataclass(frozen=True)
class Incoming:
    """One delivery as paho gave it: nothing parsed, nothing checked (the intake does that,
    off paho's thread). Property values are whatever the packet carried."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: Any
    correlation_data: Any
    expiry_s: Any
    dup: bool = False
    user_properties: Any = ()
    received_at: float = 0.0  # time.monotonic() when paho handed it over
    wall_at: float = 0.0  # time.time() then (an absolute `deadline` is read against it)


def tls_context(
    ca_file: str | None,
    cert_file: str | None = None,
    key_file: str | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    """The client side of TLS: the broker's certificate is always verified (against `ca_file`,
    or the system's CAs), its host name too unless `insecure`. A file that is missing,
    unreadable or does not match is a ConfigError naming it, so the agent refuses to start
    instead of retrying a connection that can never work."""
    for what, name in (("mqtt.ca_file", ca_file), ("mqtt.cert_file", cert_file),
                       ("mqtt.key_file", key_file)):  # fmt: skip
        if name is None:
            continue
        try:
            with open(name, "rb") as f:
                text = f.read(1 << 20)  # all of it: CA bundles may open with comments
        except OSError as exc:
            raise ConfigError(f"{what} {name}: {exc.strerror or exc}") from exc
        if b"-----BEGIN" not in text:
            raise ConfigError(f"{what} {name}: not a PEM file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.ca_file {ca_file}: not a usable CA certificate ({exc})") from exc
    if cert_file and key_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"mqtt.cert_file {cert_file} / mqtt.key_file {key_file}: cannot be used "
                f"together ({exc}); is the key the certificate's, and unencrypted?"
            ) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = not insecure
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(frozen=True)
class Subscription:
    topic: str
    qos: int = 1
    retained: bool = False  # also take the retained message at subscribe time (MQTT 5)


@dataclass(frozen=True)
class LinkConfig:
    host: str
    port: int
    client_id: str
    protocol: str  # "5" | "3.1.1"
    keepalive_s: int
    session_expiry_s: int
    receive_maximum: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    will_topic: str | None = None
    will_payload: bytes = b"offline"
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    persistent: bool = True
    # The largest packet the agent publishes; MQTT 5 brokers may state a smaller one in
    # CONNACK, and then that one holds (MQTT 3.1.1 has no way to learn it).
    max_packet_bytes: int = 131072


class MqttLink:
    """A supervised MQTT connection."""

    def __init__(
        self,
        config: LinkConfig,
        subscriptions: Callable[[], Sequence[Subscription]],
        on_message: Callable[[Incoming, Ack], None],
        on_connected: Callable[[bool], None] = lambda _session_present: None,
        on_disconnected: Callable[[], None] = lambda: None,
        on_published: Callable[[int, int], None] = lambda _mid, _reason: None,
        on_acked: Callable[[float], None] = lambda _seconds: None,
    ) -> None:
        self.config = config
        self._on_acked = on_acked
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._on_published = on_published
        self._generation = 0
        self._connected = threading.Event()
        self._dropped = threading.Event()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.connects = 0
        self._was_up = False  # the last connection got as far as a CONNACK
        self._up_since = 0.0
        self._max_packet = config.max_packet_bytes
        # SUBSCRIBEs awaiting their SUBACK: packet id -> the topics, in order
        self._subscribing: dict[int, list[str]] = {}
        self._subscribing_lock = threading.Lock()
        self._client = self._make_client()

    @property
    def v5(self) -> bool:
        return self.config.protocol == "5"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def max_packet(self) -> int:
        """The largest packet this connection may publish: `max_packet_bytes`, or the
        broker's Maximum Packet Size from CONNACK when that is smaller."""
        return self._max_packet

    def _make_client(self) -> paho.Client:
        c = self.config
        protocol = MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311
        kwargs: dict[str, Any] = {}
        if not self.v5:
            kwargs["clean_session"] = not c.persistent
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=c.client_id,
            protocol=protocol,
            manual_ack=True,
            reconnect_on_failure=False,
            **kwargs,
        )
        client.suppress_exceptions = True  # belt and braces: our callbacks catch everything
        client.max_inflight_messages_set(64)
        client.max_queued_messages_set(0)
        if c.username is not None:
            client.username_pw_set(c.username, c.password)
        if c.tls:
            self._configure_tls(client)
        if c.will_topic:
            client.will_set(c.will_topic, c.will_payload, qos=1, retain=True)
        client.on_socket_open = self._guard(self._socket_open)
        client.on_connect = self._guard(self._connect)
        client.on_disconnect = self._guard(self._disconnect)
        client.on_message = self._guard(self._message)
        client.on_publish = self._guard(self._publish)
        client.on_subscribe = self._guard(self._subscribed)
        return client

    def _configure_tls(self, client: paho.Client) -> None:
        c = self.config
        client.tls_set_context(tls_context(c.ca_file, c.cert_file, c.key_file, c.tls_insecure))

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._supervisor = threading.Thread(
            target=self._supervise, name="mqtt-supervisor", daemon=True
        )
        self._supervisor.start()

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish `final` (topic, payload; retained) if connected, then disconnect cleanly."""
        self._stopping.set()
        if final is not None and self.connected:
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("mqtt.final_publish_failed", topic=final[0])
        if self.connected:
            self._client.disconnect()  # a normal DISCONNECT: the broker drops the Last Will
        self._dropped.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        self._client.loop_stop()

    def _supervise(self) -> None:
        c = self.config
        failures = 0
        first = True
        while not self._stopping.is_set():
            try:
                self._dropped.clear()
                self._open(first)
                first = False
                self._client.loop_start()
            except (OSError, ssl.SSLError, ValueError) as exc:
                failures += 1
                delay = reconnect_delay(failures, c.reconnect_min_s, c.reconnect_max_s)
                log.warning(
                    "mqtt.connect_failed",
                    error=str(exc),
                    attempt=failures,
                    retry_in_s=round(delay, 2),
                    host=self.config.host,
                    port=self.config.port,
                )
                self._stopping.wait(delay)
                continue
            self._dropped.wait()
            self._client.loop_stop()
            if self._stopping.is_set():
                return
            # A connection that was dropped soon after it came up (the broker refusing
            # something the agent sent, a flapping link) counts as a failure, so the
            # backoff grows instead of reconnecting in a tight loop.
            lasted = time.monotonic() - self._up_since
            failures = 0 if self._was_up and lasted >= STABLE_CONNECTION_S else failures + 1
            delay = reconnect_delay(max(1, failures), c.reconnect_min_s, c.reconnect_max_s)
            log.warning("mqtt.reconnect_scheduled", retry_in_s=round(delay, 2), attempt=failures)
            self._stopping.wait(delay)

    def _open(self, first: bool) -> None:
        c = self.config
        self._was_up = False
        if first:
            props = None
            if self.v5:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = c.session_expiry_s if c.persistent else 0
                props.ReceiveMaximum = c.receive_maximum
            self._client.connect_timeout = c.connect_timeout_s
            kwargs: dict[str, Any] = {"properties": props}
            if self.v5:
                kwargs["clean_start"] = not c.persistent
            self._client.connect(c.host, c.port, keepalive=c.keepalive_s, **kwargs)
        else:
            self._client.reconnect()

    # ---- paho callbacks (network thread) ---------------------------------------------

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        name = fn.__name__.lstrip("_")

        def guarded(*args: Any) -> None:
            try:
                fn(*args)
            except Exception:  # an exception here would kill paho's network thread
                log.exception("mqtt.callback_failed", callback=name)

        return guarded

    def _socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        # Nagle's algorithm delays small replies by tens of milliseconds (REFERENCE.md §7).
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            log.warning("mqtt.nodelay_unavailable")

    def _connect(
        self, client: Any, _userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("mqtt.connect_refused", reason=str(reason), host=self.config.host)
            return
        self._generation += 1
        self.connects += 1
        self._was_up = True
        self._up_since = time.monotonic()
        stated = getattr(props, "MaximumPacketSize", None)
        limit = self.config.max_packet_bytes
        if isinstance(stated, int) and stated > 0:
            limit = min(limit, stated)
        self._max_packet = limit
        # What was in flight when the last connection dropped is not resent by paho: the
        # outbox sends again what still needs to go (from the journal), and gives up on a
        # message that keeps ending connections (a broker that drops the client for it
        # would otherwise see it again after every reconnect).
        dropped = client.drop_out_messages()
        with self._subscribing_lock:  # a SUBACK the last connection did not get never comes
            self._subscribing.clear()
        subs = list(self._subscriptions())
        if subs:
            self._send_subscribe(client, subs)
        self._connected.set()
        log.info(
            "mqtt.connected",
            host=self.config.host,
            port=self.config.port,
            session_present=bool(flags.session_present),
            subscriptions=len(subs),
            generation=self._generation,
            max_packet_bytes=limit,
            broker_max_packet_bytes=stated,
            unsent_dropped=len(dropped),
        )
        self._on_connected(bool(flags.session_present))

    def _disconnect(
        self, _client: Any, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._dropped.set()
        if was and self._stopping.is_set():
            log.info("mqtt.disconnected", reason=str(reason), clean=True)  # we hung up
        elif was:
            log.warning("mqtt.disconnected", reason=str(reason))
            self._on_disconnected()

    def _message(self, _client: Any, _userdata: Any, msg: paho.MQTTMessage) -> None:
        """Hand the raw delivery and its ack handle over; no parsing, nothing that can
        raise before the ack handle exists (a message left unacknowledged would use up
        Receive Maximum)."""
        received = time.monotonic()
        generation, mid, qos = self._generation, msg.mid, msg.qos

        def ack() -> None:
            self._ack(generation, mid, qos, received)

        props = getattr(msg, "properties", None)
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # paho decodes the topic lazily; a broker may send junk
            topic = msg._topic.decode("utf-8", "replace")
        incoming = Incoming(
            topic=topic,
            payload=bytes(msg.payload),
            qos=qos,
            retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
            expiry_s=getattr(props, "MessageExpiryInterval", None),
            dup=bool(msg.dup),
            user_properties=getattr(props, "UserProperty", ()),
            received_at=received,
            wall_at=time.time(),
        )
        self._on_message(incoming, ack)

    def _publish(self, _client: Any, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        self._on_published(mid, int(getattr(reason, "value", 0)))

    def _ack(self, generation: int, mid: int, qos: int, received: float) -> None:
        if qos == 0:
            return
        if generation != self._generation or not self.connected:
            log.debug("mqtt.stale_ack_skipped", mid=mid)
            return
        self._client.ack(mid, qos)
        self._on_acked(time.monotonic() - received)

    # ---- publishing (any thread) ------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
        expiry_s: int | None = None,
        user_properties: list[tuple[str, str]] | None = None,
    ) -> int | None:
        """Hand a message to paho; returns its mid, or None when not connected.

        MQTT 5 properties are dropped on a 3.1.1 connection (the payload carries their
        meaning there).
        """
        problem = topic_name_problem(topic)
        if problem is not None:
            # Never hand paho a topic the broker would drop the connection for: paho would
            # resend it after every reconnect, and the board would never stay connected.
            raise ValueError(f"cannot publish to {topic!r}: {problem}")
        if not self.connected:
            return None
        props = None
        if self.v5:
            props = _properties(
                correlation_data, content_type, response_topic, expiry_s, user_properties
            )
        size = publish_packet_size(topic, len(payload), qos, _packed(props, self.v5))
        if size > self._max_packet:
            # Never: the broker would drop the connection (Mosquitto: "oversize packet").
            raise PacketTooLarge(topic, size, self._max_packet)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        return int(info.mid)

    def payload_room(
        self,
        topic: str,
        *,
        qos: int = 1,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
        expiry_s: int | None = None,
        user_properties: list[tuple[str, str]] | None = None,
    ) -> int:
        """The most payload bytes a message with these headers may carry on this
        connection (`max_packet` less the headers)."""
        props = None
        if self.v5:
            props = _properties(
                correlation_data, content_type, response_topic, expiry_s, user_properties
            )
        packed = _packed(props, self.v5)
        room = self._max_packet - publish_packet_size(topic, 0, qos, packed)
        # the Remaining Length field grows with the payload (1 to 4 bytes)
        while room > 0 and publish_packet_size(topic, room, qos, packed) > self._max_packet:
            room -= 1
        return room

    def subscribe(self, subs: Sequence[Subscription]) -> bool:
        """Subscribe now (the subscriptions callable must list them too, for the next
        connect); False when not connected."""
        if not self.connected or not subs:
            return False
        return self._send_subscribe(self._client, subs)

    def unsubscribe(self, topics: Sequence[str]) -> bool:
        """Unsubscribe now (the subscriptions callable must leave them out too); False when
        not connected (the next connect does not subscribe them)."""
        if not self.connected or not topics:
            return False
        result, _mid = self._client.unsubscribe(list(topics))
        return bool(result == MQTTErrorCode.MQTT_ERR_SUCCESS)

    def _send_subscribe(self, client: paho.Client, subs: Sequence[Subscription]) -> bool:
        # the lock is held until the packet id is noted: its SUBACK waits for it
        with self._subscribing_lock:
            if self.v5:
                # Retain handling 2: the broker sends no retained message at subscribe
                # time. A job or cancel published with retain would otherwise come back on
                # every reconnect.
                result, mid = client.subscribe(
                    [
                        (
                            s.topic,
                            SubscribeOptions(qos=s.qos, retainHandling=0 if s.retained else 2),
                        )
                        for s in subs
                    ]
                )
            else:
                result, mid = client.subscribe([(s.topic, s.qos) for s in subs])
            ok = result == MQTTErrorCode.MQTT_ERR_SUCCESS
            if ok and mid is not None:
                self._subscribing[mid] = [s.topic for s in subs]
        return bool(ok)

    def _subscribed(
        self, _client: Any, _userdata: Any, mid: int, reasons: list[ReasonCode], _props: Any
    ) -> None:
        """The SUBACK: from here the broker delivers. A subscription it refuses (an ACL
        that does not grant the topic, a shared subscription it does not support) would
        otherwise leave a connected agent that never gets a job: said as an error."""
        with self._subscribing_lock:
            topics = self._subscribing.pop(mid, [])
        refused = {
            topic: str(reason)
            for topic, reason in zip(topics, reasons, strict=False)
            if reason.is_failure
        }
        if refused:
            log.error("mqtt.subscription_refused", refused=refused)
        log.info(
            "mqtt.subscribed",
            topics=len(topics),
            refused=len(refused),
            generation=self._generation,
        )


def _packed(props: Properties | None, v5: bool) -> bytes | None:
    """A PUBLISH's properties as they go on the wire (MQTT 5: a zero length when none)."""
    if not v5:
        return None
    return bytes(props.pack()) if props is not None else b"\x00"  # type: ignore[no-untyped-call]


def _properties(
    correlation_data: bytes | None,
    content_type: str | None,
    response_topic: str | None,
    expiry_s: int | None,
    user_properties: list[tuple[str, str]] | None,
) -> Properties | None:
    if not any((correlation_data, content_type, response_topic, expiry_s, user_properties)):
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if content_type is not None:
        props.ContentType = content_type
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if expiry_s is not None:
        # 0 means "never expires" and more than four bytes raises in paho: clamp, so no
        # deadline can make a publish fail.
        props.MessageExpiryInterval = min(max(1, int(expiry_s)), MAX_EXPIRY_S)
    if user_properties:
        props.UserProperty = user_properties
    return props


def _nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def reconnect_delay(
    attempt: int, min_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before the `attempt`-th reconnect (from 1): exponential backoff
    with full jitter, uniform in [0, min(max_s, min_s x 2^(attempt-1))), so boards that
    lost the same broker do not come back in waves."""
    ceiling = min(max_s, min_s * 2.0 ** min(max(attempt, 1) - 1, 64))
    return ceiling * rand()


class Requester:
    """A short-lived client that publishes jobs and waits for their replies.

    For `edge-agent submit`, the demo and tests; a sensor would do the same with any MQTT
    library (docs/protocol.md shows mosquitto_pub and paho).
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        protocol: str = "5",
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        on_message: Callable[[Incoming], None] | None = None,
    ) -> None:
        self._callback = on_message
        version = MQTTProtocolVersion.MQTTv5 if protocol == "5" else MQTTProtocolVersion.MQTTv311
        self.v5 = protocol == "5"
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls_context is not None:
            self._client.tls_set_context(tls_context)
        self._client.on_socket_open = _nodelay
        self._client.on_message = self._message
        self._client.on_connect = self._connected_cb
        self._lock = threading.Condition()
        self._messages: list[Incoming] = []
        self._connected = threading.Event()
        self._refused: str | None = None
        self.host, self.port = host, port

    def _connected_cb(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        self._connected.set()

    def _message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        incoming = Incoming(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None) if props else None,
            correlation_data=getattr(props, "CorrelationData", None) if props else None,
            expiry_s=getattr(props, "MessageExpiryInterval", None) if props else None,
        )
        if self._callback is not None:
            self._callback(incoming)
            return
        with self._lock:
            self._messages.append(incoming)
            self._lock.notify_all()

    def connect(self, timeout: float = 10.0) -> None:
        """Connect or raise ConnectionError with the reason."""
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise ConnectionError(f"cannot reach broker {self.host}:{self.port}: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise ConnectionError(f"broker {self.host}:{self.port} did not answer CONNECT")
        if self._refused is not None:
            self.close()
            raise ConnectionError(f"broker refused the connection: {self._refused}")

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> None:
        done = threading.Event()
        self._client.on_subscribe = lambda *_args: done.set()
        self._client.subscribe(topic, qos)
        done.wait(timeout)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        expiry_s: int | None = None,
        retain: bool = False,
        user_properties: list[tuple[str, str]] | None = None,
    ) -> None:
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ContentType = "application/json"
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
            if user_properties:
                props.UserProperty = user_properties
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos > 0:
            info.wait_for_publish(10)

    def wait_for(self, predicate: Callable[[Incoming], bool], timeout: float) -> Incoming | None:
        """The first message received (or already received) that matches `predicate`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for i, message in enumerate(self._messages):
                    if predicate(message):
                        return self._messages.pop(i)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)

    def drain(self) -> list[Incoming]:
        with self._lock:
            out, self._messages = self._messages, []
            return out

    def close(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
