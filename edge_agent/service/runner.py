"""Turns one validated job into one engine task and the reply's `result`.

Orchestration without I/O: prompt plans, the compiled constraint per schema (cached, so a
schema is compiled once however many jobs use it), and the result shape of wire contract v1.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from edge_agent.core.constraint import JsonConstraint
from edge_agent.core.errors import Code, EngineError, JobError
from edge_agent.core.inference import (
    Classification,
    Embedding,
    Engine,
    Extraction,
    StopCheck,
    Task,
    Timings,
    run_alone,
)
from edge_agent.core.prompt import Example, PromptPlan, classify_plan, extract_plan
from edge_agent.core.protocol import Job
from edge_agent.core.schema import ObjectNode, problems
from edge_agent.core.wire import ClassifyResult, ExtractResult

if TYPE_CHECKING:
    from edge_agent.service.learning import Learned

MAX_NEW_TOKENS = 512
_SCORE_DIGITS = 4


@dataclass(frozen=True)
class Outcome:
    """A finished job: its reply's `result` (the wire's own model) and what it cost."""

    result: ClassifyResult | ExtractResult
    timings: Timings


class JobRunner:
    """Runs jobs on one engine. `min_confidence`: the agent's default threshold below which
    an answer is marked uncertain (a job's own wins); None: none. `learned`: what profiles
    learned from their rows (service/learning.py), and `tokens` the model's tokenizer (an
    extract profile picks the rows most like a job's text as its examples)."""

    def __init__(
        self,
        engine: Engine,
        max_new_tokens: int = MAX_NEW_TOKENS,
        min_confidence: float | None = None,
        learned: Mapping[str, Learned] | None = None,
        tokens: Callable[[str], list[int]] | None = None,
    ) -> None:
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.min_confidence = min_confidence
        self.learned = dict(learned or {})
        self.tokens = tokens
        # The intake tokenizes with the engine (budget, shape) while a model swap replaces
        # it: the swap waits for a call in progress, so the old engine is never closed
        # under one.
        self._lock = threading.RLock()
        self._suspended: str | None = None  # why no engine may be used now

    def suspend(self, why: str) -> None:
        """No engine for a while (a drain-first model switch closes the old one before
        the new one loads): budget checks refuse jobs `overloaded` until `use`."""
        with self._lock:
            self._suspended = why

    def use(
        self,
        engine: Engine,
        learned: Mapping[str, Learned],
        tokens: Callable[[str], list[int]] | None,
    ) -> None:
        """Another engine from now on (the worker calls this between jobs)."""
        with self._lock:
            self.engine = engine
            self.learned = dict(learned)
            self.tokens = tokens
            self._suspended = None

    def check_budget(self, job: Job) -> None:
        """Raise JobError `context_too_long` if the job cannot fit the engine's context;
        called by the intake, before the job is queued."""
        with self._lock:
            if self._suspended is not None:
                raise JobError(Code.OVERLOADED, f"this device is {self._suspended}; try again")
            self._check_budget(job)

    def _check_budget(self, job: Job) -> None:
        head = self._head(job)
        if head is not None:
            assert head.plan is not None
            self.engine.fits(head.plan, job.text, embed=True)
            return
        if job.kind == "classify":
            self.engine.fits(_classify_plan(job), job.text, labels=job.labels)
            return
        assert job.node is not None
        plan = extract_plan(job.node, job.instructions, self._examples(job))
        self.engine.fits(plan, job.text, constraint=self._constraint(job))

    def shape(self, job: Job) -> str:
        """The job's prompt shape (its fixed part: instructions, labels or schema,
        examples): jobs of one shape share an evaluated prefix and a calibration."""
        with self._lock:
            if self._suspended is not None:
                return "suspended"
            return self._shape(job)

    def _shape(self, job: Job) -> str:
        head = self._head(job)
        if head is not None:
            assert head.plan is not None
            return head.plan.key
        if job.kind == "classify":
            return _classify_plan(job).key
        assert job.node is not None
        if self._learned_extract(job) is not None:  # one shape per profile, whatever its rows
            return f"learned:{job.profile}"
        return extract_plan(job.node, job.instructions, self._examples(job)).key

    def begin(self, job: Job) -> Task:
        """The engine task for a job; the scheduler steps it with others, then `finish`."""
        head = self._head(job)
        if head is not None:  # a learned classify profile: one pass, then its head
            assert head.plan is not None
            assert head.head is not None
            return self.engine.begin_embed(head.plan, job.text, (head.head.layer,))
        if job.kind == "classify":
            return self.engine.begin_classify(_classify_plan(job), job.text, job.labels)
        assert job.node is not None
        return self.begin_extract_with(
            job.node,
            job.text,
            job.instructions,
            self._examples(job),
            self._constraint(job),
            once=self._learned_extract(job) is not None,
        )

    def begin_extract_with(
        self,
        node: ObjectNode,
        text: str,
        instructions: str | None,
        examples: Sequence[Example],
        constraint: JsonConstraint | None = None,
        once: bool = False,
    ) -> Task:
        """An extraction of `text` by `node`'s schema with these examples (`once`: chosen
        for this job alone, PromptPlan.once)."""
        plan = replace(extract_plan(node, instructions, examples), once=once)
        # Grounded values (the default) come from this job's text: bind the schema's
        # automaton to it.
        bound = (constraint or _constraint_for(node)).bind(text)
        return self.engine.begin_extract(plan, text, bound, self.max_new_tokens)

    def finish(self, job: Job, task: Task) -> Outcome:
        """The reply's result from a finished task (raises the task's error)."""
        found = task.result()
        threshold = job.min_confidence if job.min_confidence is not None else self.min_confidence
        if isinstance(found, Embedding):
            head = self._head(job)
            assert head is not None
            assert head.head is not None
            raw, scores = head.head.predict(found.layers[head.head.layer])
            found = Classification(
                label=max(scores, key=scores.__getitem__),
                scores=scores,
                timings=found.timings,
                raw_scores=raw,
            )
        if isinstance(found, Classification):
            confidence = found.scores[found.label]
            return Outcome(
                ClassifyResult(
                    label=found.label,
                    scores=_rounded(found.scores),
                    confidence=round(confidence, _SCORE_DIGITS),
                    raw_scores=None if found.raw_scores is None else _rounded(found.raw_scores),
                    uncertain=None if threshold is None else confidence < threshold,
                ),
                found.timings,
            )
        assert isinstance(found, Extraction)
        assert job.node is not None
        extracted = self.extraction_result(job.node, found)
        if threshold is not None:
            uncertain = sorted(f for f, p in found.confidence.items() if p < threshold)
            extracted = extracted.model_copy(update={"uncertain": uncertain})
        return Outcome(extracted, found.timings)

    def extraction_result(self, node: ObjectNode, found: object) -> ExtractResult:
        """An extraction's `data` (checked against the schema) and `confidence`."""
        assert isinstance(found, Extraction)
        try:
            data = json.loads(found.text)
        except ValueError as exc:  # the constraint makes this unreachable; say so loudly
            raise EngineError(Code.INTERNAL_ERROR, f"decoder produced invalid JSON: {exc}") from exc
        broken = problems(data, node)
        if broken:  # the constraint makes this unreachable; never send invalid data
            raise EngineError(Code.INTERNAL_ERROR, f"extraction does not validate: {broken[0]}")
        return ExtractResult(
            data=data,
            confidence=_rounded(found.confidence),
            truncated=True if found.truncated else None,
        )

    def _head(self, job: Job) -> Learned | None:
        """A classify profile's learned head, when the job takes the profile's shape as it
        is (a job that brings its own labels, instructions or examples is scored)."""
        learned = self.learned.get(job.profile or "")
        if learned is None or learned.head is None or job.kind != "classify":
            return None
        assert learned.plan is not None
        return learned if _classify_plan(job).key == learned.plan.key else None

    def _learned_extract(self, job: Job) -> Learned | None:
        """An extract profile that learned from rows, when the job takes its shape as it is
        (a job that brings its own examples or another schema keeps to them)."""
        learned = self.learned.get(job.profile or "")
        if job.examples or learned is None or learned.kind != "extract" or self.tokens is None:
            return None
        return learned if job.schema == learned.schema else None

    def _examples(self, job: Job) -> tuple[Example, ...]:
        """An extract job's examples: its own, or for an extract profile that learned from
        rows, the rows most like its text."""
        learned = self._learned_extract(job)
        if learned is None or self.tokens is None:
            return job.examples
        return learned.nearest_examples(self.tokens(job.text))

    def run(self, job: Job, stop: StopCheck) -> Outcome:
        """One job alone, to its end (evaluation, tools)."""
        task = self.begin(job)
        run_alone(self.engine, task, stop)
        return self.finish(job, task)

    def _constraint(self, job: Job) -> JsonConstraint:
        assert job.node is not None
        return _constraint_for(job.node)


@functools.lru_cache(maxsize=64)
def _constraint_for(node: ObjectNode) -> JsonConstraint:
    """A schema's automaton, compiled once however many jobs use it (nodes are frozen and
    hashable: schemas that differ only in annotations share one)."""
    return JsonConstraint(node)


def _classify_plan(job: Job) -> PromptPlan:
    return classify_plan(job.labels, job.instructions, job.examples, job.label_descriptions)


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, _SCORE_DIGITS) for k, v in values.items()}
