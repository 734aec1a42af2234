"""What tests share to talk to agents: the final reply to a job, the eval rows, a fake
of systemd's notify socket, and the agent factory's type. The fixtures that hand them out
live in tests/conftest.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.adapters.mqtt import Incoming, Requester
from tests.harness.process import AgentProcess

ROOT = Path(__file__).resolve().parent.parent.parent
EVAL_DIR = ROOT / "tests" / "data" / "eval"  # loghub rows and hand-written ones; attribution kept

AgentFactory = Callable[..., AgentProcess]


FINAL = {"done", "failed", "rejected", "expired", "cancelled"}


def final_reply_id(msg: Incoming) -> str | None:
    """The job id `msg` is the final reply to, or None (progress, or not a reply)."""
    try:
        body = json.loads(msg.payload)
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("status") in FINAL and isinstance(body.get("id"), str):
        return body["id"]
    return None


def _reply_body(msg: Incoming) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(msg.payload)
    body["_topic"] = msg.topic
    body["_correlation"] = msg.correlation_data
    return body


def reply_for(client: Requester, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """The final reply to `job_id` (progress messages are skipped)."""
    msg = client.wait_for(lambda m: final_reply_id(m) == job_id, timeout)
    assert msg is not None, f"no reply to {job_id} within {timeout}s"
    return _reply_body(msg)


def replies_retrying_overloaded(
    client: Requester, ids: list[str], send: Callable[[str], None], timeout: float = 300,
    tries: int = 60,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Send each job (`send(id)`) and wait for every final reply, as sensors would: a job
    told `overloaded` is sent again after its own retry_after_ms, each on its own clock,
    at most `tries` times more (then that reply is the answer). The bound is the deadline
    more than the tries: beside a CPU hog a requester's share stayed full through five
    retries 1-2 s apart (jobs took seconds each), which is the agent being fair, not
    a job lost."""
    for job_id in ids:
        send(job_id)
    replies: dict[str, dict[str, Any]] = {}
    retry_at: dict[str, float] = {}
    retried = dict.fromkeys(ids, 0)
    deadline = time.monotonic() + timeout
    while len(replies) < len(ids):
        now = time.monotonic()
        assert now < deadline, f"no final reply to {sorted(set(ids) - set(replies))}"
        for job_id in [j for j, at in retry_at.items() if at <= now]:
            del retry_at[job_id]
            send(job_id)
        waiting = {j for j in ids if j not in replies and j not in retry_at}
        msg = client.wait_for(lambda m, waiting=waiting: final_reply_id(m) in waiting, 0.2)
        if msg is None:
            continue
        body = _reply_body(msg)
        error = body.get("error") or {}
        if error.get("code") == "overloaded" and retried[body["id"]] < tries:
            retried[body["id"]] += 1
            retry_at[body["id"]] = time.monotonic() + error["retry_after_ms"] / 1000
        else:
            replies[body["id"]] = body
    return replies


def eval_rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (EVAL_DIR / name).read_text().splitlines() if line.strip()]


class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET, as systemd would hold it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def fields(self) -> list[dict[str, str]]:
        with self._lock:
            return [f for _, f in self.messages]

    def count(self, key: str, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for t, f in self.messages if key in f and t >= since)

    def wait_count(self, key: str, count: int, since: float = 0.0, timeout: float = 10) -> None:
        """Until `count` messages carrying `key` arrived after `since` (time.monotonic())."""
        deadline = time.monotonic() + timeout
        while self.count(key, since) < count:
            assert time.monotonic() < deadline, f"fewer than {count} {key} within {timeout}s"
            time.sleep(0.02)

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for f in self.fields():
                if key in f and (value is None or value in f[key]):
                    return f
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value or '*'} within {timeout}s; got {self.fields()}")

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
        self._thread.join(2)
