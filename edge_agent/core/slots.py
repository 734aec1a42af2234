"""How many jobs run at once: the scheduler's one owner of that number.

The engine holds up to `capacity` jobs at once (a KV sequence each, fixed when it loads:
`jobs.parallel`); it never decides how many run, nor when a waiting job joins. The
scheduler (service/worker.py) asks `Slots` before it starts a job: at most `capacity` run,
and fewer right after the context filled up: a preempted job coming straight back would
fill it again, the whole decode would fail, and no job would ever advance, so the room
shrinks to what ran and grows by one as each job ends. Which job is preempted, and which
waiting job takes a free slot, are `fairness.victim` and `fairness.pick`.
"""

from __future__ import annotations


class Slots:
    """The jobs the engine may run now (not thread-safe: the scheduler's lock holds it)."""

    def __init__(self, capacity: int) -> None:
        self.parallel = max(1, capacity)
        self.room = self.parallel

    def free(self, running: int) -> bool:
        """Whether one more job may start beside `running` ones."""
        return running < self.parallel

    def fair_room(self, running: int) -> int:
        """Slots left within the room the context has now (beyond it, only a requester
        that runs nothing may start a job: `fairness.pick`)."""
        return self.room - running

    def preempted(self, running: int) -> None:
        """A job went back to the queue because the context was full; `running` are left."""
        self.room = running

    def ended(self) -> None:
        """A running job ended: its cells are free, one more may join, up to capacity."""
        self.room = min(self.parallel, self.room + 1)

    def resize(self, capacity: int) -> None:
        """Another engine serves now (a model switch, between jobs)."""
        self.parallel = max(1, capacity)
        self.room = self.parallel
