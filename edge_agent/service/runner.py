"""Turns one validated job into one engine task and the reply's `result`.

Orchestration without I/O: prompt plans, the compiled constraint per schema (cached, so a
schema is compiled once however many jobs use it), and the result shape of wire contract v1.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from edge_agent.core.constraint import JsonConstraint
from edge_agent.core.errors import Code, EngineError
from edge_agent.core.inference import (
    Classification,
    Engine,
    Extraction,
    StopCheck,
    Task,
    Timings,
    run_alone,
)
from edge_agent.core.prompt import PromptPlan, classify_plan, extract_plan
from edge_agent.core.protocol import Job
from edge_agent.core.schema import ObjectNode, problems

MAX_NEW_TOKENS = 512
_SCORE_DIGITS = 4


@dataclass(frozen=True)
class Outcome:
    result: dict[str, Any]
    timings: Timings


class JobRunner:
    """Runs jobs on one engine. `min_confidence`: the agent's default threshold below which
    an answer is marked uncertain (a job's own wins); None: none."""

    def __init__(
        self,
        engine: Engine,
        max_new_tokens: int = MAX_NEW_TOKENS,
        min_confidence: float | None = None,
    ) -> None:
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.min_confidence = min_confidence

    def check_budget(self, job: Job) -> None:
        """Raise JobError `context_too_long` if the job cannot fit the engine's context;
        called by the intake, before the job is queued."""
        if job.kind == "classify":
            self.engine.fits(_classify_plan(job), job.text, labels=job.labels)
            return
        assert job.node is not None
        plan = extract_plan(job.node, job.instructions, job.examples)
        self.engine.fits(plan, job.text, constraint=self._constraint(job))

    def shape(self, job: Job) -> str:
        """The job's prompt shape (its fixed part: instructions, labels or schema,
        examples): jobs of one shape share an evaluated prefix and a calibration."""
        if job.kind == "classify":
            return _classify_plan(job).key
        assert job.node is not None
        return extract_plan(job.node, job.instructions, job.examples).key

    def begin(self, job: Job) -> Task:
        """The engine task for a job; the scheduler steps it with others, then `finish`."""
        if job.kind == "classify":
            return self.engine.begin_classify(_classify_plan(job), job.text, job.labels)
        assert job.node is not None
        plan = extract_plan(job.node, job.instructions, job.examples)
        # Grounded values (the default) come from this job's text: bind the schema's
        # automaton to it.
        constraint = self._constraint(job).bind(job.text)
        return self.engine.begin_extract(plan, job.text, constraint, self.max_new_tokens)

    def finish(self, job: Job, task: Task) -> Outcome:
        """The reply's result from a finished task (raises the task's error)."""
        found = task.result()
        threshold = job.min_confidence if job.min_confidence is not None else self.min_confidence
        if isinstance(found, Classification):
            confidence = found.scores[found.label]
            result: dict[str, Any] = {
                "label": found.label,
                "scores": _rounded(found.scores),
                "confidence": round(confidence, _SCORE_DIGITS),
            }
            if found.raw_scores is not None:
                result["raw_scores"] = _rounded(found.raw_scores)
            if threshold is not None:
                result["uncertain"] = confidence < threshold
            return Outcome(result, found.timings)
        assert isinstance(found, Extraction)
        assert job.node is not None
        try:
            data = json.loads(found.text)
        except ValueError as exc:  # the constraint makes this unreachable; say so loudly
            raise EngineError(Code.INTERNAL_ERROR, f"decoder produced invalid JSON: {exc}") from exc
        broken = problems(data, job.node)
        if broken:  # the constraint makes this unreachable; never send invalid data
            raise EngineError(Code.INTERNAL_ERROR, f"extraction does not validate: {broken[0]}")
        sure = _rounded(found.confidence)
        extracted: dict[str, Any] = {"data": data, "confidence": sure}
        if threshold is not None:
            extracted["uncertain"] = sorted(f for f, p in found.confidence.items() if p < threshold)
        if found.truncated:
            extracted["truncated"] = True
        return Outcome(extracted, found.timings)

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
