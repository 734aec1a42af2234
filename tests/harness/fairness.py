"""Requesters that share one agent, for the fairness tests and bench/chaos.py: a careful
sensor that sends one job at a time and times each answer, and a greedy requester that keeps
many jobs outstanding (of a shape it chooses) for as long as it runs.

    probe = Prober(port, prefix, device)          # one job at a time, latencies
    quiet = probe.run(count=10)                   # its quiet baseline
    with Flood(port, prefix, device, shape, outstanding=14):
        loaded = probe.run(count=10)              # the same, beside the flood
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.core.metrics import percentile

Shape = Callable[[int], tuple[str, dict[str, Any]]]  # n -> (kind, job without its id)


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def p50(self) -> float:
        return percentile(self.seconds, 50) or 0.0

    @property
    def p95(self) -> float:
        return percentile(self.seconds, 95) or 0.0

    def line(self) -> str:
        return (
            f"{len(self.seconds)} answered, p50 {self.p50 * 1000:.0f} ms, "
            f"p95 {self.p95 * 1000:.0f} ms, {dict(self.statuses)}"
        )


class _Client:
    """An MQTT 5 client with its own reply topic; replies by id."""

    def __init__(self, port: int, prefix: str, name: str) -> None:
        self.prefix = prefix
        self.reply_topic = f"{prefix}/replies/{name}-{uuid.uuid4().hex[:6]}"
        self._replies: dict[str, dict[str, Any]] = {}
        self._arrived = threading.Condition()
        self.on_reply: Callable[[dict[str, Any]], None] | None = None
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.on_socket_open = lambda _c, _u, s: s.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        self.client.on_message = self._message
        ready = threading.Event()
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(self.reply_topic, qos=1)
        if not ready.wait(10):
            raise RuntimeError("requester could not subscribe")

    def _message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict) or body.get("status") in ("accepted", "running"):
            return
        with self._arrived:
            self._replies[str(body.get("id"))] = body
            self._arrived.notify_all()
        if self.on_reply is not None:
            self.on_reply(body)

    def send(self, topic: str, job: dict[str, Any]) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        self.client.publish(topic, json.dumps(job).encode(), qos=1, properties=props)

    def wait(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        with self._arrived:
            self._arrived.wait_for(lambda: job_id in self._replies, timeout)
            return self._replies.pop(job_id, None)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def classify_probe(n: int) -> tuple[str, dict[str, Any]]:
    texts = (
        "Pump P-3 vibration 9.1 mm/s, above the alarm threshold.",
        "Freezer F-2 holding at -19.8 C.",
        "Door D-4 opened at 02:13, badge not recognised.",
    )
    return "classify", {"text": texts[n % 3], "labels": ["normal", "warning", "critical"]}


def wait_idle(port: int, prefix: str, device: str, timeout: float = 120.0) -> bool:
    """Until the agent's telemetry says no job is queued or running (a flood's last jobs
    are answered even after the flood is gone)."""
    return wait_telemetry(port, prefix, device, lambda t: t.get("queue_depth") == 0, timeout)


def wait_healthy(port: int, prefix: str, device: str, timeout: float = 120.0) -> bool:
    """Until the agent's telemetry says its health is ok (a reason held from the last test,
    such as a cost bound exceeded, has expired), so a test sees its own reasons appear."""
    return wait_telemetry(
        port, prefix, device, lambda t: (t.get("health") or {}).get("state") == "ok", timeout
    )


def wait_telemetry(
    port: int, prefix: str, device: str, ready: Callable[[dict[str, Any]], bool], timeout: float
) -> bool:
    """Until a telemetry message of the agent satisfies `ready`."""
    idle = threading.Event()

    def on(_c: Any, _u: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
            if isinstance(body, dict) and ready(body):
                idle.set()
        except (ValueError, AttributeError):
            return

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.on_message = on
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(f"{prefix}/devices/{device}/telemetry", qos=0)
    try:
        return idle.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()


class Prober:
    """A careful sensor: one job at a time on the device topic, each answer timed."""

    def __init__(self, port: int, prefix: str, device: str, shape: Shape = classify_probe) -> None:
        self.device = device
        self.shape = shape
        self.client = _Client(port, prefix, "probe")
        self._n = 0
        self.replies: list[dict[str, Any]] = []  # of the last run

    def run(self, count: int, timeout: float = 120.0, priority: int = 5) -> Latencies:
        out = Latencies()
        self.replies = []
        for _ in range(count):
            self._n += 1
            kind, body = self.shape(self._n)
            job_id = f"probe-{self._n}"
            topic = f"{self.client.prefix}/devices/{self.device}/jobs/{kind}"
            start = time.monotonic()
            self.client.send(topic, {"id": job_id, "priority": priority, **body})
            reply = self.client.wait(job_id, timeout)
            if reply is None:
                out.statuses["unanswered"] += 1
                continue
            out.seconds.append(time.monotonic() - start)
            out.statuses[str(reply.get("status"))] += 1
            self.replies.append(reply)
        return out

    def close(self) -> None:
        self.client.close()


class Flood:
    """A greedy requester: keeps `outstanding` jobs of `shape` in flight on the device topic,
    sending the next as soon as one is answered, until closed. Counts answers by status and
    error code."""

    def __init__(
        self,
        port: int,
        prefix: str,
        device: str,
        shape: Shape,
        outstanding: int,
        priority: int = 5,
    ) -> None:
        self.device = device
        self.shape = shape
        self.priority = priority
        self.outstanding = outstanding
        self.codes: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.tag = f"flood-{uuid.uuid4().hex[:6]}"
        self._n = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition()
        self._stopped = False
        self.client = _Client(port, prefix, "flood")
        self.client.on_reply = self._answered

    def wait_for(self, count: int, timeout: float) -> bool:
        """Until `count` answers came (whatever they said)."""
        with self._arrived:
            return self._arrived.wait_for(lambda: sum(self.statuses.values()) >= count, timeout)

    def _answered(self, body: dict[str, Any]) -> None:
        with self._arrived:
            self._arrived.notify_all()
        with self._lock:
            self.statuses[str(body.get("status"))] += 1
            error = body.get("error")
            if isinstance(error, dict):
                self.codes[str(error.get("code"))] += 1
            if self._stopped:
                return
        retry = (body.get("error") or {}).get("retry_after_ms")
        if isinstance(retry, int):  # as a polite client would, but without giving up
            threading.Timer(min(retry, 5000) / 1000.0, self._next).start()
        else:
            self._next()

    def _next(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._n += 1
            n = self._n
        kind, body = self.shape(n)
        topic = f"{self.client.prefix}/devices/{self.device}/jobs/{kind}"
        self.client.send(topic, {"id": f"{self.tag}-{n}", "priority": self.priority, **body})

    def __enter__(self) -> Flood:
        for _ in range(self.outstanding):
            self._next()
        return self

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._stopped = True
        self.client.close()


# ---- the shapes that starved other requesters (issue 21) -------------------------------


def slow_extract(n: int) -> tuple[str, dict[str, Any]]:
    """A text that repeats one short token, and 25 string fields: every field's automaton
    tracks every copy of the token."""
    fields = {f"f{i}": {"type": "string"} for i in range(25)}
    schema = {"type": "object", "properties": fields, "required": list(fields)}
    return "extract", {"text": " ".join(["ab"] * 600) + f" {n}", "schema": schema}


def new_labels(n: int) -> tuple[str, dict[str, Any]]:
    """Every job a shape never seen: a new prefix and a new calibration each."""
    rng = random.Random(n)
    labels = [f"l{rng.randrange(10**9)}" for _ in range(4)]
    return "classify", {"text": "Door D-4 opened at 02:13.", "labels": labels}


def busy_classify(n: int) -> tuple[str, dict[str, Any]]:
    """Ordinary jobs of one known shape, sent at priority 9 by the flood."""
    return classify_probe(n)
