"""Owned fakes shared by tests: the one fake engine (the seam the scheduler, the runner
and the watchdog drive; the engine's own logic has tests/harness/fake_context.py), a
recording outbox (what the worker and the intake hand over), and the topics and model
they answer as."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.adapters.journal import Stored
from edge_agent.core.constraint import JsonConstraint
from edge_agent.core.errors import Code, EngineError
from edge_agent.core.inference import (
    Classification,
    ContextFull,
    Extraction,
    Interrupted,
    Task,
    Timings,
)
from edge_agent.core.prompt import PromptPlan
from edge_agent.core.protocol import Reply, Topics
from edge_agent.core.wire import ModelRef
from edge_agent.service.outbox import Handoff, Memo

TOPICS = Topics("edge", "pi-1", "g")
MODEL = ModelRef(name="fake", quant="Q0", sha256=None)


@dataclass
class RecordingOutbox:
    replies: list[Reply] = field(default_factory=list)
    progress: list[Reply] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    memos: list[Memo | None] = field(default_factory=list)
    resent: list[Stored] = field(default_factory=list)
    handed: list[Handoff] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def deliver(
        self,
        reply: Reply,
        acks: Callable[[], None] | Sequence[Callable[[], None]],
        memo: Memo | None = None,
    ) -> None:
        with self.cond:
            self.replies.append(reply)
            self.memos.append(memo)
            for ack in [acks] if callable(acks) else acks:
                ack()
            self.cond.notify_all()

    def notify(self, reply: Reply) -> None:
        self.progress.append(reply)

    def resend(self, stored: Stored, correlation_data: bytes | None) -> None:
        with self.cond:
            self.resent.append(stored)
            self.cond.notify_all()

    def hand_back(self, job: Handoff, ack: Callable[[], None], undo: Callable[[], None]) -> None:
        self.handed.append(job)
        ack()

    def uncommitted(self, key: str) -> bool:
        return False

    def wait(self, count: int, timeout: float = 5.0) -> list[Reply]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.replies) >= count, timeout), self.replies
            return list(self.replies)

    def wait_acks(self, count: int, timeout: float = 5.0) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.acks) >= count, timeout), self.acks
            return list(self.acks)


def first_label(labels: Sequence[str]) -> Classification:
    """The default scripted classification: the first label, sure of it."""
    scores = {label: (1.0 if i == 0 else 0.0) for i, label in enumerate(labels)}
    return Classification(labels[0], scores, Timings(prompt_ms=1, gen_ms=1, prompt_tokens=3))


@dataclass
class FakeEngine:
    """The one owned fake of the engine seam (`core.inference.Engine`) for the scheduler,
    the runner and the watchdog: a task ends once `delay` s of steps have passed and `gate`
    is open, a step at a time like the real engine (the scheduler checks cancels and
    deadlines between steps), answering as scripted. Records what it saw.

    `classify` scripts a classification from the labels; `answer` an extraction's bytes,
    which must be what the job's bound constraint accepts (grounding), with `confidence`;
    `fail_on`: texts whose task fails; `full(tasks)`: True makes that step raise
    ContextFull; `wedge`: every step blocks until it is set, like a decode stuck in C.
    """

    capacity: int = 1
    delay: float = 0.0
    gate: threading.Event | None = None
    fail_on: set[str] = field(default_factory=set)
    classify: Callable[[Sequence[str]], Classification] = first_label
    answer: bytes | None = None
    confidence: dict[str, float] = field(default_factory=lambda: {"v": 0.875})
    full: Callable[[Sequence[Task]], bool] = lambda _tasks: False
    wedge: threading.Event | None = None
    seen: list[str] = field(default_factory=list)
    plans: list[PromptPlan] = field(default_factory=list)
    steps: list[list[str]] = field(default_factory=list)  # the texts in each step
    started: threading.Condition = field(default_factory=threading.Condition)
    entered: threading.Event = field(default_factory=threading.Event)

    def fits(
        self,
        plan: PromptPlan,
        text: str,
        labels: Sequence[str] | None = None,
        constraint: JsonConstraint | None = None,
        embed: bool = False,
    ) -> int:
        return len(text)

    def begin_classify(self, plan: PromptPlan, text: str, labels: Sequence[str]) -> Task:
        return self._begin(plan, text, self.classify(labels))

    def begin_extract(
        self, plan: PromptPlan, text: str, constraint: JsonConstraint, max_tokens: int
    ) -> Task:
        answer = self.answer if self.answer is not None else b'{"v": 1}'
        if self.answer is not None:
            state = constraint.feed(constraint.initial(), answer)
            accepted = state is not None and constraint.is_complete(state)
            assert accepted, "the answer is not what the bound constraint allows"
        timings = Timings(prompt_ms=1, gen_ms=2, prompt_tokens=3, completion_tokens=5)
        found = Extraction(answer.decode(), timings, False, dict(self.confidence))
        return self._begin(plan, text, found)

    def begin_embed(self, plan: PromptPlan, text: str, layers: Collection[int]) -> Task:
        raise NotImplementedError("no layers in the fake engine")

    def _begin(self, plan: PromptPlan, text: str, answer: Classification | Extraction) -> Task:
        with self.started:
            self.plans.append(plan)
            self.seen.append(text)
            self.started.notify_all()
        return Task({"text": text, "answer": answer, "end": None})

    def step(
        self,
        tasks: Sequence[Task],
        groups: Sequence[str] | None = None,
        also_active: Collection[str] = (),
    ) -> None:
        assert len(tasks) <= self.capacity, "the scheduler ran more than the engine holds"
        self.steps.append([t.inner["text"] for t in tasks])  # type: ignore[index]
        if self.wedge is not None:
            self.entered.set()
            self.wedge.wait(30)
        if self.full(tasks):
            raise ContextFull
        time.sleep(0.002)
        for task in tasks:
            state: dict[str, Any] = task.inner  # type: ignore[assignment]
            if self.gate is not None and not self.gate.is_set():
                continue
            if state["end"] is None:
                state["end"] = time.monotonic() + self.delay
            if time.monotonic() < state["end"]:
                continue
            if state["text"] in self.fail_on:
                task.error = EngineError(Code.INFERENCE_ERROR, "scripted failure")
            else:
                task.outcome = state["answer"]

    def reset(self) -> None:
        pass

    def drop(self, task: Task) -> None:
        if not task.done:
            task.error = Interrupted()

    def wait_running(self, text: str, timeout: float = 5.0) -> None:
        """Until the worker thread has started the job whose text is `text`."""
        with self.started:
            assert self.started.wait_for(lambda: text in self.seen, timeout), self.seen
