"""Periodic telemetry: the message dashboards read (docs/telemetry.md, field by field).

`build_telemetry` is pure; `TelemetryLoop` is the timer thread that samples the board,
reads the worker's counters and hands the message to a publish callable. It never touches
the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic import ValidationError

from edge_agent.adapters.probe import Readings
from edge_agent.core.protocol import Topics, encode_json
from edge_agent.core.wire import TELEMETRY_VERSION, Info, Telemetry
from edge_agent.service.health import Beat, loop_thread

log = structlog.get_logger("edge_agent.telemetry")

# Telemetry publishes that fail in a row before health turns degraded (one may fail while
# the broker is away; three in a row is a telemetry that no dashboard receives).
FAILURES_TO_DEGRADE = 3


@dataclass(frozen=True)
class Identity:
    device: str
    session: int
    model_name: str
    model_quant: str


def build_telemetry(
    identity: Identity,
    readings: Readings,
    inference: dict[str, Any],
    queue_depth: int,
    now: datetime | None = None,
    on_clamped: Callable[[list[str]], None] = lambda _fields: None,
) -> dict[str, Any]:
    """The telemetry message. It always fits its own schema: a value out of its range (a
    negative duration after a clock step, a reading a sensor got wrong) is clamped to the
    range, and `on_clamped` is told which fields were (the agent counts them)."""
    moment = now or datetime.now(UTC)
    message = {
        "v": TELEMETRY_VERSION,
        "device": identity.device,
        "ts": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "session": identity.session,
        "uptime_s": round(readings.uptime_s, 1),
        "cpu_percent": round(readings.cpu_percent, 1),
        "load_1m": round(readings.load_1m, 2),
        "memory": {
            "total_bytes": readings.memory_total_bytes,
            "available_bytes": readings.memory_available_bytes,
            "agent_rss_bytes": readings.agent_rss_bytes,
            "swap_used_bytes": readings.swap_used_bytes,
        },
        "disk_free_bytes": readings.disk_free_bytes,
        "soc_temperature_c": None
        if readings.soc_temperature_c is None
        else round(readings.soc_temperature_c, 1),
        "throttled": readings.throttled,
        "model": {"name": identity.model_name, "quant": identity.model_quant},
        "queue_depth": queue_depth,
        **inference,
    }
    # through the typed model: a message that does not fit docs/telemetry.schema.json is
    # mended here (or raises, and the telemetry thread logs it) instead of breaking a
    # dashboard
    try:
        return Telemetry.model_validate(message).model_dump(mode="json")
    except ValidationError as exc:
        fields = clamp(message, exc)
        if not fields:
            raise
    on_clamped(fields)
    return Telemetry.model_validate(message).model_dump(mode="json")


def clamp(message: dict[str, Any], error: ValidationError) -> list[str]:
    """Bring each value the schema's bounds refuse into them, in place; the fields mended
    (none: some error is not a bound, and the message cannot be mended)."""
    mended: list[str] = []
    for problem in error.errors():
        bound = problem.get("ctx") or {}
        limit = next((bound[k] for k in ("ge", "gt", "le", "lt") if k in bound), None)
        loc = [part for part in problem["loc"] if isinstance(part, str)]
        parent: Any = message
        for part in loc[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if limit is None or not isinstance(parent, dict) or not loc or loc[-1] not in parent:
            return []
        parent[loc[-1]] = limit
        mended.append(".".join(loc))
    return mended


def status_line(telemetry: dict[str, Any], connected: bool) -> str:
    """One line for `systemctl status` (systemd's STATUS=), from a telemetry message."""
    model = telemetry.get("model", {})
    jobs = telemetry.get("jobs", {})
    tps = telemetry.get("tokens_per_second_avg")
    mode = telemetry.get("mode", "serving")
    parts = [
        f"serving {model.get('name')}" if mode == "serving" else f"{mode} ({model.get('name')})",
        f"{jobs.get('done', 0)} done, {jobs.get('failed', 0)} failed, "
        f"{telemetry.get('queue_depth', 0)} queued",
    ]
    if tps is not None:
        parts.append(f"{tps:g} tokens/s")
    pending = telemetry.get("spool", {}).get("spool_pending", 0)
    if not connected:
        parts.append(f"broker unreachable, reconnecting ({pending} replies spooled)")
    return "; ".join(parts)


def build_info(
    identity: Identity,
    version: str,
    board: dict[str, Any],
    model: dict[str, Any],
    capabilities: dict[str, Any],
    runtime: dict[str, Any],
) -> dict[str, Any]:
    """The retained device info (docs/telemetry.md): what a dashboard needs to know once."""
    info = {
        "v": TELEMETRY_VERSION,
        "device": identity.device,
        "session": identity.session,
        "agent_version": version,
        "board": {
            "model": board.get("board_model"),
            "architecture": board.get("architecture"),
            "cpu_cores": board.get("cpu_cores"),
            "cpu_features": board.get("cpu_features"),
            "ram_total_bytes": board.get("ram_total_bytes"),
            "cgroup_memory_max_bytes": board.get("cgroup_memory_max_bytes"),
            "memory_cgroup_enabled": board.get("memory_cgroup_enabled"),
            "kernel": board.get("kernel"),
        },
        "model": model,
        "runtime": runtime,
        "capabilities": capabilities,
    }
    return Info.model_validate(info).model_dump(mode="json", exclude={"health"})


def encode(message: dict[str, Any]) -> bytes:
    return encode_json(message)


class TelemetryLoop:
    """Publishes `make()` every `interval_s` seconds on a thread named "telemetry"."""

    def __init__(
        self,
        interval_s: float,
        make: Callable[[], dict[str, Any]],
        publish: Callable[[bytes], None],
        beat: Beat | None = None,
    ) -> None:
        self.interval_s = interval_s
        self._make = make
        self._publish = publish
        self._beat = beat
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: str | None = None  # the last error, while publishes keep failing
        self._failures = 0  # in a row

    def start(self) -> None:
        self._thread = loop_thread("telemetry", self._beat, self._loop)

    def publish_now(self) -> None:
        self._kick.set()

    def problem(self) -> str | None:
        """Why health is degraded by telemetry: FAILURES_TO_DEGRADE publishes in a row
        failed (the thread lives on and tries every period). None otherwise."""
        if self._failures >= FAILURES_TO_DEGRADE:
            return f"telemetry failing ({self._failures} in a row: {self._failing})"
        return None

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.interval_s)
            self._kick.clear()
            if self._stop.is_set():
                return
            if self._beat is not None:
                self._beat.busy()
            try:
                self._publish(encode(self._make()))
                self._failures, self._failing = 0, None
            except Exception as exc:  # a bad reading must not end telemetry
                log.exception("telemetry.failed")
                self._failures += 1
                self._failing = f"{type(exc).__name__}: {exc}"[:200]
                if self._beat is not None:
                    self._beat.error()
            finally:
                if self._beat is not None:
                    self._beat.idle()


# ---- Home Assistant MQTT discovery -------------------------------------------------------


@dataclass(frozen=True)
class HaSensor:
    key: str  # object id and unique-id suffix
    name: str
    template: str  # value_template over the telemetry message
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = "measurement"
    precision: int | None = None
    options: tuple[str, ...] | None = None  # an enum sensor's states


HA_SENSORS = (
    HaSensor(
        "tokens_per_second",
        "Generation speed",
        "{{ value_json.tokens_per_second }}",
        "tok/s",
        precision=1,
    ),
    HaSensor(
        "prompt_tokens_per_second",
        "Prompt speed",
        "{{ value_json.prompt_tokens_per_second }}",
        "tok/s",
        precision=1,
    ),
    HaSensor("queue_depth", "Queue depth", "{{ value_json.queue_depth }}", None, precision=0),
    HaSensor(
        "mode",
        "Mode",
        "{{ value_json.mode | default('serving') }}",
        None,
        "enum",
        None,
        options=("serving", "draining", "drained"),
    ),
    HaSensor(
        "latency_p50",
        "Job latency p50",
        "{{ value_json.latency_ms_p50 }}",
        "ms",
        "duration",
        precision=0,
    ),
    HaSensor(
        "latency_p95",
        "Job latency p95",
        "{{ value_json.latency_ms_p95 }}",
        "ms",
        "duration",
        precision=0,
    ),
    HaSensor(
        "jobs_done", "Jobs done", "{{ value_json.jobs.done }}", None, None, "total_increasing", 0
    ),
    HaSensor(
        "jobs_failed",
        "Jobs failed",
        "{{ value_json.jobs.failed }}",
        None,
        None,
        "total_increasing",
        0,
    ),
    HaSensor(
        "memory_available",
        "Memory available",
        "{{ (value_json.memory.available_bytes / 1048576) | round(0) }}",
        "MiB",
        "data_size",
        precision=0,
    ),
    HaSensor(
        "agent_memory",
        "Agent memory",
        "{{ (value_json.memory.agent_rss_bytes / 1048576) | round(0) }}",
        "MiB",
        "data_size",
        precision=0,
    ),
    HaSensor("cpu", "CPU", "{{ value_json.cpu_percent }}", "%", None, precision=0),
)
SOC_SENSOR = HaSensor(
    "soc_temperature",
    "SoC temperature",
    "{{ value_json.soc_temperature_c }}",
    "°C",
    "temperature",
    precision=1,
)
# The status topic carries three states; Home Assistant knows two.
AVAILABILITY_TEMPLATE = "{{ 'online' if value == 'online' else 'offline' }}"


def _ha_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in text)


def ha_discovery(
    *,
    topics: Topics,
    version: str,
    board_model: str | None,
    architecture: str,
    has_soc_temperature: bool,
    interval_s: float,
) -> list[tuple[str, dict[str, Any]]]:
    """Retained config messages that make the device and its sensors appear in Home
    Assistant (MQTT discovery), with the device's status topic as availability."""
    device_id = topics.device_id
    node = f"edge_agent_{_ha_id(device_id)}"
    device = {
        "identifiers": [node],
        "name": f"edge-agent {device_id}",
        "manufacturer": "edge-agent",
        "model": board_model or architecture,
        "sw_version": version,
        "hw_version": architecture,
    }
    origin = {"name": "edge-agent", "sw_version": version}
    sensors = [*HA_SENSORS, SOC_SENSOR] if has_soc_temperature else list(HA_SENSORS)
    out: list[tuple[str, dict[str, Any]]] = []
    for s in sensors:
        config: dict[str, Any] = {
            "name": s.name,
            "unique_id": f"{node}_{s.key}",
            "state_topic": topics.telemetry(),
            "value_template": s.template,
            "availability_topic": topics.status(),
            "availability_template": AVAILABILITY_TEMPLATE,
            "payload_available": "online",
            "payload_not_available": "offline",
            # no telemetry for three periods: the value is stale, show it unavailable
            "expire_after": max(60, int(interval_s * 3)),
            "device": device,
            "origin": origin,
        }
        if s.unit is not None:
            config["unit_of_measurement"] = s.unit
        if s.device_class is not None:
            config["device_class"] = s.device_class
        if s.state_class is not None:
            config["state_class"] = s.state_class
        if s.precision is not None:
            config["suggested_display_precision"] = s.precision
        if s.options is not None:
            config["options"] = list(s.options)
        if s.key in ("cpu", "memory_available", "agent_memory"):
            config["entity_category"] = "diagnostic"
        out.append((topics.ha_config("sensor", node, s.key), config))
    return out
