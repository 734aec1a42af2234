"""systemd integration: the notify protocol over a socket the test owns, the watchdog's
progress rule, and the unit file checked by systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.systemd import Notifier, Watchdog
from edge_agent.core.metrics import Metrics
from edge_agent.core.protocol import Delivery, JobLimits, parse_job
from edge_agent.service.health import Health
from edge_agent.service.runner import JobRunner
from edge_agent.service.worker import Worker
from tests.harness.clients import NotifySocket
from tests.harness.fakes import MODEL, TOPICS, FakeEngine, RecordingOutbox
from tests.harness.process import start_agent_process, wait_for_log

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edge-agent.service"


def test_notifier_speaks_the_protocol_on_a_path_and_an_abstract_socket(
    notify_socket: NotifySocket,
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.path})
    assert notifier.ready("serving")
    assert notifier.status("busy")
    assert notifier.stopping()
    notify_socket.wait_for("STOPPING", "1", timeout=5)
    assert notify_socket.fields() == [
        {"READY": "1", "STATUS": "serving"},
        {"STATUS": "busy"},
        {"STOPPING": "1", "STATUS": "stopping"},
    ]
    notifier.close()

    abstract = NotifySocket(f"@edge-agent-test-{uuid.uuid4().hex}")
    try:
        sender = Notifier({"NOTIFY_SOCKET": abstract.path})
        assert sender.ready("up")
        sender.close()
        assert abstract.wait_for("READY", "1", timeout=5) == {"READY": "1", "STATUS": "up"}
    finally:
        abstract.close()


def test_without_systemd_every_call_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert notifier.watchdog_s is None
    watchdog = Watchdog(notifier, lambda: True)
    watchdog.start()  # no thread: nothing to ping
    watchdog.stop()
    assert watchdog.pings == 0


def test_watchdog_is_for_this_process_only(notify_socket: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "2000000"}
    assert Notifier(env).watchdog_s == 2.0
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 2.0
    assert Notifier({**env, "WATCHDOG_PID": "1"}).watchdog_s is None  # meant for another pid


def test_a_wedged_inference_stops_the_watchdog_pings(notify_socket: NotifySocket) -> None:
    release = threading.Event()
    engine = FakeEngine(wedge=release)
    health = Health()
    outbox = RecordingOutbox()
    worker = Worker(
        JobRunner(engine),
        outbox,
        Metrics(),
        topics=TOPICS,
        model=MODEL,
        max_queue=4,
        beat=health.beat("inference", stall_after_s=0.3),
    )
    worker.start()
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "200000"})
    watchdog = Watchdog(notifier, lambda: health.report().ok)
    watchdog.start()
    try:
        notify_socket.wait_count("WATCHDOG", 3, timeout=5)  # an idle agent is healthy
        job = parse_job(
            Delivery(
                "edge/jobs/classify", b'{"id":"stuck","text":"t","labels":["a"]}', time.time()
            ),
            TOPICS,
            JobLimits(),
        )
        worker.offer(job, lambda: None)
        assert engine.entered.wait(5)
        deadline = time.monotonic() + 5
        while health.report().ok:  # until the beat is older than the 0.3 s stall limit
            assert time.monotonic() < deadline, "a wedged job never turned health degraded"
            time.sleep(0.02)
        report = health.report()
        assert "inference thread stalled" in report.reasons[0]
        wedged = time.monotonic()
        time.sleep(0.6)  # three ping periods: an absence can only be seen by waiting
        assert notify_socket.count("WATCHDOG", since=wedged) == 0, "pinged while wedged"
        release.set()
        outbox_wait(outbox, 1)
        resumed = time.monotonic()
        notify_socket.wait_count("WATCHDOG", 2, since=resumed, timeout=5)  # pings resume
        assert health.report().ok
    finally:
        release.set()
        watchdog.stop()
        notifier.close()
        worker.stop(2)


def outbox_wait(outbox: RecordingOutbox, n: int, timeout: float = 10) -> None:
    with outbox.cond:
        assert outbox.cond.wait_for(lambda: len(outbox.replies) >= n, timeout)


def test_the_agent_tells_systemd_what_it_is_doing(
    broker: LocalBroker, prefix: str, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """READY=1 only after the model is loaded and the broker answered; STATUS lines along the
    way; watchdog pings while idle; STOPPING=1 on SIGTERM."""
    agent = start_agent_process(
        broker.url,
        prefix,
        tmp_path / "state",
        env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000"},
        wait_online=False,
    )
    try:
        ready = notify_socket.wait_for("READY", "1", timeout=90)
        assert "serving smollm2" in ready["STATUS"], ready
        statuses = [f["STATUS"] for f in notify_socket.fields() if "STATUS" in f]
        loading = next(i for i, s in enumerate(statuses) if "loading the model" in s)
        connecting = next(i for i, s in enumerate(statuses) if "connecting to" in s)
        assert loading < connecting < statuses.index(ready["STATUS"])
        # READY came after the model load and the first connection, as the log tells
        assert wait_for_log(agent, "model.loaded", 1)
        assert wait_for_log(agent, "mqtt.connected", 1)
        # telemetry ticks (every second here) refresh the status with live counts
        notify_socket.wait_for("STATUS", "0 done, 0 failed, 0 queued", timeout=10)
        t = time.monotonic()
        notify_socket.wait_count("WATCHDOG", 2, since=t, timeout=2)  # every WATCHDOG_USEC / 2

        broker.restart()  # the status says so while the broker is away, and recovers
        notify_socket.wait_for("STATUS", "unreachable, reconnecting", timeout=20)
        wait_for_log(agent, "mqtt.connected", 30, count=2)

        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0
        notify_socket.wait_for("STOPPING", "1", timeout=5)
        assert [f for f in notify_socket.fields() if "READY" in f] == [ready], "READY once"
    finally:
        agent.kill()


# ---- the unit file -------------------------------------------------------------------


def installed_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's real entry point (verify checks
    that the binary exists)."""
    exe = shutil.which("edge-agent", path=str(Path(sys.executable).parent))
    assert exe, "edge-agent entry point not installed in the venv"
    text = UNIT.read_text().replace("/opt/edge-agent/current/venv/bin/edge-agent", exe)
    out = tmp_path / "edge-agent.service"
    out.write_text(text)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    unit = installed_unit(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_exposure_is_rated_2_or_lower(tmp_path: Path) -> None:
    unit = installed_unit(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_the_unit_keeps_the_promises_of_docs_deployment() -> None:
    text = UNIT.read_text()
    lines = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line}
    for key in (
        "Type", "WatchdogSec", "DynamicUser", "StateDirectory", "LoadCredential",
        "CapabilityBoundingSet", "SystemCallFilter", "MemoryHigh", "MemoryMax", "Restart",
        "StartLimitBurst", "ProtectSystem",
    ):  # fmt: skip
        assert key in lines, key
    assert "Type=notify" in text and "ProtectSystem=strict" in text
    assert re.search(r"^CapabilityBoundingSet=$", text, re.M)
    assert "LoadCredential=mqtt__password:" in text and "LoadCredential=tls_key:" in text
