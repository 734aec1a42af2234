"""Fault tests against a real Mosquitto: short versions of bench/chaos.py's scenarios.

Each prints its figures (run with -s to see them) and asserts the two that must always
hold: no job lost whose deadline had not passed, and no job executed twice.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from edge_agent.adapters.broker import LocalBroker
from tests.harness import fuzz, scenarios, slowfs, tmpfs
from tests.harness.clients import NotifySocket
from tests.harness.process import (
    HEADER,
    Figures,
    Sensor,
    classify_job,
    start_agent_process,
    wait_for_log,
)

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


def test_the_protocol_fuzzer_finds_no_message_that_stops_a_board(tmp_path: Path) -> None:
    """A short campaign of tests/harness/fuzz.py (bench/fuzz.py runs the long one): hostile values in every job field and MQTT
    property, MQTT 5 and 3.1.1, device and fleet topics, cancels and control topics,
    against one MQTT 5 and one MQTT 3.1.1 agent. The seed is fixed and printed;
    EDGE_AGENT_FUZZ_SEED=random (or a number) runs another one."""
    wanted = os.environ.get("EDGE_AGENT_FUZZ_SEED", "20261202")
    seed = random.randrange(1 << 31) if wanted == "random" else int(wanted)
    print(f"\nfuzz seed {seed} (EDGE_AGENT_FUZZ_SEED={seed} runs it again)")
    result = fuzz.campaign(tmp_path, count=150, seed_value=seed, show=False)
    print(result.table())
    print("replies by code: " + ", ".join(f"{k} {v}" for k, v in result.codes.most_common()))
    assert result.problems == []
    assert result.jobs > 100 and result.control > 20, "the campaign must reach the agents"
    assert result.statuses["done"] > 10 and result.statuses["rejected"] > 50
    assert result.codes["internal_error"] == 0
    assert result.health == {"5": "ok", "3.1.1": "ok"}
    assert result.probes == 2


@pytest.mark.skipif(slowfs.why_unavailable() is not None, reason=str(slowfs.why_unavailable()))
def test_a_disk_whose_fsync_takes_a_second_slows_no_reply_and_no_keepalive(
    tmp_path: Path,
) -> None:
    fig = scenarios.slow_fsync(tmp_path, jobs=16, fsync_ms=1000, interval=0.25, keepalive_s=5)
    check(fig)
    assert fig.extra["lapses"] == 0
    assert fig.extra["health"] == "ok"
    # Acknowledgements wait for the broker's PUBACK of the reply, never for an fsync: a job's
    # PUBACK follows its reply by a loopback round trip, not by a second. (The reply time
    # itself includes queueing, which on a loaded 2-core CI machine can near a second.)
    puback, reply = fig.extra["puback_ms_p50"], fig.extra["latency_ms_p50"]
    assert puback is not None and reply is not None
    assert puback - reply < 500, (puback, reply)


def test_an_inference_thread_that_dies_turns_health_degraded_and_stops_the_watchdog(
    broker: LocalBroker, prefix: str, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """Under systemd (here: a notify socket the test owns) the agent stays up, says
    `degraded` with the reason, and withholds the watchdog; after the restart systemd would
    do, the queued jobs are answered and the job that killed the thread runs."""
    env = {
        "EDGE_AGENT_FAULT": "inference-die:die-0",
        "EDGE_AGENT_MQTT__RECEIVE_MAXIMUM": "8",
        # one job at a time: the marker then names die-0 alone (with several running,
        # none is counted and each runs alone after the restart: test_poison)
        "EDGE_AGENT_JOBS__PARALLEL": "1",
        "NOTIFY_SOCKET": notify_socket.path,
        "WATCHDOG_USEC": "1000000",
    }
    agent = start_agent_process(broker.url, prefix, tmp_path / "state", env=env)
    sensor = Sensor("127.0.0.1", broker.port, prefix, retry_after_s=120)
    try:
        topic = f"{prefix}/devices/{agent.device_id}/jobs/classify"
        for i in range(4):
            sensor.send(classify_job(i, "die"), topic=topic)
        changed = wait_for_log(agent, "health.changed", 30)
        assert changed["state"] == "degraded"
        assert "inference thread died" in changed["reasons"][0]
        degraded_at = time.monotonic()
        time.sleep(1.5)  # a watchdog period and a half
        assert notify_socket.count("WATCHDOG", since=degraded_at + 0.1) == 0
        assert agent.alive(), "under a watchdog the agent waits to be restarted"
        assert not any(s.replies for s in sensor.sent.values())  # queued, never acked
        agent.env.pop("EDGE_AGENT_FAULT")
        agent.proc.send_signal(signal.SIGABRT)  # what systemd does when the watchdog fires
        agent.restart()
        assert sensor.wait_all(60, retry=False)
        assert {s.replies[0]["status"] for s in sensor.sent.values()} == {"done"}
        died = wait_for_log(agent, "agent.died_while_running", 5)
        assert (died["job_id"], died["times"], died["poison"]) == ("die-0", 1, False)
    finally:
        sensor.close()
        agent.kill()


def test_outside_systemd_a_degraded_agent_exits_70_and_a_restart_answers_everything(
    tmp_path: Path,
) -> None:
    fig = scenarios.inference_dies(tmp_path, jobs=4, exit_after_s=1.0)
    check(fig)
    assert fig.extra["exit_code"] == 70
    assert fig.extra["degraded"]["state"] == "degraded"


def test_two_clean_stops_during_a_long_job_leave_it_answered_done(tmp_path: Path) -> None:
    """A stop that ends a running job is not a crash (issue 21): on 9190a94 two stops, each
    killed after its timeout as systemd would, made the job poison (`job_crashed`)."""
    fig = scenarios.clean_stops(tmp_path, stops=2, grace_s=1.0, kill_after_s=15.0)
    check(fig)
    assert fig.extra["codes"] == [0, 0]  # both ended by themselves, in the grace
    assert fig.extra["outcome"] == ("done", None)
    assert fig.extra["died"] == 0


@pytest.mark.skipif(tmpfs.why_unavailable() is not None, reason=str(tmpfs.why_unavailable()))
def test_a_full_disk_keeps_the_journal_and_delivers_its_replies_when_space_returns(
    tmp_path: Path,
) -> None:
    """On 9190a94 the full disk's "disk I/O error" set the healthy journal aside as
    unreadable, and the agent could not start until space returned; its spooled replies
    were never delivered."""
    fig = scenarios.disk_full(tmp_path, spooled=6, jobs=4)
    check(fig)
    assert fig.extra["aside"] == []
    assert fig.extra["full_health"][0] == "degraded"
    assert "journal cannot be written" in " ".join(fig.extra["full_health"][1])
    assert fig.extra["answered"]
    assert (fig.extra["delivered"], fig.extra["early"]) == (6, 0)


def test_a_clock_stepped_forward_and_back_expires_nothing_and_runs_nothing_twice(
    tmp_path: Path,
) -> None:
    """On 9190a94 a forward step expired every queued job with a ttl_ms at once and a retry
    ran an answered job again (dedup by wall-clock age)."""
    fig = scenarios.clock_jumps(tmp_path, jobs=6)
    check(fig)
    assert fig.extra["statuses"] == {
        "done": 13
    }  # 1 + 6 + 6 jobs, the retry answered from the journal
    assert fig.extra["runs_first"] == 1
    assert fig.extra["queue_ms_max"] < 60_000
    assert fig.extra["telemetry_after"] >= 2 and set(fig.extra["health"]) == {"ok"}
    assert fig.extra["clock_steps"] == 2
