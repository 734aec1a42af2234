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
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_agent.adapters.broker import LocalBroker, find_mosquitto, free_port, wait_for_port
from edge_agent.adapters.mqtt import Incoming, Requester
from edge_agent.core.protocol import Topics

DEVICE = "demo-board"
# Profiles that learn from labeled rows shipped with the package (edge_agent/data/ROWS.md,
# docs/profiles.md): sensors send only {"id", "profile", "text"}.
PROFILES: dict[str, tuple[str, str]] = {
    "severity": ("classify", "rows-severity.jsonl"),
    "ssh": ("classify", "rows-ssh.jsonl"),
    "reading": ("extract", "rows-reading.jsonl"),
    "ssh_login": ("extract", "rows-ssh-login.jsonl"),
}
# (job, the right answer): none of these texts is among the rows learned from.
SAMPLES: list[tuple[dict[str, Any], Any]] = [
    (
        {
            "kind": "classify",
            "profile": "severity",
            "text": "Boiler B-2 outlet temperature 96 C, safety valve opened twice in 10 minutes.",
        },
        "critical",
    ),
    (
        {
            "kind": "classify",
            "profile": "severity",
            "text": "Freezer F-3 holding at -19.5 C, door closed, compressor cycling normally.",
        },
        "normal",
    ),
    (
        {
            "kind": "classify",
            "profile": "ssh",
            "text": "Failed password for invalid user admin from 203.0.113.7 port 52311 ssh2",
        },
        "auth_failure",
    ),
    (
        {
            "kind": "extract",
            "profile": "reading",
            "text": "Sensor TS-7 reports humidity 48.5 % in the server room.",
        },
        {"device": "TS-7", "metric": "humidity", "value": 48.5, "unit": "%"},
    ),
    (
        {
            "kind": "extract",
            "profile": "ssh_login",
            "text": "Accepted publickey for deploy from 10.0.4.21 port 40022 ssh2",
        },
        {"user": "deploy", "ip": "10.0.4.21", "port": 40022},
    ),
    # a job that brings its own labels: scored zero-shot, no profile needed
    (
        {
            "kind": "classify",
            "text": "Smoke detector SD-4 in the battery room is in alarm.",
            "labels": ["fire", "flood", "intrusion"],
        },
        "fire",
    ),
    ({"kind": "classify", "text": "A job with an empty label list", "labels": []}, None),
]


def demo_config(path: Path) -> Path:
    """The demo agent's config.toml: its profiles and their rows."""
    data = resources.files("edge_agent") / "data"
    lines = []
    for name, (kind, rows) in PROFILES.items():
        path_text = json.dumps(str(data / rows))
        lines += [f"[profiles.{name}]", f'kind = "{kind}"', f"rows = {path_text}"]
    path.write_text("\n".join(lines) + "\n")
    return path


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
        "--config",
        str(demo_config(state / "config.toml")),
    ]
    if model:
        cmd += ["--model", model]
    env = {
        **os.environ,
        "EDGE_AGENT_TELEMETRY__INTERVAL_S": "2",
        # Answers less sure than this come back marked uncertain (docs/protocol.md).
        "EDGE_AGENT_JOBS__MIN_CONFIDENCE": "0.7",
        # the demo's one requester brings five job shapes at once (four profiles and a job
        # with its own labels): more than a requester may start at once by default
        "EDGE_AGENT_JOBS__NEW_SHAPES_BURST": "8",
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


def _learned_cache() -> Path:
    """Where the demo keeps what its profiles learned between runs (bound to the model and
    the rows by name, as the agent's own state directory is): a second run starts in
    seconds."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge-agent" / "demo-learned"


def run_demo(broker: str | None, model: str | None, protocol: str | None) -> int:
    state = Path(tempfile.mkdtemp(prefix="edge-demo-"))
    cache = _learned_cache()
    try:
        if cache.is_dir():
            shutil.copytree(cache, state / "learned")
        with _broker(broker, protocol) as (url, proto):
            return _run(url, proto, model, state)
    finally:
        with contextlib.suppress(OSError):
            if (state / "learned").is_dir():
                shutil.copytree(state / "learned", cache, dirs_exist_ok=True)
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
            _say(
                f"agent:   device {DEVICE}, loading the model and learning its profiles' rows "
                f"(log: {state / 'agent.log'})"
            )
            # the first run learns the profiles' rows (a minute or two on 2 cores)
            if not _wait_status(requester, proc, "online", 900):
                _say("agent did not come online; its log:")
                _say((state / "agent.log").read_text()[-4000:])
                return 1
            _say("agent:   online\n")
            _show_learning(state / "agent.log")
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


def _show_learning(log: Path) -> None:
    """How each profile learned from its rows (the agent's `profile.learned` events)."""
    learned = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "profile.learned":
            learned.append(event)
    if not learned:
        return
    _say("learned from labeled rows (each row answered by what was learned without it):")
    _say(f"  {'profile':<10} {'kind':<9} {'rows':>5} {'right':>7} {'sure ≥0.7 right':>16} {'s':>6}")
    for e in learned:
        acc, sure, count = e.get("cv_accuracy"), e.get("sure_right"), e.get("sure_answers")
        right = "-" if acc is None else f"{acc:.1%}"
        sure_text = "-" if sure is None else f"{sure:.1%} of {count}"
        seconds = float(e.get("seconds", 0))
        _say(
            f"  {e['profile']:<10} {e['kind']:<9} {e['rows']:>5} {right:>7} {sure_text:>16} "
            f"{seconds:>6.1f}"
        )
        for warning in e.get("warnings", []):
            _say(f"  warning: {warning}")
    _say("")


def _send_samples(requester: Requester, topics: Topics, reply_topic: str, protocol: str) -> bool:
    header = f"{'job':<7} {'profile':<10} {'status':<9} {'answer (confidence)':<56} {'right':<5}"
    _say(f"{header} {'ms':>6}")
    all_answered = True
    for i, (sample, expected) in enumerate(SAMPLES, start=1):
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
            _say(f"{job['id']:<7} {sample.get('profile', '-'):<10} {'(none)':<9}")
            continue
        _say(_row(job, json.loads(reply.payload), expected))
    _say("")
    return all_answered


def _is_reply(msg: Incoming, job_id: str) -> bool:
    try:
        body = json.loads(msg.payload)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("id") == job_id and "status" in body


def _row(job: dict[str, Any], reply: dict[str, Any], expected: Any) -> str:
    result = reply.get("result") or {}
    got: Any = None
    if reply["status"] == "done" and job["kind"] == "classify":
        got = result["label"]
        unsure = ", unsure" if result.get("uncertain") else ""
        answer = f"{got} ({result['confidence']:.2f}{unsure})"
    elif reply["status"] == "done":
        got = result.get("data")
        answer = json.dumps(got, ensure_ascii=False, separators=(",", ":"))
        if result.get("uncertain"):
            answer += f" unsure: {','.join(result['uncertain'])}"
    else:
        error = reply.get("error") or {}
        answer = f"{error.get('code')}: {error.get('message')}"
    if len(answer) > 56:
        answer = answer[:53] + "..."
    right = "-" if expected is None else ("yes" if got == expected else "NO")
    ms = (reply.get("timings") or {}).get("total_ms")
    return (
        f"{job['id']:<7} {job.get('profile', '-'):<10} {reply['status']:<9} {answer:<56} "
        f"{right:<5} {'' if ms is None else f'{ms:.0f}':>6}"
    )
