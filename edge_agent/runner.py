"""Turns one validated job into one engine call and the reply's `result`.

Orchestration without I/O: prompt plans, the compiled constraint per schema (cached, so a
schema is compiled once however many jobs use it), and the result shape of wire contract v1.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from edge_agent.constraint import JsonConstraint
from edge_agent.errors import Code, EngineError
from edge_agent.inference import Engine, StopCheck, Timings
from edge_agent.prompt import classify_plan, extract_plan
from edge_agent.protocol import Job
from edge_agent.schema import problems

MAX_NEW_TOKENS = 512
_SCORE_DIGITS = 4


@dataclass(frozen=True)
class Outcome:
    result: dict[str, Any]
    timings: Timings


class JobRunner:
    """Runs jobs on one engine."""

    def __init__(self, engine: Engine, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self._constraints: OrderedDict[str, JsonConstraint] = OrderedDict()
        self._lock = threading.Lock()  # the intake's thread checks budgets meanwhile

    def check_budget(self, job: Job) -> None:
        """Raise JobError `context_too_long` if the job cannot fit the engine's context;
        called by the intake, before the job is queued."""
        if job.kind == "classify":
            plan = classify_plan(job.labels, job.instructions, job.examples)
            self.engine.fits(plan, job.text, labels=job.labels)
            return
        assert job.schema is not None
        plan = extract_plan(job.schema, job.instructions, job.examples)
        self.engine.fits(plan, job.text, constraint=self._constraint(job))

    def run(self, job: Job, stop: StopCheck) -> Outcome:
        if job.kind == "classify":
            plan = classify_plan(job.labels, job.instructions, job.examples)
            chosen = self.engine.classify(plan, job.text, job.labels, stop)
            scores = {k: round(v, _SCORE_DIGITS) for k, v in chosen.scores.items()}
            return Outcome({"label": chosen.label, "scores": scores}, chosen.timings)
        assert job.schema is not None
        plan = extract_plan(job.schema, job.instructions, job.examples)
        constraint = self._constraint(job)
        found = self.engine.extract(plan, job.text, constraint, self.max_new_tokens, stop)
        try:
            data = json.loads(found.text)
        except ValueError as exc:  # the constraint makes this unreachable; say so loudly
            raise EngineError(Code.INTERNAL_ERROR, f"decoder produced invalid JSON: {exc}") from exc
        broken = problems(data, job.schema)
        if broken:  # the constraint makes this unreachable; never send invalid data
            raise EngineError(Code.INTERNAL_ERROR, f"extraction does not validate: {broken[0]}")
        result: dict[str, Any] = {"data": data}
        if found.truncated:
            result["truncated"] = True
        return Outcome(result, found.timings)

    def _constraint(self, job: Job) -> JsonConstraint:
        key = json.dumps(job.schema, sort_keys=True)
        with self._lock:
            constraint = self._constraints.get(key)
            if constraint is not None:
                self._constraints.move_to_end(key)
                return constraint
        assert job.node is not None
        constraint = JsonConstraint(job.node)
        with self._lock:
            self._constraints[key] = constraint
            if len(self._constraints) > 64:
                self._constraints.popitem(last=False)
        return constraint
