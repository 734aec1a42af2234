"""What an engine is made from (`EngineConfig`) and what llama.cpp says about the loaded
file (`ModelFacts`)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.core.catalog import LABEL_SEQUENCES


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 2048
    n_threads: int = 1
    n_threads_batch: int = 1
    n_batch: int = 512
    n_ubatch: int = 128
    parallel: int = 1  # jobs in flight at once, each in its own sequence
    prefix_slots: int = 1  # prompt prefixes kept evaluated in the context at once
    label_sequences: int = LABEL_SEQUENCES  # multi-token labels, a round at a time
    prefix_cache_bytes: int = 32 * 1024 * 1024
    kv_cache_type: str = "f16"  # or "q8_0": half the memory, 15-25% slower here (performance.md)
    # Content-free texts whose label scores measure a prompt's bias (classify); empty: no
    # calibration. The four of Zhao et al. 2021 ("" is sent as one space).
    calibration_texts: tuple[str, ...] = ("N/A", " ", "[MASK]", "none")
    # The layer tap's context (learned profiles' jobs: prefix and text), at most n_ctx.
    tap_ctx: int = 1024

    @property
    def sequences(self) -> int:
        """KV sequences the context needs: the prefix slots, one per job, the labels'."""
        return self.prefix_slots + self.parallel + self.label_sequences


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp says about the loaded file."""

    architecture: str
    description: str
    n_params: int
    n_vocab: int
    n_layer: int
    n_ctx_train: int
    n_ctx: int
    file_bytes: int
    chat_template: bool
