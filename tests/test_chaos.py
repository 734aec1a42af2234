"""Fault tests against a real Mosquitto: short versions of bench/chaos.py's scenarios.

Each prints its figures (run with -s to see them) and asserts the two that must always
hold: no job lost whose deadline had not passed, and no job executed twice.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest

from bench import fuzz, scenarios
from bench.harness import HEADER, Figures, start_agent_process
from edge_agent.broker import LocalBroker

pytestmark = [pytest.mark.chaos, pytest.mark.model]


def check(fig: Figures) -> None:
    print(f"\n{HEADER}\n{fig.row()}")
    assert fig.sent > 0
    assert fig.lost == 0, fig
    assert fig.executed_twice == 0, fig
    assert fig.replies == fig.sent, fig


def test_broker_killed_and_restarted_twice(tmp_path: Path) -> None:
    fig = scenarios.broker_restarts(tmp_path, jobs=24, kills=2)
    check(fig)
    assert fig.recover_s is not None


def test_agent_killed_mid_job_and_restarted(tmp_path: Path) -> None:
    fig = scenarios.agent_crash(tmp_path, jobs=10)
    check(fig)
    assert "killed while running" in fig.notes


def test_network_black_holed_longer_than_keepalive(tmp_path: Path) -> None:
    fig = scenarios.network_blackhole(tmp_path, jobs=12, keepalive_s=5, hole_s=10)
    check(fig)
    assert "1 reconnects" in fig.notes or "2 reconnects" in fig.notes


def test_slow_member_of_a_shared_subscription_does_not_hoard(tmp_path: Path) -> None:
    fig, per_agent, _latency = scenarios.shared_with_slow_member(tmp_path, jobs=18, handoff=True)
    check(fig)
    slow = per_agent["member0"]
    assert slow < 18 / 3, per_agent  # round-robin alone would give it a third
    assert "handed back 0;" not in fig.notes


def test_fuzzed_payloads_are_all_answered_and_memory_stays_flat(
    broker: LocalBroker, tmp_path: Path
) -> None:
    agent = start_agent_process(
        broker.url, f"fz{uuid.uuid4().hex[:6]}", tmp_path / "fz", log_level="info"
    )
    try:
        result = fuzz.run(
            agent, broker.port, count=1500, seed=random.randrange(1 << 30), warmup=300
        )
    finally:
        agent.kill()
    print("\n" + result.table())
    assert result.alive
    assert result.missing == []
    assert result.answered == result.sent
    assert result.statuses["rejected"] > result.sent * 0.9
    assert result.rss_end - result.rss_warm < 16 * 2**20
