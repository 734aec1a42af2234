"""`edge-agent ops` as an operator runs it, for the operations tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from edge_agent.adapters.broker import LocalBroker


def ops_start(broker: LocalBroker, prefix: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "EDGE_AGENT_MQTT__TOPIC_PREFIX": prefix,
           "EDGE_AGENT_MQTT__USERNAME": "op-tester"}  # fmt: skip
    cmd = [sys.executable, "-m", "edge_agent", "ops", *args, "--broker", broker.url, "--json"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def ops_cli(
    broker: LocalBroker, prefix: str, *args: str, timeout: float = 180
) -> tuple[int, dict[str, Any]]:
    """`edge-agent ops ... --json`: its exit status and its JSON."""
    proc = ops_start(broker, prefix, *args)
    out, err = proc.communicate(timeout=timeout)
    try:
        return proc.returncode, json.loads(out)
    except ValueError:
        raise AssertionError(
            f"ops printed no JSON (exit {proc.returncode}): {out}\n{err}"
        ) from None


def by_device(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["device"]: row for row in result["devices"]}
