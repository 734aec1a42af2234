"""The KV cache's sequences (one unified buffer of n_ctx cells): 0..prefix_slots-1 each
hold one prompt prefix (`prefix.PrefixSlots`); each running job has its own sequence,
which shares its prefix's cells and adds the job's tokens; label sequences hold label
continuations while a job's labels are scored and are cleared right after.
"""

from __future__ import annotations

from edge_agent.adapters.engine.config import EngineConfig
from edge_agent.adapters.engine.need import WAIT, Gen, Run
from edge_agent.adapters.engine.port import Context
from edge_agent.core.errors import Code, EngineError


class Sequences:
    """Which job and label sequences are free."""

    def __init__(self, ctx: Context, config: EngineConfig) -> None:
        self._ctx = ctx
        slots = config.prefix_slots
        self._jobs = list(range(slots + config.parallel - 1, slots - 1, -1))
        first_label = slots + config.parallel
        if config.label_sequences < 1:
            raise ValueError("label_sequences must be at least 1: multi-token labels need one")
        self.label_count = config.label_sequences
        self._labels = list(range(first_label, first_label + config.label_sequences))

    @property
    def free_jobs(self) -> int:
        return len(self._jobs)

    def take(self, run: Run) -> None:
        """A sequence for the task. The scheduler runs at most `parallel` jobs
        (core/slots.py), so one is free; if not, the task fails at once instead of
        waiting: the engine never decides when a job joins."""
        if not self._jobs:
            raise EngineError(
                Code.INTERNAL_ERROR,
                "no free KV sequence: more jobs were started than the engine holds (jobs.parallel)",
            )
        run.seq = self._jobs.pop()
        run.pos = 0

    def release(self, run: Run) -> None:
        if run.seq < 0:
            return
        self._ctx.seq_remove(run.seq)
        self._jobs.append(run.seq)
        run.seq = -1

    def take_labels(self, count: int) -> Gen[list[int]]:
        while len(self._labels) < count:
            yield WAIT
        return [self._labels.pop() for _ in range(count)]

    def release_labels(self, seqs: list[int]) -> None:
        for seq in seqs:
            self._ctx.seq_remove(seq)
            self._labels.append(seq)
