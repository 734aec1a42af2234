"""Remote operations on real agents (the bundled model) over the session's real Mosquitto,
driven by `edge-agent ops` as an operator would: drain with a burst in flight, resume,
restart, log-level expiry, logs, cancel, hostile requests, and a staged run that stops at
the board that fails. (tests/test_operations.py has the model-free half; the broker's
acl for operators is in tests/test_broker_security.py.)"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import Incoming, Requester
from tests.harness import opfuzz
from tests.harness.clients import AgentFactory, reply_for
from tests.harness.ops import by_device, ops_cli, ops_start
from tests.harness.process import (
    AgentProcess,
    Sensor,
    classify_job,
    completions,
    wait_for_log,
)

pytestmark = [pytest.mark.model, pytest.mark.slow]


def operate(
    client: Requester, agent: AgentProcess, op_id: str, operation: str, **args: Any
) -> None:
    body = {"id": op_id, "operation": operation, "args": args}
    topic = f"{agent.prefix}/devices/{agent.device_id}/operate/op-tester"
    client.publish(topic, json.dumps(body).encode())


def final_state(
    client: Requester, agent: AgentProcess, op_id: str, timeout: float = 30
) -> dict[str, Any]:
    topic = f"{agent.prefix}/devices/{agent.device_id}/operations/{op_id}"

    def match(m: Incoming) -> bool:
        return m.topic == topic and bool(m.payload) and json.loads(m.payload)["state"] in (
            "successful", "failed", "rejected")  # fmt: skip

    msg = client.wait_for(match, timeout)
    assert msg is not None, f"no final state of {op_id} within {timeout}s"
    body: dict[str, Any] = json.loads(msg.payload)
    return body


def test_drain_with_a_burst_in_flight_loses_no_job_and_runs_none_twice(
    broker: LocalBroker, prefix: str, start_agent: AgentFactory, requester: Requester
) -> None:
    a, b = start_agent(device_id=f"a-{prefix}"), start_agent(device_id=f"b-{prefix}")
    sensor = Sensor("127.0.0.1", broker.port, prefix)
    try:
        for i in range(16):
            sensor.send(classify_job(i, "burst"))
        code, result = ops_cli(broker, prefix, "drain", "--device", a.device_id)
        assert code == 0, result
        row = by_device(result)[a.device_id]
        assert row["result"] == "successful" and row["op_result"]["mode"] == "drained"
        assert row["states"][-1] == "successful"
        assert sensor.wait_all(120, retry=False)
        # every job of the burst answered once, none run twice
        assert all(len(s.replies) == 1 for s in sensor.sent.values())
        assert {s.replies[0]["status"] for s in sensor.sent.values()} == {"done"}
        runs = completions([a, b])
        assert max(runs.values()) == 1 and len(runs) == 16
        # drained: the fleet's jobs go to the other member, its own topic says why not
        for i in range(8):
            sensor.send(classify_job(i, "after"))
        assert sensor.wait_all(120, retry=False)
        after = [s.replies[0] for k, s in sensor.sent.items() if k.startswith("after")]
        assert {r["device"] for r in after} == {b.device_id}
        requester.subscribe(f"{prefix}/replies/own")
        job = {**classify_job(0, "own"), "reply_to": f"{prefix}/replies/own"}
        requester.publish(f"{prefix}/devices/{a.device_id}/jobs/classify", json.dumps(job).encode())
        refused = reply_for(requester, "own-0")
        assert refused["status"] == "rejected" and refused["error"]["code"] == "draining"
        requester.subscribe(f"{prefix}/devices/{a.device_id}/telemetry", qos=0)
        tele = requester.wait_for(lambda m: m.topic.endswith("/telemetry"), 10)
        assert tele is not None and json.loads(tele.payload)["mode"] == "drained"
        # resume: the gate job is answered by the board itself
        code, result = ops_cli(broker, prefix, "resume", "--device", a.device_id)
        assert code == 0 and by_device(result)[a.device_id]["gate_ms"] is not None, result
    finally:
        sensor.close()


def test_restart_drains_exits_and_the_next_process_reports_it(
    broker: LocalBroker, prefix: str, start_agent: AgentFactory
) -> None:
    agent = start_agent(device_id=f"r-{prefix}")
    cli = ops_start(broker, prefix, "restart", "--device", agent.device_id, "--timeout", "120")
    assert agent.proc.wait(60) == 75  # EX_TEMPFAIL: systemd's Restart=on-failure restarts it
    agent.restart()
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, (out, err)
    row = by_device(json.loads(out))[agent.device_id]
    assert row["states"][-1] == "successful" and row["gate_ms"] is not None
    assert row["op_result"]["session"] == 2  # reported by the process that came back
    ledger = json.loads((agent.state_dir / "operations.json").read_text())
    assert ledger["mode"] == "serving"


def test_log_level_turns_up_then_reverts_by_itself(
    broker: LocalBroker, prefix: str, start_agent: AgentFactory
) -> None:
    agent = start_agent(log_level="info")
    code, result = ops_cli(broker, prefix, "log-level", "level=debug", "expiry_s=3",
                           "--device", agent.device_id)  # fmt: skip
    assert code == 0, result
    assert by_device(result)[agent.device_id]["op_result"]["reverts_to"] == "info"
    reverted = wait_for_log(agent, "operation.log_level_reverted", 30)
    assert reverted["level"] == "notice"
    events = agent.log_events()
    cut = events.index(reverted)
    assert any(e.get("level") == "debug" for e in events[:cut])  # the gate job, at least
    time.sleep(1.5)  # telemetry and a reconnect check log at debug: none after the revert
    assert not [e for e in agent.log_events()[cut:] if e.get("level") == "debug"]
    audit = [e for e in events if str(e.get("event", "")).startswith("operation.")]
    assert {e["level"] for e in audit} == {"notice"}
    assert {e["requester"] for e in audit if "requester" in e} == {"op-tester"}


def test_cancel_logs_and_hostile_operations_while_jobs_flow(
    broker: LocalBroker, prefix: str, start_agent: AgentFactory, requester: Requester
) -> None:
    agent = start_agent(env={"EDGE_AGENT_JOBS__PARALLEL": "1"})
    requester.subscribe(f"{prefix}/devices/{agent.device_id}/operations/#")
    requester.subscribe(f"{prefix}/replies/r")
    for i in range(6):
        job = {**classify_job(i, "c"), "reply_to": f"{prefix}/replies/r"}
        requester.publish(
            f"{prefix}/devices/{agent.device_id}/jobs/classify", json.dumps(job).encode()
        )
    operate(requester, agent, "cancel-1", "cancel")
    state = final_state(requester, agent, "cancel-1")
    assert state["state"] == "successful"
    replies = [reply_for(requester, f"c-{i}") for i in range(6)]
    statuses = Counter(r["status"] for r in replies)
    assert statuses["cancelled"] >= 1 and sum(statuses.values()) == 6  # none lost
    # queued ones are cancelled; a running one stops at its next step, unless it ends first
    held = state["result"]
    assert held["queued"] <= statuses["cancelled"] <= held["queued"] + held["running"]

    # hostile requests: each usable id gets one final state, the rest a log line
    hostile: list[tuple[str, bytes]] = [
        ("h-unknown", b'{"id": "h-unknown", "operation": "format-disk"}'),
        ("h-config", b'{"id": "h-config", "operation": "config", "args": {"sett": 1}}'),
        (
            "h-url",
            b'{"id": "h-url", "operation": "model", "args": {"name": "x", "url": "ftp://x"}}',
        ),
        ("h-lines", b'{"id": "h-lines", "operation": "logs", "args": {"lines": 1e12}}'),
        ("h-type", b'{"id": "h-type", "operation": "log-level", "args": {"level": 5}}'),
        ("h-extra", b'{"id": "h-extra", "operation": "drain", "args": {"force": true}}'),
        ("h-neg", b'{"id": "h-neg", "operation": "drain", "args": {"timeout_s": -1}}'),
        (
            "h-str",
            b'{"id": "h-str", "operation": "log-level", "args": {"level": "d\\u0000"}}',
        ),
    ]
    junk = [b"", b"\xff" * 100, b"[]", b'{"operation": "drain"}', b"{" * 5000,
            b'{"id": "../../x", "operation": "drain"}', b'{"id": "a#", "operation": "cancel"}']  # fmt: skip
    for _op_id, body in hostile:
        requester.publish(f"{prefix}/devices/{agent.device_id}/operate/op-tester", body)
    for body in junk:
        requester.publish(f"{prefix}/devices/{agent.device_id}/operate/op-tester", body)
    for op_id, _body in hostile:
        assert final_state(requester, agent, op_id)["state"] == "rejected", op_id
    # a flood: 16 wait at most; the rest are `busy`, and jobs are answered meanwhile
    for i in range(60):
        operate(requester, agent, f"f-{i}", "logs", lines=5)
    job = {**classify_job(0, "during"), "reply_to": f"{prefix}/replies/r"}
    requester.publish(f"{prefix}/devices/{agent.device_id}/jobs/classify", json.dumps(job).encode())
    assert reply_for(requester, "during-0")["status"] == "done"
    finals = Counter(final_state(requester, agent, f"f-{i}")["state"] for i in range(60))
    assert sum(finals.values()) == 60 and finals["successful"] >= 17
    # logs: the agent's own lines, in chunks
    operate(requester, agent, "logs-1", "logs", lines=30)
    state = final_state(requester, agent, "logs-1")
    assert state["state"] == "successful" and state["result"]["lines"] == 30
    assert agent.alive()
    unreadable = [e for e in agent.log_events() if e.get("event") == "operation.unreadable"]
    assert len(unreadable) == len(junk) - 1  # the empty one clears a retained request


def test_a_staged_run_stops_at_the_board_that_fails(
    broker: LocalBroker, prefix: str, start_agent: AgentFactory, requester: Requester
) -> None:
    """Three boards; the second is drained, so its gate job is refused (`draining`): the
    run stops after its stage and the third board is never asked."""
    agents = [start_agent(device_id=f"{n}-{prefix}") for n in ("s1", "s2", "s3")]
    requester.subscribe(f"{prefix}/devices/+/operations/+")
    operate(requester, agents[1], "pre-drain", "drain")
    assert final_state(requester, agents[1], "pre-drain")["state"] == "successful"
    devices = [x for a in agents for x in ("--device", a.device_id)]
    code, result = ops_cli(broker, prefix, "log-level", "level=info", *devices,
                           "--fraction", "0.5", "--gate-timeout", "20")  # fmt: skip
    assert code == 1
    rows = by_device(result)
    assert rows[agents[0].device_id]["result"] == "successful"
    assert rows[agents[1].device_id]["result"] == "gate_failed"
    assert "draining" in rows[agents[1].device_id]["error"]["message"]
    assert rows[agents[2].device_id]["result"] == "skipped"
    assert rows[agents[2].device_id]["states"] == []
    op_id = result["id"]
    assert not [e for e in agents[2].log_events() if e.get("id") == op_id]
    assert [r["stage"] for r in result["devices"]] == [1, 2, 3]


def test_ops_refuses_bad_arguments_before_touching_the_broker(
    broker: LocalBroker, prefix: str
) -> None:
    for args in (["drain"], ["drain", "--device", "a/b"], ["logs", "lines", "--device", "x"],
                 ["drain", "--device", "x", "--fraction", "0"]):  # fmt: skip
        proc = ops_start(broker, prefix, *args)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (2, 78), (args, out, err)
        assert err.strip(), args


def test_the_operations_fuzzer_finds_no_request_that_stops_a_board(tmp_path: Path) -> None:
    """A short campaign of tests/harness/opfuzz.py (bench/opfuzz.py runs the long one).
    EDGE_AGENT_FUZZ_SEED=random (or a number) runs another seed."""
    wanted = os.environ.get("EDGE_AGENT_FUZZ_SEED", "20261207")
    seed = random.randrange(1 << 31) if wanted == "random" else int(wanted)
    print(f"\noperations fuzz seed {seed} (EDGE_AGENT_FUZZ_SEED={seed} runs it again)")
    result = opfuzz.campaign(tmp_path, count=200, seed_value=seed)
    print(result.table())
    assert result.problems == []
    assert result.stated > 50 and result.unusable > 20, "the campaign must reach the agent"
    assert result.states["successful"] > 5 and result.states["rejected"] > 20
    assert result.probes == 4 and result.health == "ok"


def test_config_changes_live_fail_naming_the_field_and_persist_with_a_restart(
    broker: LocalBroker, prefix: str, start_agent: AgentFactory, requester: Requester
) -> None:
    agent = start_agent(env={"EDGE_AGENT_JOBS__PARALLEL": "1"})
    requester.subscribe(f"{prefix}/devices/{agent.device_id}/operations/+")
    requester.subscribe(f"{prefix}/replies/cfg")
    # invalid: failed, naming the field; nothing changes
    for op_id, change in (("bad-type", {"jobs": {"max_queue": "1"}}),
                          ("bad-range", {"jobs": {"max_queue": 0}}),
                          ("bad-key", {"jobs": {"max_queu": 1}}),
                          ("denied", {"mqtt": {"broker": "mqtt://evil:1883"}}),
                          ("no-persist", {"jobs": {"parallel": 2}})):  # fmt: skip
        operate(requester, agent, op_id, "config", set=change)
        state = final_state(requester, agent, op_id)
        assert state["state"] == "failed" and state["error"]["code"] == "invalid_argument"
        assert next(iter(change)) in state["error"]["message"], state
    # live: a queue of one from now on
    operate(requester, agent, "live", "config", set={"jobs": {"max_queue": 1}})
    state = final_state(requester, agent, "live")
    assert state["state"] == "successful" and state["result"]["live"] == ["jobs.max_queue"]
    for i in range(5):
        job = {**classify_job(i, "q"), "reply_to": f"{prefix}/replies/cfg"}
        requester.publish(f"{prefix}/devices/{agent.device_id}/jobs/classify",
                          json.dumps(job).encode())  # fmt: skip
    replies = [reply_for(requester, f"q-{i}") for i in range(5)]
    full = [r for r in replies if (r.get("error") or {}).get("code") == "overloaded"]
    assert full and "queue is full (1 jobs waiting)" in full[0]["error"]["message"]
    # persisted, needing a restart: drained restart, reported by the next process
    operate(requester, agent, "keep", "config", set={"jobs": {"parallel": 2}}, persist=True)
    assert agent.proc.wait(60) == 75
    agent.restart()
    state = final_state(requester, agent, "keep")
    assert state["state"] == "successful" and state["result"]["restart"] is True
    assert state["result"]["changed"] == {"jobs.parallel": {"from": 1, "to": 2}}
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent", "config", "--state-dir", str(agent.state_dir),
         "--sources"], capture_output=True, text=True, check=True, env=agent.env,
    ).stdout  # fmt: skip
    sources = json.loads(out)
    assert sources["jobs.parallel"]["value"] == 2
    assert sources["jobs.parallel"]["source"].startswith("operation keep by op-tester")
    assert sources["jobs.max_queue"]["source"] == "default"  # the live one was not kept
    assert wait_for_log(agent, "settings.from_operations", 10)["keys"] == ["jobs.parallel"]


def test_bench_runs_between_jobs_and_publishes_the_figures(
    broker: LocalBroker, prefix: str, start_agent: AgentFactory
) -> None:
    agent = start_agent()
    code, result = ops_cli(broker, prefix, "bench", "rounds=1", "--device", agent.device_id)
    assert code == 0, result
    figures = by_device(result)[agent.device_id]["op_result"]
    assert figures["tokens_per_second"] > 0 and figures["classify_ms_p50"] > 0
    assert figures["model"] == "smollm2-135m-instruct-q4_1"
    assert (agent.state_dir / "bench.json").is_file()  # the selector reads it


def test_the_ansible_playbook_runs_an_operation_over_the_broker(
    broker: LocalBroker, prefix: str, start_agent: AgentFactory, tmp_path: Path
) -> None:
    """ansible/operate.yml: edge-agent ops on the controller, for the hosts of the play."""
    agents = [start_agent(device_id=f"{n}-{prefix}") for n in ("an1", "an2")]
    inventory = tmp_path / "inventory.yml"
    hosts = {f"board{i}": {"ansible_connection": "local", "edge_agent_device_id": a.device_id}
             for i, a in enumerate(agents)}  # fmt: skip
    inventory.write_text(json.dumps({"edge_agents": {"hosts": hosts}}))
    root = Path(__file__).resolve().parent.parent
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_dir / "ansible-playbook"), "-i", str(inventory), str(root / "ansible" / "operate.yml"),
         "-e", "edge_agent_operation=log-level", "-e",
         json.dumps({"edge_agent_operation_args": ["level=info", "expiry_s=60"],
                     "edge_agent_mqtt_broker": broker.url,
                     "edge_agent_ops_command": str(bin_dir / "edge-agent")})],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "EDGE_AGENT_MQTT__TOPIC_PREFIX": prefix,
             "EDGE_AGENT_MQTT__USERNAME": "op-ansible", "ANSIBLE_NOCOLOR": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for agent in agents:
        event = wait_for_log(agent, "operation.successful", 10)
        assert event["requester"] == "op-ansible" and event["operation"] == "log-level"


def test_an_mqtt_311_agent_is_operated_the_same_way(
    broker: LocalBroker, prefix: str, start_agent: AgentFactory, requester: Requester
) -> None:
    agent = start_agent(protocol="3.1.1")
    code, result = ops_cli(broker, prefix, "drain", "--device", agent.device_id)
    assert code == 0 and by_device(result)[agent.device_id]["op_result"]["mode"] == "drained"
    unsubscribed = [e for e in agent.log_events() if e.get("event") == "agent.mode"]
    assert unsubscribed[-1]["mode"] == "drained"
    requester.subscribe(f"{prefix}/replies/m3")
    job = {**classify_job(0, "m3"), "reply_to": f"{prefix}/replies/m3"}
    requester.publish(f"{prefix}/jobs/classify", json.dumps(job).encode())  # the fleet topic
    time.sleep(2.0)
    assert not [m for m in requester.drain() if b'"m3-0"' in m.payload]  # not subscribed now
    code, result = ops_cli(broker, prefix, "resume", "--device", agent.device_id)
    assert code == 0, result
    requester.publish(f"{prefix}/jobs/classify", json.dumps({**job, "id": "m3-1"}).encode())
    assert reply_for(requester, "m3-1")["status"] == "done"
