"""What an inference engine promises, independent of llama.cpp.

`engine.LlamaEngine` implements `Engine`; unit tests use owned fakes. Keeping these types
here lets the runner and the worker be tested without loading a model.

An engine runs jobs as `Task`s: `begin_classify` / `begin_extract` make one, and each
`step` advances every task it is given by one evaluation (one llama.cpp decode holding
all their tokens: a batch). The scheduler (`service/worker.py`) keeps up to N tasks in
flight; `run_alone` drives one task to its end for callers that want one answer.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
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


class ContextFull(EngineError):
    """The context has no free cells for this step's tokens, even after dropping cached
    prompt prefixes: the scheduler puts a job back in the queue and the others go on."""

    def __init__(self) -> None:
        super().__init__(Code.CONTEXT_OVERFLOW, "the context is full")


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


@dataclass(frozen=True)
class Embedding:
    """A job's prompt read up to where its answer would begin: the outputs of the layers
    asked for there (what a learned head reads), a vector of floats per layer."""

    layers: Mapping[int, Sequence[float]]
    timings: Timings


class Task:
    """One job's work inside an engine. `inner` is the engine's own state; the task is
    done when it has an outcome or an error."""

    __slots__ = ("error", "inner", "outcome")

    def __init__(self, inner: object = None) -> None:
        self.inner = inner
        self.outcome: Classification | Extraction | Embedding | Timings | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None or self.error is not None

    def result(self) -> Classification | Extraction | Embedding | Timings:
        if self.error is not None:
            raise self.error
        assert self.outcome is not None, "task not done"
        return self.outcome


class Engine(Protocol):
    @property
    def capacity(self) -> int:
        """How many tasks it holds at once (fixed when it loads). It never holds a task
        back for want of room: the scheduler (core.slots) runs at most this many."""

    def fits(
        self,
        plan: PromptPlan,
        text: str,
        labels: Sequence[str] | None = None,
        constraint: JsonConstraint | None = None,
        embed: bool = False,
    ) -> int:
        """Context cells the job needs; raises JobError `context_too_long` if too many
        (`embed`: for a learned profile's job, read by the layer tap)."""

    def begin_classify(self, plan: PromptPlan, text: str, labels: Sequence[str]) -> Task:
        """A task that scores every label as the answer to `text` (a `Classification`)."""

    def begin_extract(
        self, plan: PromptPlan, text: str, constraint: JsonConstraint, max_tokens: int
    ) -> Task:
        """A task that writes JSON for `text` the constraint accepts (an `Extraction`)."""

    def begin_embed(self, plan: PromptPlan, text: str, layers: Collection[int]) -> Task:
        """A task that reads the job's prompt and gives the outputs of `layers` where the
        answer would begin (an `Embedding`)."""

    def step(
        self,
        tasks: Sequence[Task],
        groups: Sequence[str] | None = None,
        also_active: Collection[str] = (),
    ) -> None:
        """Advance every task that is not done by one evaluation, together; a task that
        ends gets its outcome or its error. `groups` names each task's requester, whose
        shares of the step are kept fair (None: one group); `also_active`, requesters that
        use the engine with no task in this step. Raises ContextFull when the context
        cannot hold this step's tokens: no task has moved then."""

    def drop(self, task: Task) -> None:
        """Stop a task (cancelled, expired, put back in the queue) and free its cells."""

    def reset(self) -> None:
        """Forget every cached prompt prefix and calibration, as a new engine would have
        none (with no task running): what comes next does not depend on what ran before."""


def run_alone(engine: Engine, task: Task, stop: StopCheck) -> object:
    """Drive one task to its end, checking `stop` before every step; its outcome."""
    try:
        while not task.done:
            if stop():
                raise Interrupted
            engine.step([task])
    except BaseException:
        engine.drop(task)
        raise
    return task.result()
