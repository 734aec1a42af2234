"""Shared fixtures: one real Mosquitto and one loaded model per test session.

Nothing here is mocked at the boundaries: the broker is Debian's mosquitto on a free
port, the models are the real GGUF files from the PyPI packages, and end-to-end tests run
the agent as a subprocess exactly as systemd would.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.harness import AgentProcess, start_agent_process
from edge_agent.broker import LocalBroker
from edge_agent.catalog import Catalog
from edge_agent.mqtt import Incoming, Requester

ROOT = Path(__file__).resolve().parent.parent
EVAL_DIR = ROOT / "tests" / "data" / "eval"  # a copy of ../shared/eval, attribution kept


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    from edge_agent.app import default_lock_path
    from edge_agent.catalog import load_lock

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
    from edge_agent.store import locate, verify

    entry = catalog.get("smollm2-135m-instruct-q4_1")
    assert entry is not None
    path = locate(entry, model_cache)
    verify(path, entry, allow_unpinned=False)
    return path


@pytest.fixture(scope="session")
def gemma_path(catalog: Catalog, model_cache: Path) -> Path:
    from edge_agent.store import locate, verify

    entry = catalog.get("gemma-3-270m-q4_k_m")
    assert entry is not None
    path = locate(entry, model_cache)
    verify(path, entry, allow_unpinned=False)
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> Iterator[Any]:
    """The bundled model, loaded once for every engine test."""
    from edge_agent.engine import EngineConfig, LlamaEngine

    engine = LlamaEngine(smollm2_path, EngineConfig(n_threads=2, n_threads_batch=2, n_ctx=2048))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def gemma(gemma_path: Path) -> Iterator[Any]:
    from edge_agent.engine import EngineConfig, LlamaEngine

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
