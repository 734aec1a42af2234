"""The fleet broker of deploy/mosquitto/, installed the way an operator would, for tests.

`FleetBroker` runs the deploy scripts (make-test-ca.sh, install-config.sh, add-client.sh)
into a temporary directory, on two free loopback ports, and starts the real Mosquitto on
the result. `Probe` is one real paho client that records what the broker answers (CONNACK,
SUBACK and PUBACK reason codes, messages, disconnects) so tests can assert on them.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.adapters.broker import find_mosquitto, free_port, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy" / "mosquitto"

# MQTT 5 reason codes the broker answers with.
SUCCESS = 0x00
GRANTED_QOS_1 = 0x01
NO_MATCHING_SUBSCRIBERS = 0x10
NOT_AUTHORIZED = 0x87
BAD_USERNAME_OR_PASSWORD = 0x86


def run_script(name: str, *args: str, stdin: str | None = None) -> str:
    """Run one deploy/mosquitto script; its stdout, or AssertionError with its stderr."""
    result = subprocess.run(
        ["bash", str(DEPLOY / name), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{name} {' '.join(args)}: {result.stderr}"
    return result.stdout


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None


@dataclass(frozen=True)
class Outcome:
    """How a connection attempt ended."""

    connected: bool
    reason: int | None  # the CONNACK reason code, when a CONNACK came
    error: str | None  # what went wrong before a CONNACK (TLS, socket)


class Probe:
    """One paho client (MQTT 5 unless told) that records everything the broker answers."""

    def __init__(
        self,
        port: int,
        tls: ssl.SSLContext | None,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        v5: bool = True,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.port = port
        self.v5 = v5
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,  # a kicked probe must stay down, not fight back
        )
        if tls is not None:
            self._client.tls_set_context(tls)
        if username is not None:
            self._client.username_pw_set(username, password)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=False)
        self._cond = threading.Condition()
        self._connack: int | None = None
        self._closed = False
        self.disconnects: list[int] = []
        self.messages: list[Message] = []
        self._subacks: dict[int, list[int]] = {}
        self._pubacks: dict[int, int] = {}
        self._client.on_socket_open = _nodelay
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish

    # ---- paho callbacks (its network thread) --------------------------------------------

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._cond:
            self._connack = _code(reason)
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._cond:
            self._closed = True
            self.disconnects.append(_code(reason))
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        with self._cond:
            self.messages.append(
                Message(msg.topic, bytes(msg.payload), bool(msg.retain), _opt_bytes(corr))
            )
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        with self._cond:
            self._subacks[mid] = [_code(r) for r in reasons]
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._cond:
            self._pubacks[mid] = _code(reason)
            self._cond.notify_all()

    # ---- what tests call -----------------------------------------------------------------

    def connect(self, timeout: float = 5.0) -> Outcome:
        """Connect and wait for the CONNACK (or for the broker to drop the connection)."""
        try:
            self._client.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            return Outcome(connected=False, reason=None, error=repr(exc))
        self._client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connack is not None or self._closed, timeout)
            reason, closed = self._connack, self._closed
        if reason is None:
            error = "closed before CONNACK" if closed else "no CONNACK"
            return Outcome(connected=False, reason=None, error=error)
        return Outcome(connected=reason == SUCCESS and not closed, reason=reason, error=None)

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connack == SUCCESS and not self._closed

    def subscribe(self, *topics: str, timeout: float = 5.0) -> list[int]:
        """Subscribe with QoS 1; the SUBACK's reason codes, one per topic."""
        _rc, mid = self._client.subscribe([(t, 1) for t in topics])
        with self._cond:
            self._cond.wait_for(lambda: mid in self._subacks, timeout)
            assert mid in self._subacks, f"no SUBACK for {topics}"
            return self._subacks.pop(mid)

    def publish(
        self,
        topic: str,
        payload: bytes = b"{}",
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        timeout: float = 5.0,
    ) -> int | None:
        """Publish with QoS 1 and wait for the PUBACK: its reason code (MQTT 3.1.1 has none:
        0), or None when none came (the connection was dropped)."""
        props = None
        if self.v5 and (response_topic or correlation_data):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
        with self._cond:
            self._cond.wait_for(lambda: info.mid in self._pubacks or self._closed, timeout)
            return self._pubacks.pop(info.mid, None)

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float) -> Message | None:
        """The first message received so far or within `timeout` that matches."""
        with self._cond:
            found: list[Message] = []

            def ready() -> bool:
                found[:] = [m for m in self.messages if predicate(m)]
                return bool(found)

            self._cond.wait_for(ready, timeout)
            return found[0] if found else None

    def wait_disconnected(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._closed, timeout)

    def topics(self) -> set[str]:
        with self._cond:
            return {m.topic for m in self.messages}

    def drop(self) -> None:
        """Close the socket without a DISCONNECT, as a board losing power would."""
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        self.wait_disconnected(5)
        self._client.loop_stop()

    def close(self) -> None:
        if self.connected:
            self._client.disconnect()
        self._client.loop_stop()


def _opt_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _code(reason: Any) -> int:
    return int(getattr(reason, "value", reason))


def _nodelay(_c: Any, _u: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FleetBroker:
    """deploy/mosquitto/ installed under `workdir` and running on two free loopback ports."""

    def __init__(
        self, workdir: Path, clients: Mapping[str, str], passwords: Mapping[str, str]
    ) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (scripts/bootstrap.sh test)")
        self.binary = binary
        self.workdir = workdir
        self.conf_dir = workdir / "etc"
        self.certs = self.conf_dir / "certs"
        self.acl = self.conf_dir / "acl"
        self.passwd = self.conf_dir / "passwd"
        self.log_path = workdir / "mosquitto.log"
        self.cert_port = free_port()
        self.password_port = free_port()
        while self.password_port == self.cert_port:
            self.password_port = free_port()
        self.clients = dict(clients)
        self.passwords = dict(passwords)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> Path:
        return self.certs / "ca.crt"

    def cert(self, name: str) -> tuple[Path, Path]:
        return self.certs / "clients" / f"{name}.crt", self.certs / "clients" / f"{name}.key"

    def install(self) -> FleetBroker:
        """What an operator does: CA and certificates, the config, one entry per client."""
        run_script("make-test-ca.sh", "--out", str(self.certs), *self.clients)
        # As root, Mosquitto drops to `user` before reading keys and the acl: root keeps
        # access to the private temporary directory (as edge_agent.adapters.broker.LocalBroker does).
        user = "root" if os.geteuid() == 0 else getpass.getuser()
        run_script(
            "install-config.sh",
            "--conf-dir", str(self.conf_dir),
            "--data-dir", str(self.workdir / "data"),
            "--log-file", str(self.log_path),
            "--cert-port", str(self.cert_port),
            "--password-port", str(self.password_port),
            "--bind", "127.0.0.1",
            "--user", user,
        )  # fmt: skip
        for name, role in self.clients.items():
            self.add_client(role, name, self.passwords.get(name))
        return self

    def add_client(self, role: str, name: str, password: str | None = None) -> None:
        args = ["--acl", str(self.acl)]
        if password is not None:
            args += ["--password-file", str(self.passwd), "--password-stdin"]
        run_script("add-client.sh", *args, role, name, stdin=f"{password}\n" if password else None)

    def remove_client(self, name: str) -> None:
        run_script(
            "add-client.sh", "--acl", str(self.acl), "--password-file", str(self.passwd),
            "--remove", name,
        )  # fmt: skip

    def start(self, timeout: float = 10.0) -> FleetBroker:
        self.process = subprocess.Popen(
            [str(self.binary), "-c", str(self.conf_dir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for port in (self.cert_port, self.password_port):
            if not wait_for_port(port, timeout):
                self.stop()
                raise RuntimeError(f"mosquitto did not start on {port}:\n{self.log_text()}")
        return self

    def reload(self, timeout: float = 5.0) -> None:
        """SIGHUP, as `systemctl reload mosquitto` does: re-read the acl and password file."""
        assert self.process is not None
        before = self.log_text().count("Reloading config.")
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_text().count("Reloading config.") == before:
            assert time.monotonic() < deadline, "mosquitto did not reload"
            time.sleep(0.05)
        time.sleep(0.2)  # the line is logged before the files are read

    def stop(self) -> None:
        stop_process(self.process)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, count: int, timeout: float = 5.0) -> bool:
        """Whether `text` appears at least `count` times in the broker's log in time."""
        deadline = time.monotonic() + timeout
        while self.log_text().count(text) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # ---- clients -------------------------------------------------------------------------

    def tls(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        return context

    def probe(
        self,
        name: str,
        *,
        mode: str = "cert",
        password: str | None = None,
        client_id: str | None = None,
        v5: bool = True,
        will: tuple[str, bytes] | None = None,
    ) -> Probe:
        """A client for `name`: its certificate on the certificate listener (mode "cert"),
        or its name and password on the password listener (mode "password")."""
        if mode == "cert":
            return Probe(
                self.cert_port,
                self.tls(self.cert(name)),
                client_id=client_id or f"probe-{name}",
                v5=v5,
                will=will,
            )
        return Probe(
            self.password_port,
            self.tls(),
            client_id=client_id or f"probe-{name}",
            username=name,
            password=password if password is not None else self.passwords[name],
            v5=v5,
            will=will,
        )

    def connect(self, name: str, **kwargs: Any) -> Probe:
        """A connected probe for `name` (see `probe`)."""
        client = self.probe(name, **kwargs)
        outcome = client.connect()
        assert outcome.connected, f"{name} could not connect: {outcome}\n{self.log_text()[-2000:]}"
        return client


def close_all(probes: Iterable[Probe]) -> None:
    for p in probes:
        p.close()
