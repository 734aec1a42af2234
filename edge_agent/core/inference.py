"""What an inference engine promises, independent of llama.cpp.

`engine.LlamaEngine` implements `Engine`; unit tests use owned fakes. Keeping these types
here lets the runner and the worker be tested without loading a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edge_agent.core.constraint import JsonConstraint
from edge_agent.core.errors import Code, EngineError
from edge_agent.core.prompt import PromptPlan

StopCheck = Callable[[], bool]


class Interrupted(EngineError):
    """The job's stop check asked to stop (cancelled or past its deadline)."""

    def __init__(self) -> None:
        super().__init__(Code.CANCELLED, "stopped by request")


@dataclass
class Timings:
    """What one job cost; names match the reply's `timings` (docs/protocol.md)."""

    prompt_ms: float = 0.0
    gen_ms: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens_per_second(self) -> float | None:
        if self.completion_tokens == 0 or self.gen_ms <= 0:
            return None
        return self.completion_tokens / (self.gen_ms / 1000.0)

    @property
    def prompt_tokens_per_second(self) -> float | None:
        if self.prompt_tokens == 0 or self.prompt_ms <= 0:
            return None
        return self.prompt_tokens / (self.prompt_ms / 1000.0)


@dataclass(frozen=True)
class Classification:
    label: str
    scores: dict[str, float]  # probabilities over the labels, summing to 1
    timings: Timings
    logprobs: dict[str, float] | None = None  # each label's log-probability as a continuation
    raw_scores: dict[str, float] | None = None  # probabilities before calibration


@dataclass(frozen=True)
class Extraction:
    text: str  # JSON text the job's schema accepts
    timings: Timings
    truncated: bool  # the token budget ran out and the decoder closed the JSON itself
    # per property path: how sure the model was of the value it chose (the product of its
    # choices' probabilities among the tokens the schema allowed); forced values are absent
    confidence: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    def fits(
        self,
        plan: PromptPlan,
        text: str,
        labels: Sequence[str] | None = None,
        constraint: JsonConstraint | None = None,
    ) -> int:
        """Context cells the job needs; raises JobError `context_too_long` if too many."""

    def classify(
        self, plan: PromptPlan, text: str, labels: Sequence[str], stop: StopCheck
    ) -> Classification: ...

    def extract(
        self,
        plan: PromptPlan,
        text: str,
        constraint: JsonConstraint,
        max_tokens: int,
        stop: StopCheck,
    ) -> Extraction: ...
