"""A job inside the engine: a generator that yields what it needs evaluated next (`Need`),
receives the logits rows it asked for, and returns its outcome; `Run` is the engine's
state for one task. `batch.Batcher` puts every running task's needs into one decode.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from edge_agent.adapters.engine.port import Vector
from edge_agent.core.inference import Task

_T = TypeVar("_T")
Gen = Generator["Need", "list[Vector]", _T]


class Need:
    """Tokens a task needs evaluated before it can go on: (token, position, sequence,
    logits wanted) entries, taken into steps in order; `rows` collects the logits."""

    __slots__ = ("outputs", "pos", "rows", "seqs", "taken", "tokens")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.pos: list[int] = []
        self.seqs: list[int] = []
        self.outputs: list[bool] = []
        self.rows: list[Vector] = []
        self.taken = 0

    @classmethod
    def one_run(cls, tokens: Sequence[int], pos: int, seq: int, logits: bool = True) -> Need:
        """Consecutive tokens of one sequence; logits of the last one (if `logits`)."""
        need = cls()
        n = len(tokens)
        need.tokens = list(tokens)
        need.pos = list(range(pos, pos + n))
        need.seqs = [seq] * n
        need.outputs = [False] * n
        if logits and n:
            need.outputs[-1] = True
        return need

    def add(self, token: int, pos: int, seq: int, logits: bool) -> None:
        self.tokens.append(token)
        self.pos.append(pos)
        self.seqs.append(seq)
        self.outputs.append(logits)

    def left(self) -> int:
        return len(self.tokens) - self.taken

    def waiting_for_tokens(self) -> bool:
        """False for WAIT: the task waits for a sequence or for a prefix another task is
        building, and is asked again next step."""
        return bool(self.tokens)


WAIT = Need()


@dataclass(eq=False)
class Run:
    """The engine's state for one task."""

    gen: Gen[Any] | None = None
    need: Need | None = None  # None: not started (or ended)
    seq: int = -1  # its KV sequence while it holds one
    pos: int = 0  # cells of that sequence: the prefix, then its own tokens


def run_of(task: Task) -> Run:
    run = task.inner
    assert isinstance(run, Run), "a task of another engine"
    return run
