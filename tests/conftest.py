"""Shared fixtures: one real Mosquitto and one loaded model per test session.

Nothing here is mocked at the boundaries: the broker is Debian's mosquitto on a free
port, the models are the real GGUF files from the PyPI packages, and end-to-end tests run
the agent as a subprocess exactly as systemd would.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import Incoming, Requester
from edge_agent.core.catalog import Catalog
from tests.harness.process import AgentProcess, start_agent_process

ROOT = Path(__file__).resolve().parent.parent
EVAL_DIR = ROOT / "tests" / "data" / "eval"  # loghub rows and hand-written ones; attribution kept


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    from edge_agent.adapters.store import load_lock
    from edge_agent.service.app import default_lock_path

    return load_lock(default_lock_path())


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where chunked bundled models are assembled, shared across runs to save time."""
    path = Path(
        os.environ.get(
            "EDGE_AGENT_TEST_MODEL_DIR", Path.home() / ".cache" / "edge-agent-test-models"
        )
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def smollm2_path(catalog: Catalog, model_cache: Path) -> Path:
    from edge_agent.adapters.store import locate, verify

    entry = catalog.get("smollm2-135m-instruct-q4_1")
    assert entry is not None
    path = locate(entry, model_cache)
    verify(path, entry, allow_unpinned=False)
    return path


@pytest.fixture(scope="session")
def gemma_path(catalog: Catalog, model_cache: Path) -> Path:
    from edge_agent.adapters.store import locate, verify

    entry = catalog.get("gemma-3-270m-q4_k_m")
    assert entry is not None
    path = locate(entry, model_cache)
    verify(path, entry, allow_unpinned=False)
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> Iterator[Any]:
    """The bundled model, loaded once for every engine test."""
    from edge_agent.adapters.engine import EngineConfig, LlamaEngine

    engine = LlamaEngine(smollm2_path, EngineConfig(n_threads=2, n_threads_batch=2, n_ctx=2048))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def gemma(gemma_path: Path) -> Iterator[Any]:
    from edge_agent.adapters.engine import EngineConfig, LlamaEngine

    engine = LlamaEngine(gemma_path, EngineConfig(n_threads=2, n_threads_batch=2, n_ctx=1024))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """One Mosquitto for the session; tests use distinct topic prefixes to stay apart."""
    with LocalBroker(workdir=tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests sharing the broker never see each other."""
    return f"t{uuid.uuid4().hex[:10]}"


AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def start_agent(broker: LocalBroker, prefix: str, tmp_path: Path) -> Iterator[AgentFactory]:
    started: list[AgentProcess] = []

    def factory(**kwargs: Any) -> AgentProcess:
        kwargs.setdefault("state_dir", tmp_path / f"state{len(started)}")
        url = kwargs.pop("broker_url", broker.url)
        agent = start_agent_process(url, kwargs.pop("prefix", prefix), **kwargs)
        started.append(agent)
        return agent

    yield factory
    for agent in started:
        agent.kill()


@pytest.fixture
def requester(broker: LocalBroker) -> Iterator[Requester]:
    client = Requester("127.0.0.1", broker.port, f"req-{uuid.uuid4().hex[:8]}")
    client.connect()
    yield client
    client.close()


def reply_for(client: Requester, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """The final reply to `job_id` (progress messages are skipped)."""
    final = {"done", "failed", "rejected", "expired", "cancelled"}

    def match(msg: Incoming) -> bool:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return False
        return isinstance(body, dict) and body.get("id") == job_id and body.get("status") in final

    msg = client.wait_for(match, timeout)
    assert msg is not None, f"no reply to {job_id} within {timeout}s"
    body: dict[str, Any] = json.loads(msg.payload)
    body["_topic"] = msg.topic
    body["_correlation"] = msg.correlation_data
    return body


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


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(str(tmp_path / "notify.sock"))
    yield receiver
    receiver.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--aarch64",
        action="store_true",
        help="run the aarch64 cross-build and qemu-user tests (make test-aarch64)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tests/test_aarch64.py takes 18-27 minutes with cold caches (a debootstrap and a
    # rollout under emulation, a cross-build of llama.cpp), 10 warm: its own make target,
    # not part of `make test`.
    if config.getoption("--aarch64"):
        return
    skip = pytest.mark.skip(reason="the aarch64 build-and-run is `make test-aarch64` (--aarch64)")
    for item in items:
        if "aarch64" in item.keywords:
            item.add_marker(skip)
