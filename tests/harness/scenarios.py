"""Fault scenarios against a real Mosquitto and real agents, at any size.

Each returns `Figures`: jobs sent, replies received, jobs lost (no reply although the
deadline had not passed), jobs executed twice (ran to completion more than once, over all
agents' logs), duplicate replies the sensor saw, and the time to recover (from the end of
the fault to the first reply after it). tests/test_chaos.py runs them small;
bench/chaos.py runs them large and prints the table that README.md shows.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from edge_agent.adapters.broker import LocalBroker
from tests.harness.process import (
    AgentProcess,
    Figures,
    Proxy,
    Sensor,
    classify_job,
    completions,
    figures,
    start_agent_process,
)
from tests.harness.slowfs import SlowFs

FAST = {"EDGE_AGENT_MQTT__RECONNECT_MIN_S": "0.2", "EDGE_AGENT_MQTT__RECONNECT_MAX_S": "1"}


def _stream(
    sensor: Sensor, tag: str, count: int, interval: float, stop: threading.Event | None = None
) -> None:
    for i in range(count):
        if stop is not None and stop.is_set():
            return
        sensor.send(classify_job(i, tag))
        time.sleep(interval)


def broker_restarts(
    workdir: Path, jobs: int = 40, kills: int = 2, interval: float = 0.15
) -> Figures:
    """The broker is SIGKILLed and restarted `kills` times while jobs stream in."""
    prefix = f"c{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(workdir=workdir / "broker").start()
    agent = start_agent_process(broker.url, prefix, workdir / "agent", env=FAST)
    sensor = Sensor("127.0.0.1", broker.port, prefix, retry_after_s=6)
    try:
        feeder = threading.Thread(target=_stream, args=(sensor, "b", jobs, interval))
        feeder.start()
        last_restart = None
        for _ in range(kills):
            time.sleep(jobs * interval / (kills + 1))
            broker.kill()
            time.sleep(1.0)
            broker.start()
            last_restart = time.time()
        feeder.join()
        sensor.wait_all(90)
        return figures(
            f"broker SIGKILL + restart x{kills}",
            sensor,
            [agent],
            last_restart,
            f"{_reconnects(agent)} reconnects, {_spooled(agent)} replies from the spool",
        )
    finally:
        sensor.close()
        agent.kill()
        broker.close()


def _spooled(agent: AgentProcess) -> int:
    return sum(
        int(e.get("replies", 0)) for e in agent.log_events() if e.get("event") == "spool.flushed"
    )


def _reconnects(agent: AgentProcess) -> int:
    return max(0, sum(1 for e in agent.log_events() if e.get("event") == "mqtt.connected") - 1)


def agent_crash(workdir: Path, jobs: int = 12) -> Figures:
    """The agent is SIGKILLed while it runs a job, and started again."""
    prefix = f"c{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(workdir=workdir / "broker").start()
    agent = start_agent_process(broker.url, prefix, workdir / "agent", env=FAST)
    sensor = Sensor("127.0.0.1", broker.port, prefix, retry_after_s=15)
    try:
        for i in range(jobs):
            job = classify_job(i, "k")
            if i == jobs // 2:  # a slow one, to be killed during
                job = {
                    "id": f"k-{i}",
                    "kind": "extract",
                    "text": "Tell the whole story of the pump.",
                    "schema": {
                        "type": "object",
                        "properties": {"story": {"type": "string", "maxLength": 256}},
                    },
                }
            sensor.send(job, topic=f"{prefix}/jobs/{job['kind']}")
        # kill while the slow extraction runs
        slow_id = f"k-{jobs // 2}"
        _wait_started(agent, slow_id, 60)
        time.sleep(0.1)
        killed_running = slow_id if slow_id not in completions([agent]) else None
        agent.kill()
        time.sleep(1.0)
        restart_at = time.time()
        agent.restart()
        sensor.wait_all(90)
        return figures(
            "agent SIGKILL mid-job + restart",
            sensor,
            [agent],
            restart_at,
            f"killed while running {killed_running}"
            if killed_running
            else "job finished before the kill",
        )
    finally:
        sensor.close()
        agent.kill()
        broker.close()


def _wait_started(agent: AgentProcess, job_id: str, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if any(
            e.get("event") == "job.started" and e.get("job_id") == job_id
            for e in agent.log_events()
        ):
            return
        time.sleep(0.01)
    raise AssertionError(f"{job_id} never started")


def network_blackhole(
    workdir: Path, jobs: int = 20, keepalive_s: int = 5, hole_s: float = 12.0
) -> Figures:
    """A TCP proxy between agent and broker stops forwarding for longer than the keepalive."""
    prefix = f"c{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(workdir=workdir / "broker").start()
    proxy = Proxy(broker.port)
    env = {**FAST, "EDGE_AGENT_MQTT__KEEPALIVE_S": str(keepalive_s)}
    agent = start_agent_process(
        f"mqtt://127.0.0.1:{proxy.port}", prefix, workdir / "agent", env=env
    )
    sensor = Sensor("127.0.0.1", broker.port, prefix, retry_after_s=30)
    try:
        half = jobs // 2
        for i in range(half):
            sensor.send(classify_job(i, "n"))
        time.sleep(0.3)  # some answered, one probably running when the hole opens
        proxy.blackhole()
        for i in range(half, jobs):
            sensor.send(classify_job(i, "n"))
            time.sleep(hole_s / max(1, jobs - half))
        time.sleep(max(0.0, hole_s - (jobs - half) * hole_s / max(1, jobs - half)))
        proxy.heal()
        healed_at = time.time()
        sensor.wait_all(90, retry=False)
        sensor.wait_all(30)
        return figures(
            f"network black-holed {hole_s:.0f} s (keepalive {keepalive_s} s)",
            sensor,
            [agent],
            healed_at,
            f"{_reconnects(agent)} reconnects, {_spooled(agent)} replies from the spool",
        )
    finally:
        sensor.close()
        agent.kill()
        proxy.close()
        broker.close()


class Throttle:
    """Slows a process down for real: SIGSTOP for `stopped` s, SIGCONT for `running` s."""

    def __init__(self, pid: int, stopped: float = 0.4, running: float = 0.1) -> None:
        self.pid, self.stopped, self.running = pid, stopped, running
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="throttle", daemon=True)

    def __enter__(self) -> Throttle:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._halt.set()
        self._thread.join()
        os.kill(self.pid, signal.SIGCONT)

    def _loop(self) -> None:
        while not self._halt.is_set():
            os.kill(self.pid, signal.SIGSTOP)
            self._halt.wait(self.stopped)
            os.kill(self.pid, signal.SIGCONT)
            self._halt.wait(self.running)


def shared_with_slow_member(
    workdir: Path, jobs: int = 30, handoff: bool = True, interval: float = 0.25
) -> tuple[Figures, dict[str, int], dict[str, float]]:
    """Three agents share the fleet topic; one is slowed to a fifth of its speed.

    Jobs arrive slower than the two healthy members could serve them, so any wait is the
    slow member hoarding. Returns the figures, the jobs each member ran, and the reply
    latency (p50, p95, max in seconds, from the first publish of a job to its reply).
    """
    prefix = f"c{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(workdir=workdir / "broker").start()
    env = {
        **FAST,
        "EDGE_AGENT_JOBS__HANDOFF": "true" if handoff else "false",
        "EDGE_AGENT_MODEL__N_THREADS": "1",  # three agents on this machine's two cores
        "EDGE_AGENT_MODEL__N_THREADS_BATCH": "1",
    }
    agents = [
        start_agent_process(
            broker.url, prefix, workdir / f"agent{i}", device_id=f"member{i}", env=env
        )
        for i in range(3)
    ]
    sensor = Sensor("127.0.0.1", broker.port, prefix, retry_after_s=120)
    try:
        # Warm agents, as in a running fleet: each builds its prompt prefix and label
        # calibration on a job of its own, not on the first fleet jobs (while all three
        # are at it, the first jobs bounce between them and land by hop count).
        warm = Sensor("127.0.0.1", broker.port, prefix, retry_after_s=120)
        for i, agent in enumerate(agents):
            topic = f"{prefix}/devices/{agent.device_id}/jobs/classify"
            warm.send(classify_job(i, "warm"), topic=topic)
        warm.wait_all(120, retry=False)
        warm.close()
        with Throttle(agents[0].proc.pid):
            _stream(sensor, "s", jobs, interval)
            sensor.wait_all(180, retry=False)
        per_agent = {
            a.device_id: sum(n for i, n in completions([a]).items() if i.startswith("s-"))
            for a in agents
        }
        handed = sum(
            1 for a in agents for e in a.log_events() if e.get("event") == "job.handed_back"
        )
        waits = sorted(
            (s.first_reply_at - s.first_sent) for s in sensor.sent.values() if s.first_reply_at
        )
        latency = {
            "p50": waits[len(waits) // 2] if waits else 0.0,
            "p95": waits[min(len(waits) - 1, int(len(waits) * 0.95))] if waits else 0.0,
            "max": waits[-1] if waits else 0.0,
        }
        label = "3 agents, 1 slowed 5x, hand-back " + ("on" if handoff else "off")
        runs = "/".join(str(v) for v in per_agent.values())
        notes = (
            f"jobs run (slow/ok/ok) {runs}; handed back {handed}; reply latency "
            f"p50 {latency['p50']:.1f} s, p95 {latency['p95']:.1f} s, max {latency['max']:.1f} s"
        )
        return figures(label, sensor, agents, None, notes), per_agent, latency
    finally:
        sensor.close()
        for agent in agents:
            agent.kill()
        broker.close()


def _telemetry(agent: AgentProcess, port: int, timeout: float = 10) -> dict[str, Any]:
    """The agent's next telemetry message."""
    got: list[dict[str, Any]] = []
    done = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)

    def on(_c: Any, _u: Any, msg: Any) -> None:
        got.append(json.loads(msg.payload))
        done.set()

    client.on_message = on
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(f"{agent.prefix}/devices/{agent.device_id}/telemetry", qos=0)
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    return got[0] if got else {}


def slow_fsync(
    workdir: Path,
    jobs: int = 40,
    fsync_ms: int = 1000,
    interval: float = 0.25,
    keepalive_s: int = 5,
) -> Figures:
    """The agent's state directory (its job journal) on storage where every fsync takes
    `fsync_ms` (tests/harness/slowfs.c, a FUSE filesystem), while jobs stream in. Replies must all
    come, acknowledgements keep flowing, and the MQTT keepalive never lapses."""
    prefix = f"c{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(workdir=workdir / "broker").start()
    disk = SlowFs(workdir / "backing", workdir / "slow", fsync_ms=fsync_ms)
    state = disk.__enter__()
    env = {**FAST, "EDGE_AGENT_MQTT__KEEPALIVE_S": str(keepalive_s)}
    agent = start_agent_process(broker.url, prefix, state / "agent", env=env)
    sensor = Sensor("127.0.0.1", broker.port, prefix, retry_after_s=30)
    try:
        started = time.time()
        _stream(sensor, "f", jobs, interval)
        sensor.wait_all(120)
        took = time.time() - started
        telemetry = _telemetry(agent, broker.port)
        lapses = sum(1 for e in agent.log_events() if e.get("event") == "mqtt.disconnected")
        broker_log = (workdir / "broker" / "mosquitto.log").read_text(errors="replace")
        lapses += broker_log.count("exceeded timeout")
        fig = figures(
            f"journal fsync {fsync_ms / 1000:g} s (FUSE)",
            sensor,
            [agent],
            None,
            f"{jobs / took:.1f} jobs/s offered {1 / interval:.1f}; reply p50 "
            f"{telemetry.get('latency_ms_p50')} ms; PUBACK p50 "
            f"{telemetry.get('puback_ms_p50')} ms, p99 {telemetry.get('puback_ms_p99')} ms; "
            f"keepalive {keepalive_s} s lapses {lapses}",
        )
        fig.extra.update(
            lapses=lapses,
            latency_ms_p50=telemetry.get("latency_ms_p50"),
            puback_ms_p50=telemetry.get("puback_ms_p50"),
            puback_ms_p99=telemetry.get("puback_ms_p99"),
            health=(telemetry.get("health") or {}).get("state"),
        )
        return fig
    finally:
        sensor.close()
        agent.kill()
        broker.close()
        disk.__exit__(None, None, None)


def inference_dies(workdir: Path, jobs: int = 6, exit_after_s: float = 2.0) -> Figures:
    """The inference thread dies on a job (the test-only fault hook) with more jobs queued
    behind it. Outside systemd, the agent must turn degraded and exit with status 70; its
    supervisor (here: this scenario) starts it again, and every job is answered."""
    prefix = f"c{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(workdir=workdir / "broker").start()
    killer = "d-0"
    env = {
        **FAST,
        "EDGE_AGENT_FAULT": f"inference-die:{killer}",
        "EDGE_AGENT_HEALTH__EXIT_AFTER_S": str(exit_after_s),
        "EDGE_AGENT_MQTT__RECEIVE_MAXIMUM": str(jobs + 2),
    }
    agent = start_agent_process(broker.url, prefix, workdir / "agent", env=env)
    sensor = Sensor("127.0.0.1", broker.port, prefix, retry_after_s=60)
    try:
        device_topic = f"{prefix}/devices/{agent.device_id}/jobs/classify"
        for i in range(jobs):
            sensor.send(classify_job(i, "d"), topic=device_topic)
        died_at = time.time()
        code = agent.proc.wait(60)
        exited_after = time.time() - died_at
        degraded = [e for e in agent.log_events() if e.get("event") == "health.changed"]
        restart_at = time.time()
        agent.env.pop("EDGE_AGENT_FAULT")
        agent.restart()
        sensor.wait_all(90, retry=False)
        fig = figures(
            "inference thread dies + restart",
            sensor,
            [agent],
            restart_at,
            f"exit status {code} after {exited_after:.1f} s; health "
            f"{degraded[0].get('state') if degraded else 'never degraded'} "
            f"({'; '.join(degraded[0].get('reasons', [])) if degraded else '-'}); "
            f"answered after restart {sum(1 for s in sensor.sent.values() if s.replies)}",
        )
        fig.extra.update(exit_code=code, degraded=degraded[0] if degraded else None)
        return fig
    finally:
        sensor.close()
        agent.kill()
        broker.close()
