"""The llama.cpp adapter as a package: `LlamaEngine` (facade.py) over one context
(context.py, the only module that calls llama.cpp's bindings) and the model-free logic
between them. Map (docs/architecture.md):

    facade     LlamaEngine: composes the rest; the public API
    port       Context / TapContext: what the logic needs of llama.cpp
    context    LlamaContext / LlamaTapContext: those calls over the C API (bindings.py)
    batch      the step: every task's next tokens in one decode, prompt shares
    need       a task as a generator of Needs; Run, its state
    parts      what the generators work with; reading a job's prompt
    sequences  the KV cache's job and label sequences
    prefix     prompt prefixes kept evaluated, their saved states
    shapes     prompt plans rendered for the model; job and label tokens
    vocab      token pieces, byte tokens, forced text
    classify   label scoring and contextual calibration
    extract    constrained JSON decoding and field confidence
    tap        reading layers' outputs for learned profiles
    config     EngineConfig, ModelFacts
"""

from edge_agent.adapters.engine.batch import SHARED_STEP_TOKENS
from edge_agent.adapters.engine.config import EngineConfig, ModelFacts
from edge_agent.adapters.engine.context import MAX_SEQUENCES
from edge_agent.adapters.engine.extract import CONFIDENCE_TOP
from edge_agent.adapters.engine.facade import LlamaEngine

__all__ = [
    "CONFIDENCE_TOP",
    "MAX_SEQUENCES",
    "SHARED_STEP_TOKENS",
    "EngineConfig",
    "LlamaEngine",
    "ModelFacts",
]
