"""The model store against a real local HTTP server: resume, corruption, pins, gc, lock."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.adapters.store import PARTIAL_DIR, fetch, load_lock, plan_gc, record_loaded, verify
from edge_agent.core.catalog import ModelEntry
from edge_agent.core.errors import ChecksumMismatch, StoreError, UnpinnedModel
from tests.harness.httpserver import serve

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)  # a few MiB so the transfer spans many chunks
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def entry(
    url: str | None,
    sha256: str | None = DIGEST,
    size: int | None = len(PAYLOAD),
    file: str = "tiny.gguf",
) -> ModelEntry:
    return ModelEntry(
        name="tiny-q8_0",
        family="smollm2",
        model="Tiny",
        params=1000,
        quant="Q8_0",
        file=file,
        url=url,
        size=size,
        sha256=sha256,
        license="MIT",
        context_length=512,
        architecture="llama",
        n_vocab=100,
        n_layer=1,
        kv_bytes_per_token=64,
        base_score=1.0,
        quality=1.0,
    )


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "www"
    root.mkdir()
    (root / "tiny.gguf").write_bytes(PAYLOAD)
    with serve(root) as (base, faults):
        yield base, faults


def test_fetch_verifies_and_moves_into_place(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    base, _ = served
    seen: list[int] = []
    got = fetch(
        entry(f"{base}/tiny.gguf"), tmp_path / "models", progress=lambda done, _t: seen.append(done)
    )
    assert got.path == tmp_path / "models" / "tiny.gguf"
    assert got.path.read_bytes() == PAYLOAD
    assert got.sha256 == DIGEST
    assert seen[-1] == len(PAYLOAD)
    assert not any((tmp_path / "models" / PARTIAL_DIR).iterdir())


def test_interrupted_download_resumes_with_range(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    base, faults = served
    faults.cut_after = 1024 * 1024 + 7
    models = tmp_path / "models"
    with pytest.raises(StoreError, match=r"connection closed|fetch"):
        fetch(entry(f"{base}/tiny.gguf"), models, retry_s=0)  # no retry: the next run resumes
    partial = models / PARTIAL_DIR / "tiny.gguf.part"
    assert partial.stat().st_size == 1024 * 1024 + 7
    assert not (models / "tiny.gguf").exists()  # nothing half-written where the loader looks
    got = fetch(entry(f"{base}/tiny.gguf"), models)
    assert got.resumed_from == 1024 * 1024 + 7
    assert got.downloaded_bytes == len(PAYLOAD) - (1024 * 1024 + 7)
    assert faults.requests[-1] == f"GET /tiny.gguf bytes={1024 * 1024 + 7}-"
    assert got.path.read_bytes() == PAYLOAD


def test_a_dropped_connection_is_resumed_by_the_retry(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    """One fetch: the connection drops after 1 MiB, the retry (tenacity, waits removed)
    asks for the rest with Range, and the file is whole."""
    from edge_agent.core import retry

    base, faults = served
    faults.cut_after = 1024 * 1024 + 7
    retry.instant(True)
    try:
        got = fetch(entry(f"{base}/tiny.gguf"), tmp_path / "models")
    finally:
        retry.instant(False)
    assert faults.requests[-1] == f"GET /tiny.gguf bytes={1024 * 1024 + 7}-"
    assert got.path.read_bytes() == PAYLOAD


def test_a_server_that_offers_another_size_is_refused_at_once(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    base, faults = served
    big = entry(f"{base}/tiny.gguf", size=len(PAYLOAD) - 1)
    with pytest.raises(StoreError, match="offers"):
        fetch(big, tmp_path / "models")
    assert len(faults.requests) == 1  # not tried again: it will not change its mind


def test_a_server_that_hangs_is_given_up_on_in_the_time_allowed(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    base, faults = served
    faults.hang_s = 3.0
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="timed out"):
        fetch(entry(f"{base}/tiny.gguf"), tmp_path / "models", timeout=0.3, retry_s=1.0)
    assert time.monotonic() - t0 < 3.0  # each attempt times out; the retries stop by time
    assert len(faults.requests) >= 2


def test_server_that_ignores_range_restarts_cleanly(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    base, faults = served
    faults.cut_after = 500_000
    models = tmp_path / "models"
    with pytest.raises(StoreError):
        fetch(entry(f"{base}/tiny.gguf"), models, retry_s=0)
    faults.ignore_range = True
    got = fetch(entry(f"{base}/tiny.gguf"), models)
    assert got.path.read_bytes() == PAYLOAD


def test_corrupted_download_is_rejected_and_not_loaded(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    base, _ = served
    wrong = entry(f"{base}/tiny.gguf", sha256="ab" * 32)
    with pytest.raises(StoreError, match="sha256"):
        fetch(wrong, tmp_path / "models")
    assert not (tmp_path / "models" / "tiny.gguf").exists()
    assert not (tmp_path / "models" / PARTIAL_DIR / "tiny.gguf.part").exists()


def test_corrupted_file_in_place_is_refused_by_verify(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 0xFF]))
    with pytest.raises(ChecksumMismatch, match="differs from the pin"):
        verify(path, entry(None), allow_unpinned=False)
    path.write_bytes(PAYLOAD + b"x")
    with pytest.raises(ChecksumMismatch, match="bytes"):
        verify(path, entry(None), allow_unpinned=False)


def test_unpinned_entry_is_refused_before_downloading(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    base, faults = served
    with pytest.raises(UnpinnedModel, match="refusing to download"):
        fetch(entry(f"{base}/tiny.gguf", sha256=None), tmp_path / "models")
    assert faults.requests == []
    with pytest.raises(UnpinnedModel):
        verify(tmp_path, entry(None, sha256=None), allow_unpinned=False)
    got = fetch(entry(f"{base}/tiny.gguf", sha256=None), tmp_path / "models", allow_unpinned=True)
    assert got.sha256 == DIGEST


def test_mirror_comes_first_and_the_url_is_the_fallback(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    base, faults = served
    got = fetch(entry(f"{base}/tiny.gguf"), tmp_path / "m1", mirror=f"{base}/missing-dir")
    assert got.source == f"{base}/tiny.gguf"
    assert faults.requests[0] == "GET /missing-dir/tiny.gguf"
    local = tmp_path / "airgap"
    local.mkdir()
    (local / "tiny.gguf").write_bytes(PAYLOAD)
    got = fetch(entry(None), tmp_path / "m2", mirror=str(local))
    assert got.source == str(local / "tiny.gguf")
    assert got.path.read_bytes() == PAYLOAD


def test_not_enough_disk_is_said_before_downloading(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    base, faults = served
    huge = entry(f"{base}/tiny.gguf", size=1 << 50)
    with pytest.raises(StoreError, match="not enough disk"):
        fetch(huge, tmp_path / "models")
    assert faults.requests == []


def test_gc_keeps_current_and_previous(tmp_path: Path) -> None:
    catalog = load_lock(ROOT / "models.lock")
    models = tmp_path / "models"
    models.mkdir()
    names = ["gemma-3-1b-it-q4_k_m", "gemma-3-1b-it-q8_0", "phi-4-mini-instruct-q3_k_m"]
    for name in names:
        e = catalog.get(name)
        assert e is not None
        (models / e.file).write_bytes(b"x")
    (models / PARTIAL_DIR).mkdir()
    (models / PARTIAL_DIR / "old.part").write_bytes(b"xx")
    record_loaded(models, names[0])
    record_loaded(models, names[1])
    removals = plan_gc(catalog, models, ["gemma-3-1b-it-q8_0", "gemma-3-1b-it-q4_k_m"])
    removed = sorted(r.path.name for r in removals)
    assert removed == ["microsoft_Phi-4-mini-instruct-Q3_K_M.gguf", "old.part"]


def edge_agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_models_lock_pins_an_entry_and_verify_uses_the_pin(tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    base, _ = served
    lock = json.loads((ROOT / "models.lock").read_text())
    lock["models"].append(
        entry(f"{base}/tiny.gguf", sha256=None, size=None).model_dump(exclude_none=True)
        | {"approx_size": 3_000_000}
    )
    lock_path = tmp_path / "models.lock"
    lock_path.write_text(json.dumps(lock))
    result = edge_agent("models", "lock", f"{base}/tiny.gguf", "--lock", str(lock_path))
    assert result.returncode == 0, result.stderr
    pinned = load_lock(lock_path).get("tiny-q8_0")
    assert pinned is not None
    assert (pinned.sha256, pinned.size) == (DIGEST, len(PAYLOAD))
    env = {
        "EDGE_AGENT_MODEL__LOCK_FILE": str(lock_path),
        "EDGE_AGENT_STATE_DIR": str(tmp_path / "state"),
    }
    fetched = edge_agent("models", "fetch", "tiny-q8_0", env=env)
    assert fetched.returncode == 0, fetched.stderr
    good = edge_agent("models", "verify", env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    stored = tmp_path / "state" / "models" / "tiny.gguf"
    stored.write_bytes(PAYLOAD[::-1])
    bad = edge_agent("models", "verify", str(stored), env=env)
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout
    listing = edge_agent("models", "list", env=env)
    assert listing.returncode == 0
    assert "tiny-q8_0" in listing.stdout
