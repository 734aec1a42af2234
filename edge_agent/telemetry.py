"""Periodic telemetry: the message dashboards read (docs/telemetry.md, field by field).

`build_telemetry` is pure; `TelemetryLoop` is the timer thread that samples the board,
reads the worker's counters and hands the message to a publish callable. It never touches
the model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from edge_agent.probe import Readings

log = structlog.get_logger("edge_agent.telemetry")
TELEMETRY_VERSION = 1


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
) -> dict[str, Any]:
    moment = now or datetime.now(UTC)
    return {
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


def build_info(
    identity: Identity,
    version: str,
    board: dict[str, Any],
    model: dict[str, Any],
    capabilities: dict[str, Any],
    runtime: dict[str, Any],
) -> dict[str, Any]:
    """The retained device info (docs/telemetry.md): what a dashboard needs to know once."""
    return {
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


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


class TelemetryLoop:
    """Publishes `make()` every `interval_s` seconds on a thread named "telemetry"."""

    def __init__(
        self,
        interval_s: float,
        make: Callable[[], dict[str, Any]],
        publish: Callable[[bytes], None],
    ) -> None:
        self.interval_s = interval_s
        self._make = make
        self._publish = publish
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)
        self._thread.start()

    def publish_now(self) -> None:
        self._kick.set()

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
            try:
                self._publish(encode(self._make()))
            except Exception:  # a bad reading must not end telemetry
                log.exception("telemetry.failed")
