"""Runs one operation over many devices in stages (`edge-agent ops`; the staging rules
are core/campaign.py, the operations channel docs/operations.md).

For each stage: publish the request to every device of the stage, wait for each one's
final state (the retained state topic), then send each successful device a gate job on
its own topic and wait for a `done` reply. The waits are tenacity policies (jittered,
stopped by time); each attempt waits on the messages themselves, so a run is as quick as
the devices are.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from edge_agent.core.campaign import NO_GATE, Outcome, stage_failed, stages, to_roll_back
from edge_agent.core.operations import FINAL
from edge_agent.core.protocol import Topics
from edge_agent.core.retry import policy

GATE_LABELS = ["yes", "no"]
ATTEMPT_WAIT_S = 0.5  # one attempt of a wait listens this long for news


class Client(Protocol):
    v5: bool

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> None: ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        expiry_s: int | None = None,
    ) -> None: ...


def new_op_id() -> str:
    """Unique per run: the same id goes to every device (unique per device is enough)."""
    return f"ops-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


class Campaign:
    def __init__(
        self,
        client: Client,
        topics: Topics,
        *,
        operator: str,
        operation: str,
        args: dict[str, Any],
        op_id: str | None = None,
        gate: bool = True,
        timeout_s: float = 600.0,
        gate_timeout_s: float = 60.0,
        fraction: float = 0.25,
        rollback: bool = False,
        on_change: Callable[[list[Outcome]], None] = lambda _o: None,
    ) -> None:
        self.client = client
        self.topics = topics
        self.operator = operator
        self.operation = operation
        self.args = args
        self.op_id = op_id or new_op_id()
        self.gate = gate and operation not in NO_GATE
        self.timeout_s = timeout_s
        self.gate_timeout_s = gate_timeout_s
        self.fraction = fraction
        self.rollback = rollback and operation == "model"
        self.on_change = on_change
        self._rollbacks: dict[str, str] = {}  # device -> the rollback's last state
        self.outcomes: dict[str, Outcome] = {}
        self.logs: dict[str, dict[int, list[str]]] = {}
        self._gate_replies: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()

    @property
    def rollback_id(self) -> str:
        return f"{self.op_id}-rollback"

    @property
    def reply_topic(self) -> str:
        return self.topics.replies(self.operator, self.op_id)

    def listen(self) -> None:
        """Subscribe to this run's states, log chunks and gate replies (before `run`)."""
        any_device = self.topics.of_device("+")
        self.client.subscribe(any_device.operation(self.op_id))
        if self.operation == "logs":
            self.client.subscribe(any_device.operation_logs(self.op_id))
        if self.rollback:
            self.client.subscribe(any_device.operation(self.rollback_id))
        self.client.subscribe(self.reply_topic)

    # ---- the client's thread --------------------------------------------------------

    def feed(self, topic: str, payload: bytes) -> None:
        """One message the client received (states, log chunks, gate replies)."""
        try:
            body = json.loads(payload) if payload else None
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        with self._cond:
            if topic == self.reply_topic:
                if isinstance(body.get("id"), str):
                    self._gate_replies[body["id"]] = body
            else:
                self._state_or_chunk(topic, body)
            self._cond.notify_all()

    def _state_or_chunk(self, topic: str, body: dict[str, Any]) -> None:
        levels = topic.split("/")
        if len(levels) < 5 or levels[-1] == "":
            return
        device = levels[2]
        if self.rollback and body.get("id") == self.rollback_id:
            if isinstance(body.get("state"), str):
                self._rollbacks[device] = body["state"]
            return
        if body.get("id") != self.op_id:
            return
        if levels[-1] == "logs" and isinstance(body.get("lines"), list):
            seq = body.get("seq")
            if isinstance(seq, int):
                self.logs.setdefault(device, {})[seq] = [str(x) for x in body["lines"]]
            return
        outcome = self.outcomes.get(device)
        state = body.get("state")
        if outcome is None or outcome.result is not None or not isinstance(state, str):
            return
        outcome.state = state
        if not outcome.history or outcome.history[-1] != state:
            outcome.history.append(state)
        progress = body.get("progress")
        outcome.progress = progress.get("message") if isinstance(progress, dict) else None
        outcome.error = body.get("error") if isinstance(body.get("error"), dict) else None
        outcome.op_result = body.get("result") if isinstance(body.get("result"), dict) else None

    # ---- the run --------------------------------------------------------------------

    def run(self, devices: Sequence[str]) -> list[Outcome]:
        plan = stages(devices, self.fraction)
        with self._cond:
            for number, stage in enumerate(plan, start=1):
                for device in stage:
                    self.outcomes[device] = Outcome(device, number)
        self._changed()
        for stage in plan:
            self._run_stage(stage)
            if stage_failed([self.outcomes[d] for d in stage]):
                if self.rollback:
                    self._roll_back()
                break
        with self._cond:
            for outcome in self.outcomes.values():
                if outcome.result is None:
                    outcome.result = "skipped"
        self._changed()
        return list(self.outcomes.values())

    def _run_stage(self, stage: list[str]) -> None:
        body = json.dumps({"id": self.op_id, "operation": self.operation, "args": self.args})
        for device in stage:
            self.client.publish(
                self.topics.of_device(device).operate(self.operator),
                body.encode(),
                # a request for a device that is away waits for it this long, no longer
                expiry_s=int(self.timeout_s) if self.client.v5 else None,
            )
        self._changed()

        def finished() -> bool:
            with self._cond:
                return all(self.outcomes[d].state in FINAL for d in stage)

        policy(stop_after_s=self.timeout_s, first_s=0.0, max_s=0.0,
               until=bool)(self._wait_for, finished)  # fmt: skip
        with self._cond:
            for device in stage:
                outcome = self.outcomes[device]
                if outcome.state in FINAL:
                    if outcome.state != "successful" or not self.gate:
                        outcome.result = outcome.state  # type: ignore[assignment]
                else:
                    outcome.result = "timeout"
        self._changed()
        if self.gate:
            for device in stage:
                if self.outcomes[device].result is None:
                    self._gate(device)
                    self._changed()

    def _roll_back(self) -> None:
        """The run stopped: every board it switched goes back to the model it had."""
        with self._cond:
            back = to_roll_back(list(self.outcomes.values()))
        for device, model in back.items():
            body = {"id": self.rollback_id, "operation": "model", "args": {"name": model}}
            self.client.publish(self.topics.of_device(device).operate(self.operator),
                                json.dumps(body).encode())  # fmt: skip

        def finished() -> bool:
            with self._cond:
                return all(self._rollbacks.get(d) in FINAL for d in back)

        policy(stop_after_s=self.timeout_s, first_s=0.0, max_s=0.0,
               until=bool)(self._wait_for, finished)  # fmt: skip
        with self._cond:
            for device in back:
                state = self._rollbacks.get(device)
                self.outcomes[device].rollback = state if state in FINAL else "timeout"
        self._changed()

    def _gate(self, device: str) -> None:
        """A classify job on the device's own topic must be answered `done`; `overloaded`
        (a busy board) and silence are tried again, with backoff, until gate_timeout_s."""
        outcome = self.outcomes[device]
        t0 = time.monotonic()
        attempt = [0]

        def one() -> dict[str, Any] | None:
            attempt[0] += 1
            job_id = f"gate-{self.op_id}-{device}-{attempt[0]}"
            job = {
                "id": job_id,
                "kind": "classify",
                "text": f"edge-agent ops gate after operation {self.operation}: are you there?",
                "labels": GATE_LABELS,
                "ttl_ms": int(self.gate_timeout_s * 1000),
                # in the payload too: an MQTT 3.1.1 board never sees a Response Topic
                "reply_to": self.reply_topic,
            }
            topic = self.topics.of_device(device).device_jobs("classify")
            if self.client.v5:
                self.client.publish(topic, json.dumps(job).encode(),
                                    response_topic=self.reply_topic)  # fmt: skip
            else:
                self.client.publish(topic, json.dumps(job).encode())
            deadline = time.monotonic() + min(30.0, self.gate_timeout_s)
            with self._cond:
                while job_id not in self._gate_replies and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                return self._gate_replies.get(job_id)

        def answered(reply: dict[str, Any] | None) -> bool:
            if reply is None:
                return False
            error = reply.get("error") or {}
            return not (reply.get("status") == "rejected" and error.get("code") == "overloaded")

        reply = policy(stop_after_s=self.gate_timeout_s, first_s=0.5, max_s=5.0,
                       until=answered)(one)  # fmt: skip
        with self._cond:
            if reply is not None and reply.get("status") == "done":
                outcome.result = "successful"
                outcome.gate_ms = round((time.monotonic() - t0) * 1000, 1)
            else:
                outcome.result = "gate_failed"
                outcome.error = {
                    "code": "gate_failed",
                    "message": "no answer to the gate job"
                    if reply is None
                    else f"the gate job was answered {reply.get('status')}: {reply.get('error')}",
                }

    def _wait_for(self, done: Callable[[], bool]) -> bool:
        """One attempt of a wait: true at once if done, else after news or a moment."""
        if done():
            return True
        with self._cond:
            self._cond.wait(ATTEMPT_WAIT_S)
        self._changed()
        return done()

    def log_lines(self, device: str) -> list[str]:
        chunks = self.logs.get(device, {})
        return [line for seq in sorted(chunks) for line in chunks[seq]]

    def _changed(self) -> None:
        with self._cond:
            snapshot = list(self.outcomes.values())
        self.on_change(snapshot)
