"""FleetState: folding status, info and telemetry into rows, sorting, rendering."""

from __future__ import annotations

import json

from edge_agent.cli.console import render_table
from edge_agent.core.fleet import FleetState


def feed(
    state: FleetState, device: str, tps: float | None, status: str = "online", now: float = 100.0
) -> None:
    state.update(f"edge/devices/{device}/status", status.encode(), now)
    state.update(
        f"edge/devices/{device}/info",
        json.dumps({"model": {"name": "m", "quant": "Q4"}, "board": {"model": "Pi 5"}}).encode(),
        now,
    )
    state.update(
        f"edge/devices/{device}/telemetry",
        json.dumps(
            {
                "tokens_per_second_avg": tps,
                "queue_depth": 1,
                "latency_ms_p95": 90.0,
                "soc_temperature_c": 55.5,
            }
        ).encode(),
        now,
    )


def test_rows_and_sorting() -> None:
    state = FleetState("edge")
    feed(state, "b", 10.0)
    feed(state, "a", 30.0)
    feed(state, "c", None, status="offline")
    assert [r["device"] for r in state.rows("device", now=101)] == ["a", "b", "c"]
    assert [r["device"] for r in state.rows("tps", reverse=True, now=101)] == [
        "a",
        "b",
        "c",
    ]  # unknown last
    row = state.rows("device", now=103)[0]
    assert row == {
        "device": "a",
        "status": "online",
        "board": "Pi 5",
        "model": "m",
        "quant": "Q4",
        "tps": 30.0,
        "queue": 1,
        "p95": 90.0,
        "temp": 55.5,
        "seen": 3.0,
    }
    text = render_table(*state.table("device"))
    assert "SoC °C" in text.splitlines()[0] and "offline" in text


def test_foreign_and_broken_messages_are_ignored() -> None:
    state = FleetState("edge")
    assert not state.update("other/devices/x/status", b"online")
    assert not state.update("edge/devices/x/results", b"{}")
    assert not state.update("edge/devices/x/telemetry", b"not json")
    state.update("edge/devices/x/status", b"online")
    assert state.update("edge/devices/x/status", b"")  # a cleared retained status: gone
    assert state.devices == {}


def test_a_degraded_device_shows_it_beside_its_status() -> None:
    state = FleetState("edge")
    feed(state, "a", 10.0)
    state.update(
        "edge/devices/a/telemetry",
        json.dumps(
            {"health": {"state": "degraded", "reasons": ["inference thread died"]}}
        ).encode(),
        101.0,
    )
    assert state.rows(now=102)[0]["status"] == "online, degraded"
    feed(state, "a", 10.0, status="offline", now=103)  # health only qualifies "online"
    assert state.rows(now=104)[0]["status"] == "offline"


def test_a_drained_board_says_so_in_its_status() -> None:
    state = FleetState("edge")
    feed(state, "a", 10.0)
    state.update("edge/devices/a/telemetry", json.dumps({"mode": "drained"}).encode(), 100.0)
    feed(state, "b", 10.0)
    state.update("edge/devices/b/telemetry", json.dumps({"mode": "serving"}).encode(), 100.0)
    rows = {r["device"]: r["status"] for r in state.rows("device", now=101)}
    assert rows == {"a": "online, drained", "b": "online"}
    state.update("edge/devices/a/status", b"offline", 102.0)
    assert state.rows("device", now=103)[0]["status"] == "offline"  # gone: not "drained"
