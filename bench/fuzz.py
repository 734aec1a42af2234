"""Fuzz a running agent with malformed job payloads; print what came back and its memory.

    .venv/bin/python -m bench.fuzz               # 10,000 payloads (the acceptance run)
    .venv/bin/python -m bench.fuzz --count 2000 --seed 7

Every payload goes out with an MQTT 5 Response Topic, so every one must be answered
(rejected, or done if it happened to be a valid job), the agent must stay up, and its
resident memory must stay flat (measured after a warm-up, then at the end).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.harness import AgentProcess, start_agent_process
from edge_agent.broker import LocalBroker

LIMIT = 65536  # the agent's default jobs.max_payload_bytes


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.4:
        return rng.choice(
            [
                None,
                True,
                False,
                rng.randint(-(2**63), 2**63),
                rng.random() * 1e308,
                _text(rng, 20),
                "",
            ]
        )
    if roll < 0.7:
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_text(rng, 8): _json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _text(rng: random.Random, n: int) -> str:
    pool = 'abcxyz {}[]":,\\/\x00\x1f\u00e9\u2603\U0001f600<|im_end|>'
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, n)))


def payload(rng: random.Random) -> bytes:
    """One hostile payload: the kinds the acceptance criteria name, mixed."""
    kind = rng.randrange(9)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randint(0, 300))
    if kind == 1:  # random JSON
        return json.dumps(_json_value(rng)).encode()
    if kind == 2:  # huge strings, around and over the size limit
        size = rng.choice([LIMIT - 200, LIMIT + 10, 3 * LIMIT, 5000])
        return json.dumps({"id": "h", "text": "x" * size, "labels": ["a"]}).encode()
    if kind == 3:  # deep nesting
        depth = rng.choice([50, 500, 5000, 20000])
        return b"[" * depth + b"]" * depth
    if kind == 4:  # invalid UTF-8 inside otherwise plausible JSON
        return b'{"id": "u", "text": "\xff\xfe\xc3\x28", "labels": ["a"]}'
    if kind == 5:  # wrong types in every field
        return json.dumps(
            {
                k: _json_value(rng)
                for k in ("id", "text", "labels", "schema", "priority", "ttl_ms", "reply_to")
            }
        ).encode()
    if kind == 6:  # nearly valid classify jobs with one thing broken
        job: dict[str, Any] = {"id": f"n{rng.randrange(10**6)}", "text": "ok", "labels": ["a", "b"]}
        broken = rng.choice(["labels", "text", "id", "priority", "deadline", "examples", "v"])
        job[broken] = rng.choice([[], "", 10**30, [[]], {"x": 1}, "2030-13-45T99:00:00", -1, 2])
        return json.dumps(job).encode()
    if kind == 7:  # hostile schemas
        schema = rng.choice([
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "(a+)+$"}}},
            {"type": "object", "properties": {"a": {"$ref": "#"}}},
            {"type": "object", "properties": {str(i): {"type": "string"} for i in range(500)}},
            {"type": "object", "properties": {"a": {"enum": list(range(1000))}}},
            {"type": "array", "items": {"type": "string"}},
            _json_value(rng),
        ])  # fmt: skip
        return json.dumps({"id": "s", "kind": "extract", "text": "t", "schema": schema}).encode()
    return json.dumps(_json_value(rng)).encode()[: rng.randint(0, 80)]  # truncated JSON


@dataclass
class FuzzResult:
    sent: int
    answered: int
    statuses: Counter[str]
    codes: Counter[str]
    alive: bool
    rss_warm: int
    rss_end: int
    seconds: float
    missing: list[tuple[int, bytes]]

    def table(self) -> str:
        growth = (self.rss_end - self.rss_warm) / 2**20
        return "\n".join([
            "| payloads | answered | rejected | done | agent alive | RSS after warm-up | RSS at end | growth | time |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {self.sent} | {self.answered} | {self.statuses['rejected']} | {self.statuses['done']} | "
            f"{'yes' if self.alive else 'NO'} | {self.rss_warm / 2**20:.1f} MiB | {self.rss_end / 2**20:.1f} MiB | "
            f"{growth:+.1f} MiB | {self.seconds:.0f} s |",
        ])  # fmt: skip


def run(agent: AgentProcess, port: int, count: int, seed: int, warmup: int = 500) -> FuzzResult:
    rng = random.Random(seed)
    reply_topic = f"{agent.prefix}/replies/fuzz"
    answers: dict[int, dict[str, Any]] = {}
    lock = threading.Lock()
    done = threading.Condition(lock)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        if corr is None:
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with lock:
            answers[int(corr)] = body
            done.notify_all()

    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=f"fuzz-{uuid.uuid4().hex[:6]}",
        protocol=paho.MQTTv5,
    )
    client.on_message = on_message
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(reply_topic, qos=1)
    time.sleep(0.3)
    start = time.time()
    rss_warm = 0
    sent: list[bytes] = []
    for i in range(count):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = str(i).encode()
        kind = "extract" if i % 4 == 0 else "classify"
        body = payload(rng)
        sent.append(body)
        client.publish(f"{agent.prefix}/jobs/{kind}", body, qos=1, properties=props)
        if i % 200 == 199:  # keep a bounded window in flight
            with lock:
                done.wait_for(lambda i=i: len(answers) >= i - 400, timeout=60)
        if i == warmup:
            with lock:
                done.wait_for(lambda: len(answers) >= warmup, timeout=60)
            rss_warm = agent.rss_bytes()
    with lock:
        done.wait_for(lambda: len(answers) >= count, timeout=120)
    seconds = time.time() - start
    alive = agent.alive()
    rss_end = agent.rss_bytes() if alive else 0
    client.disconnect()
    client.loop_stop()
    statuses = Counter(str(a.get("status")) for a in answers.values())
    codes = Counter(
        str((a.get("error") or {}).get("code")) for a in answers.values() if a.get("error")
    )
    missing = [(i, sent[i][:200]) for i in range(count) if i not in answers]
    return FuzzResult(
        count, len(answers), statuses, codes, alive, rss_warm or rss_end, rss_end, seconds, missing
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-fuzz-"))
    with LocalBroker(workdir=work / "broker") as broker:
        agent = start_agent_process(
            broker.url, f"fz{uuid.uuid4().hex[:6]}", work / "agent", log_level="info"
        )
        try:
            result = run(agent, broker.port, args.count, args.seed)
        finally:
            agent.kill()
    print(result.table())
    print("\nerror codes: " + ", ".join(f"{k} {v}" for k, v in result.codes.most_common()))
    for index, body in result.missing[:10]:
        print(f"unanswered #{index}: {body!r}")
    ok = result.alive and result.answered == result.sent
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
