"""Operation `model` on real agents and real models: SmolLM2-135M → Gemma-3-270M and back
while jobs flow (the replies name the model that answered), and every way a switch can
fail (a wrong hash, a corrupted file, a server that stops mid-download, SIGKILL during the
load), each ending on the old model with the operation `failed` or `interrupted`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import Incoming, Requester
from edge_agent.core.catalog import Catalog
from tests.harness.clients import AgentFactory, reply_for
from tests.harness.httpserver import Faults, serve
from tests.harness.ops import by_device, ops_cli
from tests.harness.process import AgentProcess

pytestmark = [pytest.mark.model, pytest.mark.slow]

SMOL = "smollm2-135m-instruct-q4_1"
GEMMA = "gemma-3-270m-q4_k_m"


class Flow:
    """Jobs to one device's topic every `every` s from a thread, but never more than
    `outstanding` unanswered (a sensor that waits for its answers, so a machine slowed by
    other work gets a slower flow, not `overloaded` refusals); each reply kept with when it
    came and which model answered."""

    def __init__(
        self, client: Requester, agent: AgentProcess, every: float = 0.25, outstanding: int = 4
    ) -> None:
        self.client, self.agent, self.every = client, agent, every
        self.outstanding = outstanding
        self.reply_topic = f"{agent.prefix}/replies/flow"
        self.sent: dict[str, float] = {}
        self.replies: dict[str, tuple[float, dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flow:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            if len(self.sent) - len(self.replies) >= self.outstanding:
                self._stop.wait(0.02)  # replies are taken by the test's thread
                continue
            job_id = f"flow-{i}"
            job = {"id": job_id, "kind": "classify", "labels": ["normal", "fault"],
                   "text": f"Pump P-{i % 7} vibration {i % 5}.{i % 9} mm/s",
                   "reply_to": self.reply_topic}  # fmt: skip
            self.sent[job_id] = time.monotonic()
            self.client.publish(
                f"{self.agent.prefix}/devices/{self.agent.device_id}/jobs/classify",
                json.dumps(job).encode(),
            )
            i += 1
            self._stop.wait(self.every)

    def collect(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(self.replies) < len(self.sent):
            for m in self.client.drain():
                self.take(m)
            time.sleep(0.05)

    def take(self, m: Incoming) -> None:
        if m.topic != self.reply_topic:
            return
        body = json.loads(m.payload)
        if body.get("status") in ("done", "failed", "rejected", "expired", "cancelled"):
            self.replies.setdefault(body["id"], (time.monotonic(), body))


def operate(client: Requester, agent: AgentProcess, op_id: str, **args: Any) -> float:
    body = {"id": op_id, "operation": "model", "args": args}
    client.publish(f"{agent.prefix}/devices/{agent.device_id}/operate/tester",
                   json.dumps(body).encode())  # fmt: skip
    return time.monotonic()


def wait_state(client: Requester, agent: AgentProcess, op_id: str, flow: Flow | None = None,
               timeout: float = 180, final: bool = True,
               until: str | None = None) -> dict[str, Any]:  # fmt: skip
    topic = f"{agent.prefix}/devices/{agent.device_id}/operations/{op_id}"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for m in client.drain():
            if flow is not None:
                flow.take(m)
            if m.topic == topic and m.payload:
                state = json.loads(m.payload)
                message = (state.get("progress") or {}).get("message") or ""
                if until is not None and until in message:
                    return state
                if final and state["state"] in ("successful", "failed", "rejected"):
                    return state
        time.sleep(0.02)
    raise AssertionError(f"no state of {op_id} within {timeout}s")


@pytest.fixture
def ops_client(broker: LocalBroker, prefix: str) -> Iterator[Requester]:
    client = Requester("127.0.0.1", broker.port, f"ops-{prefix}")
    client.connect()
    client.subscribe(f"{prefix}/devices/+/operations/+")
    client.subscribe(f"{prefix}/replies/#")
    yield client
    client.close()


def test_switch_to_gemma_and_back_while_jobs_flow(
    start_agent: AgentFactory, ops_client: Requester
) -> None:
    agent = start_agent()
    figures = []
    with Flow(ops_client, agent) as flow:
        time.sleep(1.0)
        for op_id, name, expect in (("to-gemma", GEMMA, GEMMA), ("back", "auto", SMOL)):
            asked = operate(ops_client, agent, op_id, name=name)
            state = wait_state(ops_client, agent, op_id, flow)
            assert state["state"] == "successful", state
            assert state["result"]["model"] == expect and state["result"]["changed"]
            assert state["result"]["memory"]["plan"] == "beside"
            # the first job answered by the new model: the switch's time
            first = None
            end = time.monotonic() + 30
            while first is None and time.monotonic() < end:
                for m in ops_client.drain():
                    flow.take(m)
                answered = [at for at, body in flow.replies.values()
                            if body.get("model") and body["model"]["name"] == expect and at > asked]  # fmt: skip
                first = min(answered) if answered else None
                time.sleep(0.05)
            assert first is not None
            during = [flow.replies[j] for j, t in flow.sent.items() if asked <= t and j in flow.replies
                      and flow.replies[j][0] <= first]  # fmt: skip
            figures.append((name, first - asked, len(during), state["result"]["timings_s"]))
            time.sleep(1.0)
    flow.collect()
    assert set(flow.replies) == set(flow.sent)  # none lost
    bodies = [flow.replies[j][1] for j in sorted(flow.sent, key=flow.sent.get)]  # type: ignore[arg-type]
    assert {b["status"] for b in bodies} == {"done"}
    models = [b["model"]["name"] for b in bodies]
    # in order: SmolLM2, then Gemma, then SmolLM2 again (each job on one model, whole)
    changes = [m for i, m in enumerate(models) if i == 0 or m != models[i - 1]]
    assert changes == [SMOL, GEMMA, SMOL], changes
    latencies = [b["timings"]["total_ms"] for b in bodies]
    for name, seconds, answered, timings in figures:
        print(f"\nswitch to {name}: {seconds:.2f} s to the first job answered by it; "
              f"{answered} jobs answered meanwhile; steps {timings}")  # fmt: skip
    print(f"{len(bodies)} jobs, latency p50 {statistics.median(latencies):.0f} ms, "
          f"max {max(latencies):.0f} ms")  # fmt: skip


# ---- failures ---------------------------------------------------------------------------------


@pytest.fixture
def mirror(
    tmp_path: Path, catalog: Catalog, gemma_path: Path
) -> Iterator[tuple[Path, str, Faults]]:
    """A models.lock with three download-only copies of Gemma-3-270M: the right one, one
    pinned to a wrong hash, one whose served file is corrupt; and the server."""
    root = tmp_path / "served"
    root.mkdir()
    (root / "gemma-dl.gguf").symlink_to(gemma_path)
    (root / "gemma-badhash.gguf").symlink_to(gemma_path)
    corrupt = root / "gemma-corrupt.gguf"
    shutil.copyfile(gemma_path, corrupt)
    with corrupt.open("r+b") as fh:
        fh.seek(4096)
        fh.write(b"\x00" * 64)
    lock = json.loads((Path(__file__).parent.parent / "models.lock").read_text())
    smol = next(e for e in lock["models"] if e["name"] == SMOL)
    gemma = next(e for e in lock["models"] if e["name"] == GEMMA)
    with serve(root) as (base, faults):
        entries = [smol]
        for name, sha in (("gemma-dl", gemma["sha256"]), ("gemma-badhash", "0" * 64),
                          ("gemma-corrupt", gemma["sha256"])):  # fmt: skip
            entry = {k: v for k, v in gemma.items() if k != "bundled"}
            entries.append({**entry, "name": name, "file": f"{name}.gguf", "sha256": sha,
                            "url": f"{base}/{name}.gguf"})  # fmt: skip
        path = tmp_path / "models.lock"
        path.write_text(json.dumps({**lock, "models": entries}))
        yield path, base, faults


def lock_env(lock: Path) -> dict[str, str]:
    return {"EDGE_AGENT_MODEL__LOCK_FILE": str(lock), "EDGE_AGENT_RETRY_INSTANT": "1"}


def still_smol(client: Requester, agent: AgentProcess, tag: str) -> None:
    job = {"id": f"after-{tag}", "kind": "classify", "labels": ["a", "b"], "text": "x y z",
           "reply_to": f"{agent.prefix}/replies/after"}  # fmt: skip
    client.publish(
        f"{agent.prefix}/devices/{agent.device_id}/jobs/classify", json.dumps(job).encode()
    )
    reply = reply_for(client, f"after-{tag}")
    assert reply["status"] == "done" and reply["model"]["name"] == SMOL


@pytest.mark.parametrize(
    ("name", "code", "fault"),
    [
        ("gemma-badhash", "hash_mismatch", None),
        ("gemma-corrupt", "hash_mismatch", None),
        ("gemma-dl", "download_failed", "stops"),
        ("no-such-model", "unknown_model", None),
    ],
)
def test_a_switch_that_cannot_finish_leaves_the_old_model_serving(
    start_agent: AgentFactory, ops_client: Requester, mirror: tuple[Path, str, Faults],
    name: str, code: str, fault: str | None,
) -> None:  # fmt: skip
    lock, _base, faults = mirror
    if fault == "stops":  # 32 MiB, then the server sends nothing more, to every request
        faults.cut_after, faults.cut_always = 32 * 1024 * 1024, 0
    agent = start_agent(env=lock_env(lock))
    operate(ops_client, agent, f"fail-{name}", name=name, timeout_s=10)
    state = wait_state(ops_client, agent, f"fail-{name}")
    assert state["state"] == "failed" and state["error"]["code"] == code, state
    still_smol(ops_client, agent, name)
    assert not (agent.state_dir / "models" / f"{name}.gguf").exists()  # nothing half-there
    if fault == "stops":
        assert len(faults.requests) > 2  # tried again, resuming, before it gave up


def test_a_download_resumes_and_reports_progress(
    start_agent: AgentFactory, ops_client: Requester, mirror: tuple[Path, str, Faults]
) -> None:
    lock, _base, faults = mirror
    faults.cut_after = 64 * 1024 * 1024  # once: the retry resumes with Range
    agent = start_agent(env=lock_env(lock))
    operate(ops_client, agent, "dl", name="gemma-dl")
    seen: list[dict[str, Any]] = []
    end = time.monotonic() + 180
    state: dict[str, Any] = {}
    while time.monotonic() < end and state.get("state") not in ("successful", "failed"):
        for m in ops_client.drain():
            if m.topic.endswith("/operations/dl") and m.payload:
                state = json.loads(m.payload)
                seen.append(state)
        time.sleep(0.02)
    assert state["state"] == "successful", state
    assert state["result"]["downloaded_bytes"] > 0
    assert any(f"bytes={64 * 1024 * 1024}-" in r for r in faults.requests)
    totals = [(s["progress"] or {}).get("total") for s in seen if s["state"] == "executing"]
    assert state["result"]["memory"]["needed_bytes"] > 0 and any(totals)


def test_sigkill_during_the_load_comes_back_on_the_old_model(
    start_agent: AgentFactory, ops_client: Requester
) -> None:
    agent = start_agent()
    operate(ops_client, agent, "killed", name=GEMMA)
    wait_state(ops_client, agent, "killed", final=False, until="loading")
    agent.kill()
    agent.restart()
    state = wait_state(ops_client, agent, "killed")
    assert state["state"] == "failed" and state["error"]["code"] == "interrupted"
    still_smol(ops_client, agent, "killed")
    ledger = json.loads((agent.state_dir / "operations.json").read_text())
    assert ledger["model"] is None and ledger["mode"] == "serving"


def test_drain_first_switches_and_serves_again(
    start_agent: AgentFactory, ops_client: Requester
) -> None:
    agent = start_agent()
    operate(ops_client, agent, "df", name=GEMMA, plan="drain_first")
    state = wait_state(ops_client, agent, "df")
    assert state["state"] == "successful" and state["result"]["memory"]["plan"] == "drain_first"
    job = {"id": "after-df", "kind": "classify", "labels": ["a", "b"], "text": "x",
           "reply_to": f"{agent.prefix}/replies/after"}  # fmt: skip
    ops_client.publish(
        f"{agent.prefix}/devices/{agent.device_id}/jobs/classify", json.dumps(job).encode()
    )
    reply = reply_for(ops_client, "after-df")
    assert reply["status"] == "done" and reply["model"]["name"] == GEMMA
    # kept: a restart comes back on Gemma
    agent.restart()
    job["id"] = "after-restart"
    ops_client.publish(
        f"{agent.prefix}/devices/{agent.device_id}/jobs/classify", json.dumps(job).encode()
    )
    assert reply_for(ops_client, "after-restart")["model"]["name"] == GEMMA


def test_a_staged_switch_that_fails_on_a_board_rolls_back_the_boards_it_reached(
    broker: LocalBroker, prefix: str, start_agent: AgentFactory, ops_client: Requester,
    mirror: tuple[Path, str, Faults], tmp_path: Path,
) -> None:  # fmt: skip
    """The second board's models.lock pins another hash for the same entry: its switch
    fails; the first board, switched and gated already, is switched back."""
    lock, _base, _faults = mirror
    wrong = json.loads(lock.read_text())
    for entry in wrong["models"]:
        if entry["name"] == "gemma-dl":
            entry["sha256"] = "1" * 64
    other = tmp_path / "other.lock"
    other.write_text(json.dumps(wrong))
    a = start_agent(device_id=f"a-{prefix}", env=lock_env(lock))
    b = start_agent(device_id=f"b-{prefix}", env=lock_env(other))
    code, result = ops_cli(broker, prefix, "model", "gemma-dl", "--device", a.device_id,
                           "--device", b.device_id, "--rollback", timeout=300)  # fmt: skip
    assert code == 1
    rows = by_device(result)
    assert rows[a.device_id]["state"] == "successful" and rows[a.device_id]["gate_ms"] is not None
    assert rows[a.device_id]["rollback"] == "successful"
    assert rows[b.device_id]["result"] == "failed"
    assert rows[b.device_id]["error"]["code"] == "hash_mismatch"
    assert rows[b.device_id]["rollback"] is None  # it never left its model
    still_smol(ops_client, a, "rolled-back")
    still_smol(ops_client, b, "never-left")


def test_two_switches_at_once_run_one_after_the_other(
    start_agent: AgentFactory, ops_client: Requester
) -> None:
    agent = start_agent()
    operate(ops_client, agent, "first", name=GEMMA)
    operate(ops_client, agent, "second", name="auto")
    first = wait_state(ops_client, agent, "first")
    second = wait_state(ops_client, agent, "second")
    assert first["state"] == second["state"] == "successful"
    assert first["result"]["model"] == GEMMA and second["result"]["previous"] == GEMMA
    still_smol(ops_client, agent, "two")
