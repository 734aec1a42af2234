"""Fault scenarios against a real Mosquitto and real agents, at any size.

Each returns `Figures`: jobs sent, replies received, jobs lost (no reply although the
deadline had not passed), jobs executed twice (ran to completion more than once, over all
agents' logs), duplicate replies the sensor saw, and the time to recover (from the end of
the fault to the first reply after it). tests/test_chaos.py runs them small;
bench/chaos.py runs them large and prints the table that README.md shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
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


# ---- issue 21: clean stops, a full disk, a clock that jumps ---------------------------


def long_extract_job(job_id: str) -> dict[str, Any]:
    """An extraction that takes seconds: eight free strings of 200-256 characters."""
    fields = {
        f"part{i}": {"type": "string", "minLength": 200, "maxLength": 256, "x-grounded": False}
        for i in range(8)
    }
    return {
        "id": job_id,
        "kind": "extract",
        "text": "Tell the whole story of pump P-3, part by part.",
        "schema": {"type": "object", "properties": fields, "required": list(fields)},
    }


def _starts(agent: AgentProcess, job_id: str) -> int:
    return sum(
        1
        for e in agent.log_events()
        if e.get("event") == "job.started" and e.get("job_id") == job_id
    )


def _events(agent: AgentProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in agent.log_events() if e.get("event") == name]


def clean_stops(
    workdir: Path, stops: int = 2, grace_s: float | None = 1.0, kill_after_s: float = 15.0
) -> Figures:
    """SIGTERM `stops` times while a long job runs, each followed by a SIGKILL after
    `kill_after_s` if the agent is still up (as systemd's TimeoutStopSec), and a restart.
    A clean stop is not a crash: the job must still be answered `done` in the end, never
    `job_crashed`."""
    prefix = f"c{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(workdir=workdir / "broker").start()
    env = dict(FAST)
    if grace_s is not None:  # (None: an agent older than the setting)
        env["EDGE_AGENT_JOBS__STOP_GRACE_S"] = str(grace_s)
    agent = start_agent_process(broker.url, prefix, workdir / "agent", env=env)
    sensor = Sensor("127.0.0.1", broker.port, prefix, retry_after_s=120)
    long_id = "s-long"
    try:
        device = f"{prefix}/devices/{agent.device_id}/jobs"
        sensor.send(long_extract_job(long_id), topic=f"{device}/extract")
        for i in range(3):
            sensor.send(classify_job(i, "s"), topic=f"{device}/classify")
        codes: list[int | None] = []
        for n in range(1, stops + 1):
            deadline = time.monotonic() + 90
            while _starts(agent, long_id) < n and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # well inside the job
            agent.proc.send_signal(signal.SIGTERM)
            try:
                codes.append(agent.proc.wait(kill_after_s))
            except Exception:
                agent.kill()
                codes.append(None)
            agent.restart()
        sensor.wait_all(120, retry=False)
        answer = (sensor.sent[long_id].replies or [{}])[0]
        outcome = answer.get("status"), (answer.get("error") or {}).get("code")
        died = len(_events(agent, "agent.died_while_running"))
        fig = figures(
            f"{stops} clean stops during a long job",
            sensor,
            [agent],
            None,
            f"exit codes {codes} (None: killed); the long job answered {outcome[0]}"
            f"{' / ' + str(outcome[1]) if outcome[1] else ''}; counted as deaths {died}",
        )
        fig.extra.update(codes=codes, outcome=outcome, died=died)
        return fig
    finally:
        sensor.close()
        agent.kill()
        broker.close()


class _Listener:
    """Collects the replies on a topic (those the Sensor did not send the jobs of, too)."""

    def __init__(self, port: int, topic: str) -> None:
        self.ids: list[str] = []
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on
        ready = threading.Event()
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        ready.wait(10)

    def _on(self, _c: Any, _u: Any, msg: Any) -> None:
        with contextlib.suppress(ValueError, AttributeError), self._lock:
            self.ids.append(str(json.loads(msg.payload).get("id")))

    def wait_for(self, wanted: set[str], timeout: float) -> set[str]:
        """Which of `wanted` came within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                got = wanted & set(self.ids)
            if got == wanted:
                return got
            time.sleep(0.1)
        with self._lock:
            return wanted & set(self.ids)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _health(agent: AgentProcess, port: int) -> tuple[str, list[str]]:
    health = _telemetry(agent, port).get("health") or {}
    return str(health.get("state")), list(health.get("reasons") or [])


def disk_full(workdir: Path, spooled: int = 6, jobs: int = 4, size_kib: int = 4096) -> Figures:
    """The state directory on a small tmpfs. At start it is full, and its journal holds
    `spooled` replies a previous run could not deliver: the agent keeps the journal (not
    set aside as unreadable), reports `degraded`, answers jobs, and delivers the spooled
    replies once space returns. Then the disk fills again while it runs."""
    from edge_agent.adapters.journal import Entry, Journal
    from tests.harness.tmpfs import Tmpfs

    prefix = f"c{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(workdir=workdir / "broker").start()
    disk = Tmpfs(workdir / "disk", size_kib=size_kib).__enter__()
    sensor = Sensor("127.0.0.1", broker.port, prefix, retry_after_s=60)
    listener = _Listener(broker.port, sensor.reply_topic)
    agent: AgentProcess | None = None
    try:
        state = disk.path / "state"
        state.mkdir()
        left = Journal(state / "journal.db", dedup_window_s=3600, spool_max=100)
        ids = {f"spooled-{i}" for i in range(spooled)}
        left.record_many(
            [
                Entry(None, None, job_id, "done", sensor.reply_topic,
                      json.dumps({"v": 1, "id": job_id, "status": "done"}).encode(), None, None)
                for job_id in sorted(ids)
            ]
        )  # fmt: skip
        left.close()
        disk.fill()
        agent = start_agent_process(broker.url, prefix, state, env=FAST, log_dir=workdir / "logs")
        full_health = _health(agent, broker.port)
        for i in range(jobs):
            sensor.send(classify_job(i, "full"))
        answered_full = sensor.wait_all(60, retry=False)
        early = listener.wait_for(ids, 2)  # nothing can come before space returns
        disk.free()
        freed_at = time.time()
        delivered = listener.wait_for(ids, 30)
        took = time.time() - freed_at
        aside = sorted(p.name for p in state.glob("journal.db.unreadable-*"))
        disk.fill()  # and full again while it runs
        for i in range(jobs):
            sensor.send(classify_job(i, "again"))
        answered_again = sensor.wait_all(60, retry=False)
        again_health = _health(agent, broker.port)
        disk.free()
        fig = figures(
            "disk full at start, then while running",
            sensor,
            [agent],
            None,
            f"journal set aside {len(aside)}; health while full {full_health[0]}; jobs "
            f"answered while full {answered_full and answered_again}; spooled replies "
            f"delivered {len(delivered)} of {spooled} ({len(early)} before space returned), "
            f"{took:.1f} s after",
        )
        fig.extra.update(
            aside=aside, full_health=full_health, again_health=again_health,
            delivered=len(delivered), early=len(early),
            answered=answered_full and answered_again,
        )  # fmt: skip
        return fig
    finally:
        listener.close()
        sensor.close()
        if agent is not None:
            agent.kill()
        broker.close()
        disk.__exit__(None, None, None)


def clock_jumps(workdir: Path, jobs: int = 6, forward_s: float = 2 * 86400) -> Figures:
    """The agent's wall clock steps forward by `forward_s` (more than the dedup window)
    while jobs with a `ttl_ms` wait, and then back by twice that, as NTP steps a Pi that
    booted without a real-time clock (tests/harness/clockstep.c). Nothing may expire in
    bulk, no `queue_ms` may jump, a retry of a job already answered must not run it again,
    and telemetry must keep flowing."""
    from tests.harness.clockstep import ClockStep

    prefix = f"c{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(workdir=workdir / "broker").start()
    clock = ClockStep(workdir / "clock-offset")
    agent = start_agent_process(broker.url, prefix, workdir / "agent", env={**FAST, **clock.env()})
    sensor = Sensor("127.0.0.1", broker.port, prefix, retry_after_s=120)
    telemetry: list[tuple[float, dict[str, Any]]] = []
    watcher = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    watcher.on_message = lambda _c, _u, msg: telemetry.append(
        (time.monotonic(), json.loads(msg.payload))
    )
    watcher.connect("127.0.0.1", broker.port)
    watcher.loop_start()
    watcher.subscribe(f"{prefix}/devices/{agent.device_id}/telemetry", qos=0)
    try:
        device = f"{prefix}/devices/{agent.device_id}/jobs"
        first = classify_job(0, "t")
        sensor.send(first, topic=f"{device}/classify")
        sensor.wait_all(60, retry=False)
        for i in range(1, jobs + 1):  # a queue, each with a minute to live
            sensor.send({**classify_job(i, "t"), "ttl_ms": 60_000}, topic=f"{device}/classify")
        clock.step(forward_s)
        sensor.wait_all(90, retry=False)
        sensor.send(first, topic=f"{device}/classify")  # a retry of a job answered before
        time.sleep(2.0)
        clock.step(-2 * forward_s)
        stepped_back = time.monotonic()
        for i in range(jobs + 1, 2 * jobs + 1):
            sensor.send({**classify_job(i, "t"), "ttl_ms": 60_000}, topic=f"{device}/classify")
        sensor.wait_all(90, retry=False)
        time.sleep(3.5)
        after = [m for at, m in telemetry if at > stepped_back]
        statuses = Counter(r.get("status") for s in sensor.sent.values() for r in s.replies)
        queue_ms = [
            float((r.get("timings") or {}).get("queue_ms") or 0.0)
            for s in sensor.sent.values()
            for r in s.replies
        ]
        runs_first = completions([agent]).get(first["id"], 0)
        steps = (after[-1].get("counters") or {}).get("clock_steps", 0) if after else 0
        fig = figures(
            f"clock stepped +{forward_s / 3600:g} h, then -{2 * forward_s / 3600:g} h",
            sensor,
            [agent],
            None,
            f"replies {dict(statuses)}; queue_ms max {max(queue_ms):.0f}; the retried job "
            f"ran {runs_first} time(s); telemetry after the backward step {len(after)}; "
            f"clock steps counted {steps}",
        )
        fig.extra.update(
            statuses=dict(statuses), queue_ms_max=max(queue_ms), runs_first=runs_first,
            telemetry_after=len(after), clock_steps=steps,
            health=[(m.get("health") or {}).get("state") for m in after],
        )  # fmt: skip
        return fig
    finally:
        watcher.disconnect()
        watcher.loop_stop()
        sensor.close()
        agent.kill()
        broker.close()
