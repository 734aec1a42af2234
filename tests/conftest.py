"""Shared fixtures: one real Mosquitto and one loaded model per test session.

Nothing here is mocked at the boundaries: the broker is Debian's mosquitto on a free
port, the models are the real GGUF files from the PyPI packages, and end-to-end tests run
the agent as a subprocess exactly as systemd would.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import Requester
from edge_agent.core.catalog import Catalog
from tests.harness.clients import (  # noqa: F401 - re-exported for fixtures' users
    EVAL_DIR,
    AgentFactory,
    NotifySocket,
    eval_rows,
    reply_for,
)
from tests.harness.process import AgentProcess, start_agent_process

ROOT = Path(__file__).resolve().parent.parent


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
