"""The installed llama.cpp loads and runs every architecture the product claims (llama for
SmolLM2, gemma3 for Gemma-3, phi3 for Phi-4-mini) at every quantization it ships.

The models are tiny synthetic GGUFs with random weights (tests/harness/synthetic_gguf.py), built
and quantized by llama.cpp's own quantizer on the spot: nothing is downloaded. Random
weights make the answers meaningless, so what is checked is that each file is what the
quantizer was asked for and that every engine path (label scoring, constrained extraction,
free generation, the chat template) runs on it and returns well-formed results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import jsonschema
import pytest

from edge_agent.adapters.engine import EngineConfig, LlamaEngine
from edge_agent.core.constraint import JsonConstraint
from edge_agent.core.prompt import classify_plan, extract_plan
from edge_agent.core.schema import SchemaLimits, compile_schema
from tests.harness.synthetic_gguf import (
    ARCHITECTURES,
    CHAT_MARKERS,
    N_LAYER,
    QUANT_BASE_TYPES,
    QUANT_FTYPES,
    QUANTS,
    quantize,
    write_model,
)

pytestmark = pytest.mark.model

CONFIG = EngineConfig(n_ctx=512, n_threads=2, n_threads_batch=2)
LABELS = ["normal", "warning", "critical"]
TEXT = "Pump P-3 vibration 9.1 mm/s, above the alarm threshold."
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "device": {"type": "string", "maxLength": 12},
        "value": {"type": "number"},
        "alarm": {"type": "boolean"},
        "level": {"enum": ["info", "warning", "critical"]},
    },
    "required": ["device", "value", "alarm", "level"],
}
UNQUANTIZED = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}


class SyntheticModels:
    """Builds each architecture's F16 file once, and each quantization of it once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._sources: dict[str, Path] = {}
        self._quantized: dict[tuple[str, str], Path] = {}

    def source(self, arch: str) -> Path:
        if arch not in self._sources:
            self._sources[arch] = write_model(self.root / f"{arch}-F16.gguf", arch)
        return self._sources[arch]

    def quantized(self, arch: str, quant: str) -> Path:
        key = (arch, quant)
        if key not in self._quantized:
            self._quantized[key] = quantize(
                self.source(arch), self.root / f"{arch}-{quant}.gguf", quant
            )
        return self._quantized[key]


@pytest.fixture(scope="session")
def synthetic_models(tmp_path_factory: pytest.TempPathFactory) -> SyntheticModels:
    return SyntheticModels(tmp_path_factory.mktemp("synthetic-gguf"))


def field(reader: gguf.GGUFReader, key: str) -> Any:
    found = reader.get_field(key)
    assert found is not None, f"{key} missing"
    return found.contents()


def check_quantized_file(path: Path, arch: str, quant: str) -> list[str]:
    """The quantizer wrote what it was asked for; returns the vocabulary."""
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.file_type") == QUANT_FTYPES[quant]
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert QUANT_BASE_TYPES[quant] in types.values(), types
    matrices = [t for t in reader.tensors if len(t.shape) > 1]
    left = {t.name: t.tensor_type.name for t in matrices if t.tensor_type in UNQUANTIZED}
    assert not left, f"weight matrices left unquantized: {left}"
    assert path.stat().st_size < 20 * 1024 * 1024
    tokens: list[str] = field(reader, "tokenizer.ggml.tokens")
    return tokens


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_loads_quantized_and_runs(
    synthetic_models: SyntheticModels, arch: str, quant: str
) -> None:
    path = synthetic_models.quantized(arch, quant)
    tokens = check_quantized_file(path, arch, quant)

    engine = LlamaEngine(path, CONFIG)
    try:
        assert engine.facts.architecture == arch
        assert engine.facts.n_layer == N_LAYER
        assert engine.facts.n_vocab == len(tokens)
        assert engine.facts.chat_template

        # llama.cpp recognised the chat template: the prompt is framed by the model's own
        # turn markers (special tokens), not by the plain-text fallback.
        plan = classify_plan(LABELS, None, [])
        prefix, job = engine.job_tokens(plan, TEXT)
        markers = CHAT_MARKERS[arch]
        assert tokens.index(markers.user) in prefix
        assert tokens.index(markers.end) in job
        if arch == "gemma3":  # SentencePiece vocabulary with add_bos_token
            assert prefix[0] == tokens.index("<bos>")
        assert len(prefix) + len(job) < CONFIG.n_ctx // 2

        found = engine.classify(plan, TEXT, LABELS)
        assert found.label in LABELS
        assert set(found.scores) == set(LABELS)
        assert math.isclose(sum(found.scores.values()), 1.0, abs_tol=1e-9)
        assert found.logprobs is not None
        assert all(math.isfinite(lp) and lp <= 0.0 for lp in found.logprobs.values())

        constraint = JsonConstraint(compile_schema(SCHEMA, SchemaLimits()))
        extracted = engine.extract(
            extract_plan(compile_schema(SCHEMA, SchemaLimits()), None, []), TEXT, constraint, 32
        )
        jsonschema.validate(json.loads(extracted.text), SCHEMA)
        assert extracted.timings.completion_tokens > 0

        timings = engine.generate_free(plan, TEXT, 8)
        assert timings.completion_tokens == 8
    finally:
        engine.close()
