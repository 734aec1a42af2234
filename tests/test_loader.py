"""Start-up model choice: the fallback chain on real files, and the RAM estimate against the
resident memory measured after loading each bundled model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_agent.adapters.probe import board_facts
from edge_agent.adapters.settings import load_settings
from edge_agent.adapters.store import load_lock
from edge_agent.core.catalog import DEFAULT_MODEL, Runtime, estimate, kv_sequences
from edge_agent.core.errors import ModelError
from edge_agent.service.app import open_engine
from edge_agent.service.loader import load_model

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parent.parent


def fake_entry(
    name: str, file: str, data: bytes | None, pinned: bool = True, sha: str | None = None
) -> dict[str, object]:
    body: dict[str, object] = {
        "name": name,
        "family": "smollm2",
        "model": name,
        "params": 1_000_000,
        "quant": "Q8_0",
        "file": file,
        "license": "MIT",
        "context_length": 512,
        "architecture": "llama",
        "n_vocab": 1000,
        "n_layer": 1,
        "kv_bytes_per_token": 64,
        "base_score": 90.0,
        "quality": 88.92,
        "approx_size": 1000,
    }
    if pinned:
        body["sha256"] = sha or hashlib.sha256(data or b"").hexdigest()
    return body


def unknown_arch_gguf(path: Path) -> bytes:
    writer = gguf.GGUFWriter(str(path), "frobnicate")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_fallback_chain_skips_every_bad_file_and_says_why(tmp_path: Path) -> None:
    models = tmp_path / "state" / "models"
    models.mkdir(parents=True)
    (models / "corrupt.gguf").write_bytes(b"not what was pinned")
    (models / "unpinned.gguf").write_bytes(b"anything")
    (models / "notgguf.gguf").write_bytes(b"GGUF? no" * 100)
    alien = unknown_arch_gguf(models / "alien.gguf")
    lock = json.loads((ROOT / "models.lock").read_text())
    lock["models"] = [
        fake_entry("missing", "missing.gguf", b""),
        fake_entry("corrupt", "corrupt.gguf", b"x", sha="00" * 32),
        fake_entry("unpinned", "unpinned.gguf", None, pinned=False),
        fake_entry("notgguf", "notgguf.gguf", (models / "notgguf.gguf").read_bytes()),
        fake_entry("alien", "alien.gguf", alien),
        *[m for m in lock["models"] if m["name"] == DEFAULT_MODEL],
    ]
    lock_path = tmp_path / "models.lock"
    lock_path.write_text(json.dumps(lock))
    settings = load_settings(
        None,
        state_dir=tmp_path / "state",
        model={"lock_file": lock_path},
    )
    catalog = load_lock(lock_path)
    loaded = load_model(
        settings, catalog, board_facts(), lambda p: open_engine(p, settings, board_facts())
    )
    try:
        assert loaded.entry is not None and loaded.entry.name == DEFAULT_MODEL
        reasons = {s.name: s.reason for s in loaded.skipped}
        assert reasons["missing"] == "not downloaded"
        assert "differs from the pin" in reasons["corrupt"]
        assert "no sha256" in reasons["unpinned"]
        assert "could not load" in reasons["notgguf"]
        assert "could not load" in reasons["alien"]
        assert "after 5 candidate(s)" in loaded.reason
        report = loaded.report()
        assert report["name"] == DEFAULT_MODEL and len(report["skipped"]) == 5
        assert json.loads((models / ".selection.json").read_text())["current"] == DEFAULT_MODEL
    finally:
        loaded.engine.close()


def test_nothing_loadable_is_a_clear_error(tmp_path: Path) -> None:
    lock = {"version": 1, "models": [fake_entry(DEFAULT_MODEL, "x.gguf", b"")]}
    lock_path = tmp_path / "models.lock"
    lock_path.write_text(json.dumps(lock))
    settings = load_settings(None, state_dir=tmp_path, model={"lock_file": lock_path})
    with pytest.raises(ModelError, match="no model could be loaded"):
        load_model(
            settings,
            load_lock(lock_path),
            board_facts(),
            lambda p: open_engine(p, settings, board_facts()),
        )


MEASURE = """
import json, sys, psutil
from pathlib import Path
from edge_agent.service.app import open_engine
from edge_agent.core.constraint import JsonConstraint
from edge_agent.adapters.probe import board_facts
from edge_agent.core.prompt import classify_plan, extract_plan
from edge_agent.core.schema import SchemaLimits, compile_schema, schema_for_fields
from edge_agent.adapters.settings import load_settings
import edge_agent.service.app, edge_agent.adapters.mqtt, edge_agent.service.worker  # what the running agent imports
settings = load_settings(None, model={"n_threads": 2})
engine = open_engine(Path(sys.argv[1]), settings, board_facts())
labels = ["normal", "warning", "critical_temperature_alarm"]
engine.classify(classify_plan(labels, None, []), "Boiler outlet at 96 C. " * 20, labels)
schema = schema_for_fields({"device": "string", "value": "number"})
engine.extract(extract_plan(compile_schema(schema, SchemaLimits()), None, []), "Sensor TS-1 reads 21.7 C. " * 10,
               JsonConstraint(compile_schema(schema, SchemaLimits())), 64)
print(json.dumps({"rss": psutil.Process().memory_info().rss}))
"""


@pytest.mark.parametrize("name", [DEFAULT_MODEL, "gemma-3-270m-q4_k_m"])
def test_estimate_is_within_20_percent_of_measured_rss(
    name: str, smollm2_path: Path, gemma_path: Path
) -> None:
    catalog = load_lock(ROOT / "models.lock")
    entry = catalog.get(name)
    assert entry is not None
    path = smollm2_path if name == DEFAULT_MODEL else gemma_path
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "EDGE_AGENT_STATE_DIR": "/tmp"},
    )
    assert result.returncode == 0, result.stderr
    rss = json.loads(result.stdout.strip().splitlines()[-1])["rss"]
    settings = load_settings(None)
    est = estimate(
        entry,
        Runtime(
            n_ctx=settings.n_ctx,
            n_ubatch=settings.model.n_ubatch,
            n_seq_max=kv_sequences(4, settings.jobs.max_labels),
        ),
    )
    ratio = est.total / rss
    print(
        f"{name}: estimate {est.total / 2**20:.0f} MiB, measured RSS {rss / 2**20:.0f} MiB, ratio {ratio:.2f}, terms {est.to_dict()}"
    )
    assert 0.8 <= ratio <= 1.2
