"""Telemetry against a real Mosquitto: presence through kills and restarts, rebirth, Home
Assistant discovery, the documented schema, Prometheus, and the fleet view."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.adapters.broker import LocalBroker, free_port, wait_for_port
from edge_agent.adapters.mqtt import Requester
from edge_agent.adapters.probe import Readings
from edge_agent.core.metrics import Metrics
from edge_agent.core.protocol import Topics
from edge_agent.service.telemetry import Identity, TelemetryLoop, build_telemetry, ha_discovery
from tests.harness.process import AgentProcess, start_agent_process, wait_for_log

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "telemetry.schema.json").read_text())
HA_KEYS = json.loads((ROOT / "tests" / "data" / "ha_mqtt_sensor_keys.json").read_text())


class Watcher:
    """A subscriber that survives broker restarts (persistent session, re-subscribes on
    connect) and records every message with its arrival time."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.topics = topics
        self.messages: list[tuple[float, str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"watch-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv5,
        )
        self.client.on_connect = lambda c, _u, _f, _r, _p: c.subscribe(
            [(t, 1) for t in self.topics]
        )
        self.client.on_message = self._message
        self.client.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    def _message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((time.time(), msg.topic, bytes(msg.payload), bool(msg.retain)))

    def wait(
        self, predicate: Any, timeout: float, after: float = 0.0
    ) -> tuple[float, str, bytes, bool] | None:
        end = time.time() + timeout
        while time.time() < end:
            with self.lock:
                for m in self.messages:
                    if m[0] >= after and predicate(m):
                        return m
            time.sleep(0.02)
        return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watched(broker: LocalBroker, prefix: str) -> Iterator[Watcher]:
    w = Watcher(
        broker.port,
        [
            f"{prefix}/devices/+/status",
            f"{prefix}/devices/+/info",
            f"{prefix}/devices/+/telemetry",
            f"{prefix}-ha/#",
        ],
    )
    yield w
    w.close()


def status_is(value: bytes) -> Any:
    return lambda m: m[1].endswith("/status") and m[2] == value


def test_telemetry_follows_the_documented_schema(start_agent: Any, watched: Watcher) -> None:
    agent: AgentProcess = start_agent()
    seen = []
    for _ in range(2):
        msg = watched.wait(
            lambda m: m[1].endswith("/telemetry"), 10, after=seen[-1][0] + 0.001 if seen else 0.0
        )
        assert msg is not None
        seen.append(msg)
        body = json.loads(msg[2])
        jsonschema.validate(body, SCHEMA)
        assert body["device"] == agent.device_id
        assert body["model"]["name"] == "smollm2-135m-instruct-q4_1"


def test_build_telemetry_is_valid_for_a_pi_like_board() -> None:
    readings = Readings(
        12.5,
        0.4,
        8 << 30,
        6 << 30,
        0,
        300 << 20,
        50 << 30,
        61.2,
        {"under_voltage": False, "throttled": True},
        42.0,
    )
    metrics = {
        "jobs": {"done": 3, "failed": 0, "rejected": 1, "expired": 0, "cancelled": 0},
        "counters": {"handed_back": 2},
        "latency_ms_p50": 90.0,
        "latency_ms_p95": 130.0,
        "latency_window": 4,
        "time_to_first_token_ms": 80.0,
        "tokens_per_second": 110.0,
        "tokens_per_second_avg": 105.0,
        "prompt_tokens_per_second": 300.0,
        "prompt_tokens_per_second_avg": 290.0,
        "last_token_at": 1.7e9,
        "puback_ms_p50": 95.0,
        "puback_ms_p99": 180.0,
        "spool": {
            "spool_pending": 0,
            "remembered": 3,
            "spool_dropped_full": 0,
            "spool_dropped_expired": 0,
            "spool_dropped_unsendable": 0,
            "poison_jobs": 0,
        },
        "health": {"state": "degraded", "reasons": ["inference thread died: ..."]},
        "intake_backlog": 0,
    }
    body = build_telemetry(Identity("pi-1", 2, "m", "Q4_K_M"), readings, metrics, 1)
    jsonschema.validate(body, SCHEMA)


def pi_readings(**changes: Any) -> Readings:
    values: dict[str, Any] = {
        "uptime_s": 12.5, "cpu_percent": 0.4, "memory_total_bytes": 8 << 30,
        "memory_available_bytes": 6 << 30, "swap_used_bytes": 0, "agent_rss_bytes": 300 << 20,
        "disk_free_bytes": 50 << 30, "soc_temperature_c": 61.2, "throttled": None,
        "load_1m": 0.4,
    }  # fmt: skip
    values.update(changes)
    return Readings(**values)


RATES = (
    "latency_ms_p50", "latency_ms_p95", "time_to_first_token_ms", "tokens_per_second",
    "tokens_per_second_avg", "prompt_tokens_per_second", "prompt_tokens_per_second_avg",
    "last_token_at", "puback_ms_p50", "puback_ms_p99",
)  # fmt: skip
SPOOL = (
    "spool_pending", "remembered", "spool_dropped_full", "spool_dropped_expired",
    "spool_dropped_unsendable", "poison_jobs",
)  # fmt: skip


def counters(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "jobs": {"done": 0, "failed": 0, "rejected": 0, "expired": 0, "cancelled": 0},
        "counters": {},
        **dict.fromkeys(RATES),
        "latency_window": 0,
        "spool": dict.fromkeys(SPOOL, 0),
        "health": {"state": "ok", "reasons": []},
        "intake_backlog": 0,
    }
    base.update(changes)
    return base


def test_telemetry_clamps_a_value_out_of_range_instead_of_failing_its_schema() -> None:
    """A backward clock step made a PUBACK time negative: every publish failed its own
    schema, for good, with health `ok` (issue 21). Now the value is clamped and counted."""
    told: list[list[str]] = []
    body = build_telemetry(
        Identity("pi-1", 2, "m", "Q4_K_M"),
        pi_readings(cpu_percent=130.0, uptime_s=-3.0),
        counters(puback_ms_p50=-8.9e11),
        1,
        on_clamped=told.append,
    )
    jsonschema.validate(body, SCHEMA)
    assert (body["puback_ms_p50"], body["cpu_percent"], body["uptime_s"]) == (0.0, 100.0, 0.0)
    assert sorted(told[0]) == ["cpu_percent", "puback_ms_p50", "uptime_s"]


def test_telemetry_that_keeps_failing_degrades_health() -> None:
    def refuse(_payload: bytes) -> None:
        raise ConnectionError("the broker refused it")

    loop = TelemetryLoop(0.01, make=lambda: {"v": 1}, publish=refuse)
    loop.start()
    deadline = time.monotonic() + 5
    while loop.problem() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.stop()
    problem = loop.problem()
    assert problem is not None and "telemetry failing" in problem and "refused" in problem


def test_sigkill_leaves_offline_within_one_and_a_half_keepalives(
    start_agent: Any, watched: Watcher
) -> None:
    agent: AgentProcess = start_agent(env={"EDGE_AGENT_MQTT__KEEPALIVE_S": "5"})
    assert watched.wait(status_is(b"online"), 10)
    killed = time.time()
    agent.kill()
    offline = watched.wait(status_is(b"offline"), 15, after=killed)
    assert offline is not None
    print(f"\noffline {offline[0] - killed:.2f} s after SIGKILL (limit 7.5 s)")
    assert offline[0] - killed <= 7.5


def test_sigterm_leaves_stopped(start_agent: Any, watched: Watcher) -> None:
    agent: AgentProcess = start_agent()
    assert watched.wait(status_is(b"online"), 10)
    asked = time.time()
    assert agent.terminate() == 0
    assert watched.wait(status_is(b"stopped"), 10, after=asked)


def test_online_again_after_a_broker_restart(tmp_path: Path) -> None:
    prefix = f"r{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(workdir=tmp_path / "broker").start()
    agent = start_agent_process(
        broker.url, prefix, tmp_path / "agent", env={"EDGE_AGENT_MQTT__RECONNECT_MIN_S": "0.2"}
    )
    watcher = Watcher(broker.port, [f"{prefix}/devices/+/status"])
    try:
        assert watcher.wait(status_is(b"online"), 10)
        # The broker crashes and comes back without its state (persistence file gone): the
        # retained `online` of before is lost with it, so an `online` after the restart,
        # live or retained, can only be the agent announcing itself again.
        broker.kill()
        for saved in broker.workdir.glob("*.db"):
            saved.unlink()
        restarted = time.time()
        broker.start()
        again = watcher.wait(status_is(b"online"), 20, after=restarted)
        assert again is not None, "the agent did not announce online after the restart"
        wait_for_log(agent, "mqtt.connected", 10, count=2)
    finally:
        watcher.close()
        agent.kill()
        broker.close()


def test_rebirth_republishes_info_and_status(
    start_agent: Any, watched: Watcher, requester: Requester, prefix: str
) -> None:
    agent: AgentProcess = start_agent()
    assert watched.wait(lambda m: m[1].endswith("/info"), 10)
    for topic in (f"{prefix}/cmd/rebirth", f"{prefix}/devices/{agent.device_id}/cmd/rebirth"):
        asked = time.time()
        requester.publish(topic, b"")
        assert watched.wait(lambda m: m[1].endswith("/info") and not m[3], 10, after=asked), topic
        assert watched.wait(lambda m: status_is(b"online")(m) and not m[3], 10, after=asked), topic


def test_home_assistant_discovery_uses_documented_keys_and_reannounces(
    start_agent: Any, watched: Watcher, requester: Requester, prefix: str
) -> None:
    agent: AgentProcess = start_agent()
    configs = {}
    end = time.time() + 10
    while time.time() < end and len(configs) < 10:
        with watched.lock:
            configs = {m[1]: json.loads(m[2]) for m in watched.messages if m[1].endswith("/config")}
        time.sleep(0.1)
    assert len(configs) >= 10, configs.keys()
    for topic, config in configs.items():
        assert topic.startswith(f"{prefix}-ha/sensor/edge_agent_")
        assert set(config) <= set(HA_KEYS["sensor"]), set(config) - set(HA_KEYS["sensor"])
        assert set(config["device"]) <= set(HA_KEYS["device"])
        assert set(config["origin"]) <= set(HA_KEYS["origin"])
        assert config.get("state_class", "measurement") in HA_KEYS["state_class"]
        assert config.get("entity_category", "diagnostic") == "diagnostic"
        assert config["availability_topic"] == f"{prefix}/devices/{agent.device_id}/status"
        assert config["state_topic"] == f"{prefix}/devices/{agent.device_id}/telemetry"
        assert config["unique_id"] and config["device"]["identifiers"]
    asked = time.time()
    requester.publish(f"{prefix}-ha/status", b"online")
    again = watched.wait(lambda m: m[1].endswith("/config") and not m[3], 10, after=asked)
    assert again is not None, "no re-announcement after homeassistant/status online"


SPOOL_KEYS = (
    "spool_pending",
    "remembered",
    "spool_dropped_full",
    "spool_dropped_expired",
    "spool_dropped_unsendable",
    "poison_jobs",
)


def test_discovery_values_render_from_a_telemetry_message() -> None:
    """Each value_template's path exists in a real telemetry message (jinja-free check)."""
    configs = ha_discovery(
        topics=Topics("edge", "pi 1", "g", discovery_prefix="ha"),
        version="1",
        board_model=None,
        architecture="aarch64",
        has_soc_temperature=True,
        interval_s=30,
    )
    keys = {
        p
        for _, c in configs
        for p in [c["value_template"].split("value_json.")[1].split()[0].rstrip(")}")]
    }
    sample = build_telemetry(
        Identity("d", 1, "m", "q"),
        Readings(1, 1, 1, 1, 0, 1, 1, 1.0, None, 1),
        {
            **Metrics().snapshot(),
            "tokens_per_second": 1.0,
            "prompt_tokens_per_second": 1.0,
            "latency_ms_p50": 1.0,
            "latency_ms_p95": 1.0,
            "spool": dict.fromkeys(SPOOL_KEYS, 0),
            "health": {"state": "ok", "reasons": []},
            "intake_backlog": 0,
        },
        0,
    )
    for path in keys:
        value: Any = sample
        for part in path.split("."):
            value = value[part]
    assert configs[0][0].startswith("ha/sensor/edge_agent_pi_1/")


@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="Debian package prometheus is not installed"
)
def test_prometheus_scrapes_the_metrics_endpoint(start_agent: Any, tmp_path: Path) -> None:
    port = free_port()
    agent: AgentProcess = start_agent(env={"EDGE_AGENT_TELEMETRY__PROMETHEUS_PORT": str(port)})
    wait_for_log(agent, "metrics.serving", 10)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "edge_agent_queue_depth{" in text
    assert "edge_agent_info{architecture=" in text or "edge_agent_info{" in text
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: edge\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    )
    prom = subprocess.Popen(
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_port(prom_port, 30)
        value = None
        end = time.time() + 30
        while time.time() < end and value is None:
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?query=edge_agent_info"
            try:
                body = json.loads(urllib.request.urlopen(url, timeout=5).read())
            except OSError:
                body = {}
            results = body.get("data", {}).get("result", [])
            if results:
                value = results[0]
            time.sleep(0.5)
        assert value is not None, "Prometheus never returned edge_agent_info"
        assert value["metric"]["device"] == agent.device_id
        assert value["metric"]["model"] == "smollm2-135m-instruct-q4_1"
        assert value["value"][1] == "1"
    finally:
        prom.terminate()
        prom.wait(10)


def test_fleet_json_lists_three_agents(start_agent: Any, broker: LocalBroker, prefix: str) -> None:
    agents = [start_agent(device_id=f"node-{i}") for i in range(3)]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "fleet",
            "--broker",
            broker.url,
            "--json",
            "--wait",
            "2.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EDGE_AGENT_MQTT__TOPIC_PREFIX": prefix},
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["device"] for r in rows] == [a.device_id for a in agents]
    for row in rows:
        assert row["status"] == "online"
        assert row["model"] == "smollm2-135m-instruct-q4_1" and row["quant"] == "Q4_1"
        assert row["seen"] is not None and row["seen"] < 5
        assert row["telemetry"]["queue_depth"] == 0


def test_wire_schemas_are_generated_from_the_models() -> None:
    """docs/telemetry.schema.json and docs/protocol.schema.json are what
    scripts/gen_wire_schemas.py writes from edge_agent/core/wire.py: no drift."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_wire_schemas.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_protocol_schema_accepts_the_documented_messages_and_refuses_strays() -> None:
    schema = json.loads((ROOT / "docs" / "protocol.schema.json").read_text())
    defs = schema["$defs"]

    def valid(name: str, message: dict[str, Any]) -> bool:
        return jsonschema.Draft202012Validator({**defs[name], "$defs": defs}).is_valid(message)

    job = {"id": "j1", "kind": "classify", "text": "Door D-1 opened.", "labels": ["ok", "alarm"]}
    assert valid("JobIn", job)
    assert not valid("JobIn", {**job, "priority": "7"})  # strict: a string is not a priority
    reply = {
        "v": 1, "id": "j1", "status": "done", "device": "pi-1",
        "model": {"name": "m", "quant": "Q4_1", "sha256": None},
        "result": {"label": "ok", "scores": {"ok": 0.9, "alarm": 0.1}, "confidence": 0.9},
        "error": None, "timings": None,
    }  # fmt: skip
    assert valid("ReplyMessage", reply)
    assert not valid("ReplyMessage", {**reply, "status": "maybe"})
    assert not valid("ReplyMessage", {**reply, "surprise": 1})


def test_the_wire_models_name_what_the_agent_counts_and_reads() -> None:
    """core.wire lists the throttle flags and counters by name (core cannot import the
    probe or the intake); they must be the ones the agent produces."""
    import re
    import typing

    from edge_agent.adapters.probe import THROTTLE_BITS
    from edge_agent.core.wire import Counter, ThrottleFlag

    assert set(typing.get_args(ThrottleFlag)) == set(THROTTLE_BITS)
    bumped = set()
    for path in (ROOT / "edge_agent").rglob("*.py"):
        bumped |= set(re.findall(r'\.bump\("([a-z_0-9]+)"[,)]', path.read_text()))
    assert bumped == set(typing.get_args(Counter))
