"""Fuzz the operations channel of a running agent (docs/operations.md): hostile requests
drawn by hypothesis (every field with valid, boundary and hostile values; broken
encodings; odd operator names; the retain flag), sent one at a time, with an ordinary job
answered in between.

    .venv/bin/python -m bench.opfuzz                  # 2,000 requests, seed 1
    .venv/bin/python -m bench.opfuzz --count 500 --seed random

The oracle, for every request:
    one with a usable id (JSON object, at most 4096 bytes, an `id` of 1-64 of
    A-Z a-z 0-9 _ . -, from an operator name of the same kind) gets exactly one final
    state on its retained topic, never `internal_error`, within 10 s; the same id again
    gets the same final state again and runs nothing twice;
    one without is never given a state, and is logged `operation.unreadable`;
    every 50 requests (and at the end) a `resume` succeeds and a job sent to the device's
    own topic is answered `done`; the agent stays up with health `ok` and nothing
    crashed in its log.
`restart` and `bench` are left out (one ends the process by design, the other takes
seconds; tests/test_operations_live.py covers both).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from edge_agent.adapters.broker import LocalBroker
from tests.harness.process import AgentProcess, start_agent_process

SEGMENT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # the documented id and name rule
KEEP_FINISHED = 64  # the board remembers this many finished operations (docs/operations.md)
MAX_REQUEST_BYTES = 4096
FINAL = ("successful", "failed", "rejected")
DOCUMENTED = {"invalid_argument", "unknown_operation", "not_supported", "busy",
              "superseded", "timeout", "interrupted", "unknown_model", "download_failed",
              "hash_mismatch", "load_failed", "test_failed"}  # fmt: skip
CRASH_EVENTS = ("operation.crashed", "job.crashed", "intake.failed", "thread.died")
# not `bench` (seconds of benchmark each; tests/test_operations_live.py runs it) nor
# `restart` (it ends the process by design)
OPERATIONS = ["drain", "resume", "cancel", "log-level", "logs", "model", "config"]


@dataclass(frozen=True)
class Request:
    payload: bytes
    operator: str = "op-fuzz"
    retain: bool = False
    qos: int = 1


HOSTILE_VALUES = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63),
    st.sampled_from([0, 1, -1, 60, 5000, 5001, 86400, 86401, 10**12]),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.text(max_size=40),
    st.sampled_from(["debug", "info", "warning", "error", "DEBUG", "trace", "", "\u202e"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
FRESH = "@@fresh@@"  # replaced by a new id per request in `generate`
IDS = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z"),
    st.sampled_from(["", "a/b", "+", "#", "$SYS", "x" * 65, "é", "a b", "\u0000", ".."]),
    st.integers(),
    st.none(),
    st.lists(st.text(max_size=3), max_size=2),
)
OPERATION_NAMES = st.one_of(
    st.sampled_from(OPERATIONS),
    st.sampled_from(OPERATIONS),
    st.sampled_from(OPERATIONS),
    st.text(max_size=40),
    st.integers(),
)
GOOD_ARGS = st.sampled_from([{}, {"timeout_s": 30}, {"level": "info", "expiry_s": 60},
                             {"level": "debug", "expiry_s": 1}, {"lines": 20},
                             {"lines": 5000, "since_s": 60}])  # fmt: skip
ARG_KEYS = st.sampled_from(["timeout_s", "level", "expiry_s", "lines", "since_s", "force", "x"])


@st.composite
def requests(draw: st.DrawFn) -> Request:
    body: dict[str, Any] = {}
    body["id"] = FRESH if draw(st.integers(0, 9)) < 7 else draw(IDS)
    body["operation"] = draw(OPERATION_NAMES)
    if draw(st.booleans()):
        body["args"] = draw(
            st.one_of(GOOD_ARGS, GOOD_ARGS, st.dictionaries(ARG_KEYS, HOSTILE_VALUES, max_size=3),
                      HOSTILE_VALUES)
        )  # fmt: skip
    if draw(st.integers(0, 9)) == 0:
        body["v"] = draw(HOSTILE_VALUES)
    if draw(st.integers(0, 19)) == 0:
        body.pop("id", None)
    payload = json.dumps(body).encode()
    mutation = draw(st.integers(0, 19))
    if mutation == 0:
        payload = payload[: draw(st.integers(0, max(0, len(payload) - 1)))]
    elif mutation == 1:
        payload = b"\xff\xfe" + payload
    elif mutation == 2:
        payload = payload[:-1] + b', "pad": "' + b"x" * MAX_REQUEST_BYTES + b'"}'
    elif mutation == 3:
        payload = b"[" * 2000
    elif mutation == 4:
        payload = json.dumps([body]).encode()
    odd = draw(st.integers(0, 19)) == 0
    operator = draw(st.sampled_from(["", "a b", "x" * 65, "é"])) if odd else "op-fuzz"
    return Request(payload, operator, retain=draw(st.integers(0, 9)) == 0,
                   qos=draw(st.sampled_from([0, 1, 1, 1])))  # fmt: skip


def generate(count: int, seed_value: int) -> list[Request]:
    out: list[Request] = []

    @seed(seed_value)
    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(requests())
    def collect(request: Request) -> None:
        out.append(request)

    collect()
    fresh = FRESH.encode()
    return [
        Request(r.payload.replace(fresh, f"op-{i}".encode()), r.operator, r.retain, r.qos)
        for i, r in enumerate(out[:count])
    ]


def usable_id(r: Request) -> str | None:
    """The id the agent must answer with a state, per docs/operations.md."""
    if not SEGMENT.match(r.operator) or len(r.payload) > MAX_REQUEST_BYTES:
        return None
    try:
        body = json.loads(r.payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    op_id = body.get("id") if isinstance(body, dict) else None
    return op_id if isinstance(op_id, str) and SEGMENT.match(op_id) else None


@dataclass
class Result:
    sent: int = 0
    stated: int = 0
    unusable: int = 0
    repeated: int = 0
    states: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    probes: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    health: str = "?"

    def table(self) -> str:
        return (
            f"requests {self.sent} in {self.seconds:.0f} s: {self.stated} with a state "
            f"({dict(self.states)}), {self.repeated} repeated ids, {self.unusable} unusable "
            f"(logged); codes {dict(self.codes)}; probes answered {self.probes}; health "
            f"{self.health}; problems {len(self.problems)}"
        )


class _Client:
    def __init__(self, port: int, prefix: str, device: str) -> None:
        self.prefix, self.device = prefix, device
        self.states: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, dict[str, Any]] = {}
        self.health = "?"
        self.cond = threading.Condition()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"opfuzz-{device}",
                             protocol=paho.MQTTv5)  # fmt: skip
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        base = f"{prefix}/devices/{device}"
        for topic in (f"{base}/operations/+", f"{prefix}/replies/opfuzz", f"{base}/telemetry"):
            self.c.subscribe(topic, qos=1)
        time.sleep(0.3)

    def _on(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            return
        with self.cond:
            if msg.topic.endswith("/telemetry") and isinstance(body, dict):
                self.health = (body.get("health") or {}).get("state", "?")
            elif "/operations/" in msg.topic and isinstance(body, dict):
                self.states[msg.topic.rsplit("/", 1)[1]] = body
            elif isinstance(body, dict) and isinstance(body.get("id"), str):
                self.replies[body["id"]] = body
            self.cond.notify_all()

    def send(self, r: Request) -> None:
        topic = f"{self.prefix}/devices/{self.device}/operate/{r.operator}"
        self.c.publish(topic, r.payload, qos=r.qos, retain=r.retain).wait_for_publish(5)

    def wait_state(self, op_id: str, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                state = self.states.get(op_id)
                if state is not None and state.get("state") in FINAL:
                    return state
                if time.monotonic() >= end:
                    return state
                self.cond.wait(end - time.monotonic())

    def probe(self, n: int) -> bool:
        op_id = f"probe-resume-{n}"
        body = {"id": op_id, "operation": "resume"}
        self.send(Request(json.dumps(body).encode()))
        if (self.wait_state(op_id, 10) or {}).get("state") != "successful":
            return False
        job_id = f"probe-job-{n}"
        job = {"id": job_id, "kind": "classify", "text": "Pump P-3 at 9.1 mm/s vibration.",
               "labels": ["normal", "alarm"], "reply_to": f"{self.prefix}/replies/opfuzz"}  # fmt: skip
        self.c.publish(f"{self.prefix}/devices/{self.device}/jobs/classify",
                       json.dumps(job).encode(), qos=1)  # fmt: skip
        end = time.monotonic() + 60
        with self.cond:
            while job_id not in self.replies and time.monotonic() < end:
                self.cond.wait(end - time.monotonic())
            return self.replies.get(job_id, {}).get("status") == "done"

    def clear_retained(self) -> None:
        """Requests sent with the retain flag stay on the broker: clear them."""
        for op in ("op-fuzz",):
            self.c.publish(f"{self.prefix}/devices/{self.device}/operate/{op}", b"",
                           qos=1, retain=True).wait_for_publish(5)  # fmt: skip

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def run(agent: AgentProcess, port: int, reqs: list[Request], probe_every: int = 50) -> Result:
    result = Result()
    client = _Client(port, agent.prefix, agent.device_id)
    seen: dict[str, tuple[dict[str, Any], int]] = {}  # id -> its state, finished count then
    finished = 0
    start = time.monotonic()
    try:
        for n, r in enumerate(reqs):
            op_id = usable_id(r)
            client.send(r)
            result.sent += 1
            if op_id is None:
                result.unusable += 1 if r.payload else 0  # an empty one clears a retained one
            else:
                state = client.wait_state(op_id, 10)
                if state is None or state.get("state") not in FINAL:
                    result.problems.append(f"#{n}: no final state for {op_id!r}: {r}")
                else:
                    code = (state.get("error") or {}).get("code")
                    # an id the board still remembers is one operation: the same state; one
                    # it forgot (KEEP_FINISHED finished since) is a new operation
                    known = op_id in seen and finished - seen[op_id][1] < KEEP_FINISHED
                    if known:
                        result.repeated += 1
                        if state["state"] != seen[op_id][0]["state"]:
                            result.problems.append(f"#{n}: {op_id} changed its final state")
                    else:
                        result.stated += 1
                        result.states[state["state"]] += 1
                        seen[op_id] = (state, finished)
                        finished += 1
                        if code is not None:
                            result.codes[code] += 1
                    if code is not None and code not in DOCUMENTED:
                        result.problems.append(f"#{n}: code {code!r} for {r}")
                with client.cond:
                    client.states.pop(op_id, None)  # a repeat must be sent again to count
            if (n + 1) % probe_every == 0 or n + 1 == len(reqs):
                finished += 1  # the probe's `resume` is one more operation the board keeps
                if client.probe(n):
                    result.probes += 1
                else:
                    result.problems.append(f"after #{n}: the probe job was not answered done")
            if not agent.alive():
                result.problems.append(f"after #{n}: the agent exited")
                break
        time.sleep(2.5)  # one more telemetry message after the last request
        result.health = client.health
        client.clear_retained()
    finally:
        result.seconds = time.monotonic() - start
        client.close()
    events = Counter(e.get("event") for e in agent.log_events())
    crashes = {e: events[e] for e in CRASH_EVENTS if events[e]}
    if crashes:
        result.problems.append(f"crash events in the log: {crashes}")
    if events["operation.unreadable"] != result.unusable:
        result.problems.append(
            f"{result.unusable} unusable requests, {events['operation.unreadable']} logged"
        )
    if result.health != "ok":
        result.problems.append(f"health {result.health}")
    return result


def campaign(workdir: Path, count: int, seed_value: int) -> Result:
    reqs = generate(count, seed_value)
    with LocalBroker(workdir=workdir / "broker") as broker:
        prefix = f"opf{random.Random(seed_value).randrange(1 << 30):x}"
        agent = start_agent_process(broker.url, prefix, workdir / "state", device_id="pi-fuzz",
                                    log_level="info")  # fmt: skip
        try:
            return run(agent, broker.port, reqs)
        finally:
            agent.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.opfuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", default="1", help="a number, or 'random'")
    args = parser.parse_args(argv)
    seed_value = random.randrange(1 << 31) if args.seed == "random" else int(args.seed)
    print(f"operations fuzz: {args.count} requests, seed {seed_value}")
    with tempfile.TemporaryDirectory() as tmp:
        result = campaign(Path(tmp), args.count, seed_value)
    print(result.table())
    for problem in result.problems[:20]:
        print(f"  problem: {problem}")
    return 0 if not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
