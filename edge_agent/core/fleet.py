"""`edge-agent fleet`: every device under the topic prefix, from what they publish.

Pure: `FleetState` folds status, info and telemetry messages into one row per device and
the table's cells; the command line feeds it from an MQTT subscription to
`<prefix>/devices/+/{status,info,telemetry}` (retained status and info arrive at once,
telemetry every interval).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from edge_agent.core.protocol import Topics

LEAVES = ("status", "info", "telemetry")
# column key -> (header, how to sort: a function of the row)
COLUMNS = {
    "device": "device",
    "status": "status",
    "board": "board",
    "model": "model",
    "quant": "quant",
    "tps": "tok/s",
    "queue": "queue",
    "p95": "p95 ms",
    "temp": "SoC °C",
    "seen": "last seen",
}


@dataclass
class DeviceView:
    device: str
    status: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    last_seen: float = 0.0

    def row(self, now: float) -> dict[str, Any]:
        model = self.info.get("model") or {}
        board = self.info.get("board") or {}
        t = self.telemetry
        health = (t.get("health") or self.info.get("health") or {}).get("state")
        status = self.status
        if status == "online" and health not in (None, "ok"):
            status = f"online, {health}"  # up, but a thread died or stalled
        mode = t.get("mode")
        if status is not None and status.startswith("online") and mode in ("draining", "drained"):
            status = f"{status}, {mode}"  # out of the fleet's queue (operation drain)
        return {
            "device": self.device,
            "status": status,
            "board": board.get("model") or board.get("architecture"),
            "model": model.get("name") or (t.get("model") or {}).get("name"),
            "quant": model.get("quant") or (t.get("model") or {}).get("quant"),
            "tps": t.get("tokens_per_second_avg", t.get("tokens_per_second")),
            "queue": t.get("queue_depth"),
            "p95": t.get("latency_ms_p95"),
            "temp": t.get("soc_temperature_c"),
            "seen": round(now - self.last_seen, 1) if self.last_seen else None,
        }


class FleetState:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.topics = Topics(prefix, device_id="", share_group="")
        self.devices: dict[str, DeviceView] = {}

    def update(self, topic: str, payload: bytes, now: float | None = None) -> bool:
        """Fold one message in; False if it is not a device status/info/telemetry."""
        found = self.topics.device_leaf(topic)
        if found is None:
            return False
        device, leaf = found
        if leaf not in LEAVES:
            return False
        view = self.devices.setdefault(device, DeviceView(device))
        if leaf == "status":
            view.status = payload.decode("utf-8", "replace").strip() or None
            if view.status is None:  # a cleared retained status: the device is gone
                del self.devices[device]
                return True
        else:
            try:
                body = json.loads(payload)
            except ValueError:
                return False
            if not isinstance(body, dict):
                return False
            if leaf == "info":
                view.info = body
            else:
                view.telemetry = body
        view.last_seen = now if now is not None else time.time()
        return True

    def rows(
        self, sort: str = "device", reverse: bool = False, now: float | None = None
    ) -> list[dict[str, Any]]:
        moment = now if now is not None else time.time()
        rows = [view.row(moment) for view in self.devices.values()]

        def key(row: dict[str, Any]) -> tuple[bool, Any]:
            value = row.get(sort)
            return (value is None, value if value is not None else 0)

        rows.sort(key=key, reverse=reverse)
        if reverse:  # keep unknown values last either way
            rows.sort(key=lambda r: r.get(sort) is None)
        return rows

    def snapshot(self) -> list[dict[str, Any]]:
        """For --json: each device's row, plus its latest info and telemetry."""
        now = time.time()
        return [
            {**view.row(now), "info": view.info, "telemetry": view.telemetry}
            for view in sorted(self.devices.values(), key=lambda v: v.device)
        ]

    def table(
        self, sort: str = "device", reverse: bool = False
    ) -> tuple[list[str], list[list[str]]]:
        """Headers and cells of the fleet table, in order; the CLI draws it."""
        rows = self.rows(sort, reverse)
        headers = [COLUMNS[k] for k in COLUMNS]
        return headers, [[_cell(row[k]) for k in COLUMNS] for row in rows]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)
