"""Logging: JSON lines, and journald priorities when the output is the journal."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from edge_agent.adapters import log
from edge_agent.adapters.broker import LocalBroker
from edge_agent.service.loader import library_problem


def test_lines_carry_their_journald_priority_when_stdout_is_the_journal() -> None:
    journal, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    st = os.fstat(agent_end.fileno())
    stream = agent_end.makefile("w", buffering=1)
    log.configure("debug", "json", stream, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    logger = structlog.get_logger("t")
    logger.debug("a.debug")
    logger.info("a.info", x=1)
    logger.warning("a.warning")
    logger.error("a.error")
    logger.critical("a.critical")
    logger.warning("operation.successful", id="o1", notice=True)  # the audit trail
    stream.flush()
    agent_end.shutdown(socket.SHUT_WR)
    lines = journal.makefile("r").read().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>", "<5>"]
    assert json.loads(lines[5][3:])["level"] == "notice"
    assert json.loads(lines[1][3:])["event"] == "a.info"
    journal.close()
    agent_end.close()


def test_no_prefix_when_the_journal_stream_is_another_one() -> None:
    out = io.StringIO()
    log.configure("info", "json", out, env={"JOURNAL_STREAM": "1:2"})
    structlog.get_logger("t").warning("a.warning")
    assert json.loads(out.getvalue())["event"] == "a.warning"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Failed to load shared library '/x/libllama.so': libgomp.so.1: cannot open "
            "shared object file: No such file or directory",
            "libgomp.so.1 is missing; install the package libgomp1 (apt-get install libgomp1)",
        ),
        (
            "libstdc++.so.6: cannot open shared object file: No such file or directory",
            "libstdc++.so.6 is missing; install the package libstdc++6",
        ),
        ("libfoo.so.3: cannot open shared object file", "apt-file search libfoo.so.3"),
        ("undefined symbol: ggml_init", "cannot be loaded: undefined symbol: ggml_init"),
    ],
)
def test_a_missing_library_is_named_with_its_package(message: str, expected: str) -> None:
    assert expected in library_problem(message)


@pytest.mark.model
def test_the_agent_under_the_journal_logs_priorities_and_no_warning_on_a_clean_stop(
    broker: LocalBroker, prefix: str, tmp_path: Path
) -> None:
    """stdout is a file whose device:inode is in $JOURNAL_STREAM, as journald's socket
    would be: every line has its priority, and a clean stop writes nothing above info."""
    out = tmp_path / "journal.log"
    with out.open("wb") as sink:
        st = os.fstat(sink.fileno())
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "edge_agent", "run", "--broker", broker.url),
                *("--device-id", "jr-1", "--state-dir", str(tmp_path / "state")),
                *("--log-format", "json"),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
                "EDGE_AGENT_MQTT__TOPIC_PREFIX": prefix,
                "EDGE_AGENT_TELEMETRY__DISCOVERY_PREFIX": f"{prefix}-ha",
                "EDGE_AGENT_MQTT__PASSWORD": "",
                # a provoked warning: an unknown fault kind is ignored with a warning
                "EDGE_AGENT_FAULT": "no-such-fault:x",
            },
        )
        try:
            deadline = time.monotonic() + 60
            while b'"mqtt.connected"' not in out.read_bytes():
                assert proc.poll() is None, out.read_text()
                assert time.monotonic() < deadline, out.read_text()
                time.sleep(0.05)
            started_stop = len(out.read_bytes().splitlines())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    lines = out.read_text().splitlines()
    assert all(line[:1] == "<" and line[2:4] == ">{" for line in lines), lines[:3]
    events = {json.loads(line[3:])["event"]: int(line[1]) for line in lines}
    assert events["agent.started"] == 6
    assert events["faults.ignored"] == 4
    after_stop = [line for line in lines[started_stop:] if int(line[1]) <= 4]
    assert after_stop == [], after_stop
