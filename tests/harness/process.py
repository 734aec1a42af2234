"""What the fault tests and the benchmarks share: agents as subprocesses, a requester that
behaves like a careful sensor, and a TCP proxy that can black-hole a connection.

Used by tests/ (short runs, marker `chaos`) and by bench/*.py (long runs, tables).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass
class AgentProcess:
    """An agent started as a subprocess (as systemd would), with its log."""

    proc: subprocess.Popen[bytes]
    device_id: str
    prefix: str
    state_dir: Path
    log_path: Path
    args: list[str]
    env: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
    cwd: Path | None = None  # where `python -m edge_agent` finds the package (another tree)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, wait_online: bool = True, timeout: float = 60) -> AgentProcess:
        """Start the same agent again (same device id, state and log file)."""
        self.kill()
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                self.args, stdout=log_file, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
            )
        if wait_online:
            events = [e.get("event") for e in self.log_events()]
            starts, subscribed = events.count("agent.started"), events.count("mqtt.subscribed")
            try:
                wait_for_log(self, "agent.started", timeout, count=max(1, starts + 1))
                # the broker delivers from the SUBACK on: a job published before is lost
                wait_for_log(self, "mqtt.subscribed", timeout, count=subscribed + 1)
            except BaseException:
                self.kill()
                raise
        return self

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


def start_agent_process(
    broker_url: str,
    prefix: str,
    state_dir: Path,
    *,
    device_id: str | None = None,
    protocol: str = "5",
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    wait_online: bool = True,
    timeout: float = 60,
    log_level: str = "debug",
    cwd: Path | None = None,
    log_dir: Path | None = None,
) -> AgentProcess:
    """`log_dir`: where its log goes (default: its state directory; another one when the
    state directory is a disk a test fills)."""
    device = device_id or f"dev-{uuid.uuid4().hex[:6]}"
    if cwd is None and os.environ.get("EDGE_AGENT_TREE"):
        # another checkout's agent (bench figures "before" a change): `python -m edge_agent`
        # finds that tree's package first when it runs there
        cwd = Path(os.environ["EDGE_AGENT_TREE"])
    state_dir.mkdir(parents=True, exist_ok=True)
    (log_dir or state_dir).mkdir(parents=True, exist_ok=True)
    log_path = (log_dir or state_dir) / f"agent-{device}-{int(time.time() * 1000)}.log"
    full_env = {
        **os.environ,
        "EDGE_AGENT_MQTT__TOPIC_PREFIX": prefix,
        # tests share one broker: keep each one's Home Assistant discovery apart too
        "EDGE_AGENT_TELEMETRY__DISCOVERY_PREFIX": f"{prefix}-ha",
        "EDGE_AGENT_TELEMETRY__INTERVAL_S": "1",
        "EDGE_AGENT_MODEL__N_THREADS": "2",
        "EDGE_AGENT_MQTT__RECONNECT_MAX_S": "1",
        **(env or {}),
    }
    args = [
        sys.executable, "-m", "edge_agent", "run", "--broker", broker_url,
        "--device-id", device, "--state-dir", str(state_dir), "--protocol", protocol,
        "--log-format", "json", "--log-level", log_level, *(extra_args or []),
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=cwd
        )
    agent = AgentProcess(proc, device, prefix, state_dir, log_path, args, full_env, cwd=cwd)
    if wait_online:
        try:
            wait_for_log(agent, "agent.started", timeout)
            wait_for_log(agent, "mqtt.subscribed", timeout)  # delivers from the SUBACK on
        except BaseException:
            agent.kill()  # not left running for a later test to trip over
            raise
    return agent


def wait_for_log(agent: AgentProcess, event: str, timeout: float, count: int = 1) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in agent.log_events() if e.get("event") == event]
        if len(found) >= count:
            return found[count - 1]
        if not agent.alive():
            tail = agent.log_text()[-3000:]
            raise AssertionError(f"agent exited ({agent.proc.returncode}) before {event}:\n{tail}")
        time.sleep(0.05)
    tail = agent.log_text()[-3000:]
    raise AssertionError(f"no {event} in the agent log within {timeout}s:\n{tail}")


def completions(agents: Iterable[AgentProcess]) -> Counter[str]:
    """How many times each job id ran to completion, over every agent's whole log."""
    counts: Counter[str] = Counter()
    for agent in agents:
        for event in agent.log_events():
            if event.get("event") == "job.completed" and event.get("job_id"):
                counts[str(event["job_id"])] += 1
    return counts


# ---- a careful sensor -------------------------------------------------------------------


@dataclass
class Sent:
    job: dict[str, Any]
    first_sent: float
    last_sent: float
    deadline: float
    attempts: int = 1
    replies: list[dict[str, Any]] = field(default_factory=list)
    first_reply_at: float | None = None


class Sensor:
    """Publishes jobs (MQTT 5, QoS 1, response topic, correlation data) and retries a job
    with the same id when its reply is late, as a sensor that must not lose work would.

    It keeps a persistent session and re-subscribes on every connect, so it does not lose
    replies across a broker restart either.
    """

    def __init__(self, host: str, port: int, prefix: str, retry_after_s: float = 8.0) -> None:
        self.prefix = prefix
        self.reply_topic = f"{prefix}/replies/sensor-{uuid.uuid4().hex[:6]}"
        self.retry_after_s = retry_after_s
        self.sent: dict[str, Sent] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        client_id = f"sensor-{uuid.uuid4().hex[:8]}"
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_socket_open = lambda _c, _u, s: s.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        self.client.reconnect_delay_set(0.2, 1.0)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(host, port, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("sensor could not connect")

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.reply_topic, qos=1)
            self._ready.set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if body.get("status") not in ("done", "failed", "rejected", "expired", "cancelled"):
            return
        with self._lock:
            entry = self.sent.get(str(body.get("id")))
            if entry is not None:
                entry.replies.append(body)
                if entry.first_reply_at is None:
                    entry.first_reply_at = time.time()

    def send(self, job: dict[str, Any], ttl_s: float = 120.0, topic: str | None = None) -> None:
        now = time.time()
        with self._lock:
            self.sent[job["id"]] = Sent(job, now, now, now + ttl_s)
        self._publish(job, ttl_s, topic)

    def _publish(self, job: dict[str, Any], ttl_s: float, topic: str | None) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = job["id"].encode()
        props.MessageExpiryInterval = max(1, int(ttl_s))
        self.client.publish(
            topic or f"{self.prefix}/jobs/{job.get('kind', 'classify')}",
            json.dumps(job).encode(),
            qos=1,
            properties=props,
        )

    def retry_late(self) -> int:
        """Republish (same id) every unanswered job whose reply is overdue."""
        now = time.time()
        with self._lock:
            late = [
                s for s in self.sent.values()
                if not s.replies and now - s.last_sent > self.retry_after_s and now < s.deadline
            ]  # fmt: skip
            for s in late:
                s.last_sent = now
                s.attempts += 1
        for s in late:
            self._publish(s.job, s.deadline - now, None)
        return len(late)

    def wait_all(self, timeout: float, retry: bool = True) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            with self._lock:
                missing = [
                    s for s in self.sent.values() if not s.replies and time.time() < s.deadline
                ]
            if not missing:
                return True
            if retry:
                self.retry_late()
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def classify_job(i: int, tag: str) -> dict[str, Any]:
    texts = [
        "Pump P-3 vibration 9.1 mm/s, above the alarm threshold.",
        "Freezer F-2 holding at -19.8 C.",
        "Door D-4 opened at 02:13, badge not recognised.",
        "Battery of tag T-9 at 15 percent, replace soon.",
    ]
    return {
        "id": f"{tag}-{i}",
        "kind": "classify",
        "text": texts[i % len(texts)],
        "labels": ["normal", "warning", "critical"],
    }


# ---- figures ------------------------------------------------------------------------


@dataclass
class Figures:
    scenario: str
    sent: int
    replies: int
    lost: int
    executed_twice: int
    duplicate_replies: int
    recover_s: float | None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # scenario-specific figures

    def row(self) -> str:
        rec = "-" if self.recover_s is None else f"{self.recover_s:.1f}"
        return (
            f"| {self.scenario} | {self.sent} | {self.replies} | {self.lost} | "
            f"{self.executed_twice} | {self.duplicate_replies} | {rec} | {self.notes} |"
        )


HEADER = (
    "| scenario | jobs sent | replies | lost | executed twice | duplicate replies seen "
    "| recovery (s) | notes |\n|---|---|---|---|---|---|---|---|"
)


def figures(
    scenario: str,
    sensor: Sensor,
    agents: Iterable[AgentProcess],
    recover_from: float | None,
    notes: str = "",
) -> Figures:
    agents = list(agents)
    now = time.time()
    entries = list(sensor.sent.values())
    answered = [s for s in entries if s.replies]
    lost = [s for s in entries if not s.replies and now < s.deadline]
    runs = completions(agents)
    twice = sum(1 for s in entries if runs.get(s.job["id"], 0) > 1)
    dupes = sum(len(s.replies) - 1 for s in answered)
    recover = None
    if recover_from is not None:
        after = [
            s.first_reply_at
            for s in answered
            if s.first_reply_at and s.first_reply_at >= recover_from
        ]
        recover = (min(after) - recover_from) if after else None
    return Figures(scenario, len(entries), len(answered), len(lost), twice, dupes, recover, notes)


# ---- a TCP proxy that can black-hole ----------------------------------------------------


class Proxy:
    """Forwards 127.0.0.1:<port> to a target; `blackhole()` stops forwarding both ways
    (connections stay open, bytes are dropped), `heal()` resumes for new connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port = int(self._server.getsockname()[1])
        self._holed = threading.Event()
        self._stop = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def blackhole(self) -> None:
        self._holed.set()

    def heal(self) -> None:
        """Resume; connections that lived through the black hole are cut (as a NAT
        table that forgot them would), so clients reconnect."""
        for a, b in self._pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
        self._pairs.clear()
        self._holed.clear()

    def close(self) -> None:
        self._stop.set()
        self.heal()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if not self._holed.is_set():
                        peers[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
