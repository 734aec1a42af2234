"""Owned fakes shared by tests: a recording outbox (what the worker and the intake hand
over), and the topics and model they answer as."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edge_agent.adapters.journal import Stored
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
