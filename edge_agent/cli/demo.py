"""`edge-agent demo` (what `make run` ends with): one look at the whole product.

Starts a throwaway Mosquitto (or uses --broker), starts an agent as a child process with
the bundled model, sends sample sensor jobs the way a sensor would, prints the replies and
one telemetry message, then stops everything it started, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_agent.adapters.broker import LocalBroker, find_mosquitto, free_port, wait_for_port
from edge_agent.adapters.mqtt import Incoming, Requester
from edge_agent.core.protocol import Topics
from edge_agent.service.benchmark import READING

DEVICE = "demo-board"
SAMPLES: list[dict[str, Any]] = [
    {
        "kind": "classify",
        "text": "Boiler B-2 outlet temperature 96 C, safety valve opened twice in 10 minutes.",
        "labels": ["normal", "warning", "critical"],
    },
    {
        "kind": "classify",
        "text": "Freezer F-3 holding at -19.5 C, door closed, compressor cycling normally.",
        "labels": ["normal", "warning", "critical"],
    },
    {
        "kind": "classify",
        "text": "Failed password for invalid user admin from 203.0.113.7 port 52311 ssh2",
        "labels": ["auth_failure", "login_success", "disconnect"],
    },
    {
        "kind": "extract",
        "text": "Sensor TS-7 reports humidity 48.5 % in the server room.",
        "schema": READING,
    },
    {
        "kind": "extract",
        "text": "Accepted publickey for deploy from 10.0.4.21 port 40022 ssh2",
        "schema": {
            "type": "object",
            "properties": {
                "user": {"type": "string"},
                "ip": {"type": "string"},
                "port": {"type": "integer"},
            },
            "required": ["user", "ip", "port"],
        },
    },
    {"kind": "classify", "text": "A job with an empty label list", "labels": []},
]


def _say(text: str = "") -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _broker(url: str | None, protocol: str | None) -> Iterator[tuple[str, str]]:
    if url is not None:
        yield url, protocol or "5"
        return
    if find_mosquitto() is not None:
        broker = LocalBroker().start()
        _say(f"broker:  Mosquitto on {broker.url} (stopped at the end)")
        try:
            yield broker.url, protocol or "5"
        finally:
            broker.close()
        return
    if shutil.which("amqtt") is None:
        raise SystemExit(
            "edge-agent demo: no broker. Install Mosquitto (apt-get install mosquitto), "
            "or `pip install amqtt` for an embedded one, or pass --broker URL."
        )
    yield from _embedded_broker()


def _embedded_broker() -> Iterator[tuple[str, str]]:
    """amqtt, for machines without Mosquitto where we are not root. It speaks MQTT 3.1.1."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="edge-amqtt-"))
    conf = workdir / "amqtt.yaml"
    conf.write_text(
        f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
    )
    proc = subprocess.Popen(
        ["amqtt", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if not wait_for_port(port, 15):
            raise SystemExit("edge-agent demo: the embedded amqtt broker did not start")
        _say(f"broker:  embedded amqtt on mqtt://127.0.0.1:{port} (MQTT 3.1.1)")
        yield f"mqtt://127.0.0.1:{port}", "3.1.1"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _agent(
    url: str, protocol: str, model: str | None, state: Path
) -> Iterator[subprocess.Popen[bytes]]:
    log_path = state / "agent.log"
    cmd = [
        sys.executable,
        "-m",
        "edge_agent",
        "run",
        "--broker",
        url,
        "--protocol",
        protocol,
        "--device-id",
        DEVICE,
        "--state-dir",
        str(state),
        "--log-format",
        "json",
    ]
    if model:
        cmd += ["--model", model]
    env = {
        **os.environ,
        "EDGE_AGENT_TELEMETRY__INTERVAL_S": "2",
        # Answers less sure than this come back marked uncertain (docs/protocol.md).
        "EDGE_AGENT_JOBS__MIN_CONFIDENCE": "0.7",
    }
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def run_demo(broker: str | None, model: str | None, protocol: str | None) -> int:
    state = Path(tempfile.mkdtemp(prefix="edge-demo-"))
    try:
        with _broker(broker, protocol) as (url, proto):
            return _run(url, proto, model, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _run(url: str, protocol: str, model: str | None, state: Path) -> int:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883
    requester = Requester(host, port, f"edge-demo-{uuid.uuid4().hex[:6]}", protocol=protocol)
    requester.connect()
    topics = Topics("edge", DEVICE, "edge-agent")  # the defaults the demo agent runs with
    reply_topic = topics.replies("demo")
    requester.subscribe(topics.status())
    requester.subscribe(topics.telemetry(), qos=0)
    requester.subscribe(reply_topic)
    try:
        with _agent(url, protocol, model, state) as proc:
            _say(f"agent:   device {DEVICE}, loading the model (log: {state / 'agent.log'})")
            if not _wait_status(requester, proc, "online", 180):
                _say("agent did not come online; its log:")
                _say((state / "agent.log").read_text()[-4000:])
                return 1
            _say("agent:   online\n")
            ok = _send_samples(requester, topics, reply_topic, protocol)
            telemetry = requester.wait_for(lambda m: m.topic.endswith("/telemetry"), 15)
            if telemetry is not None:
                _say("one telemetry message (edge/devices/demo-board/telemetry):")
                _say(json.dumps(json.loads(telemetry.payload), indent=2))
            proc.send_signal(signal.SIGTERM)
            stopped = _wait_status(requester, proc, "stopped", 30, exited_ok=True)
            _say(f"\nagent:   {'stopped cleanly' if stopped else 'did not report stopped'}")
            return 0 if ok and stopped else 1
    finally:
        requester.close()


def _wait_status(
    requester: Requester,
    proc: subprocess.Popen[bytes],
    wanted: str,
    timeout: float,
    exited_ok: bool = False,
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = requester.wait_for(lambda m: m.topic.endswith("/status"), 0.5)
        if msg is not None and msg.payload.decode(errors="replace") == wanted:
            return True
        if proc.poll() is not None and not exited_ok:
            return False
    return False


def _send_samples(requester: Requester, topics: Topics, reply_topic: str, protocol: str) -> bool:
    header = f"{'job':<10} {'kind':<9} {'status':<9} {'answer (confidence)':<60}"
    _say(f"{header} {'ms':>6} {'tok/s':>6}")
    all_answered = True
    for i, sample in enumerate(SAMPLES, start=1):
        job = {"id": f"demo-{i}", **sample}
        topic = topics.fleet_jobs(sample["kind"])
        if protocol == "5":
            requester.publish(
                topic,
                json.dumps(job).encode(),
                response_topic=reply_topic,
                correlation_data=job["id"].encode(),
            )
        else:
            requester.publish(topic, json.dumps({**job, "reply_to": reply_topic}).encode())
        job_id = str(job["id"])
        reply = requester.wait_for(lambda m: _is_reply(m, job_id), 60)  # noqa: B023
        if reply is None:
            all_answered = False
            _say(f"{job['id']:<10} {sample['kind']:<9} {'(none)':<9}")
            continue
        _say(_row(job, json.loads(reply.payload)))
    _say("")
    return all_answered


def _is_reply(msg: Incoming, job_id: str) -> bool:
    try:
        body = json.loads(msg.payload)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("id") == job_id and "status" in body


def _row(job: dict[str, Any], reply: dict[str, Any]) -> str:
    result = reply.get("result") or {}
    if reply["status"] == "done" and job["kind"] == "classify":
        unsure = ", unsure" if result.get("uncertain") else ""
        answer = f"{result['label']} ({result['confidence']:.2f}{unsure})"
    elif reply["status"] == "done":
        answer = json.dumps(result.get("data"), ensure_ascii=False, separators=(",", ":"))
        if result.get("uncertain"):
            answer += f" unsure: {','.join(result['uncertain'])}"
    else:
        error = reply.get("error") or {}
        answer = f"{error.get('code')}: {error.get('message')}"
    if len(answer) > 60:
        answer = answer[:57] + "..."
    timings = reply.get("timings") or {}
    ms = timings.get("total_ms")
    tps = timings.get("tokens_per_second")
    return (
        f"{job['id']:<10} {job['kind']:<9} {reply['status']:<9} {answer:<60} "
        f"{'' if ms is None else f'{ms:.0f}':>6} {'' if tps is None else f'{tps:.0f}':>6}"
    )
