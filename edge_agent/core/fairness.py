"""Fair shares of one engine among the requesters that use it (docs/delivery.md, "Fair
shares"): the pure decisions, with the clock and the counts passed in.

A requester is whoever takes a job's replies (`protocol.Topics.requester_of`): the first
three levels of a reply topic under `<prefix>/replies/<name>/` (the fleet's convention,
which its ACLs confine each sensor to), else the whole reply topic. A requester is
*active* while it holds jobs on the agent and for `jobs.fair_window_s` after its last one.

    held share   with n requesters holding jobs (or holding one a second ago), each may
                 hold (queued and running) at most max(1, window // n) of the jobs the
                 broker lets the agent hold at once (Receive Maximum); more are answered
                 `overloaded`, so one requester's backlog cannot fill the agent and keep
                 another's jobs waiting at the broker.
    slots        a requester that runs jobs may start another only if a slot then stays free
                 for each other active requester that runs none: their next job starts at
                 once instead of waiting for a greedy one's to end.
    order        a free slot goes to the requester that runs the fewest jobs, then the one
                 served longest ago (round-robin); within a requester, by priority, aged:
                 a job's priority rises by one for every `aging_s` it waits, so a lower one
                 waits a bounded time behind a stream of higher ones.
    new shapes   a job whose prompt shape (instructions, labels, schema, examples) the
                 agent has not seen recently costs a prefix evaluation and a calibration:
                 each requester may bring `per_minute` of them a minute (a burst of
                 `burst`), the rest answered `overloaded` with `retry_after_ms`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


def held_share(window: int, active: int) -> int:
    """Jobs one requester may hold when `active` requesters share a window of `window`."""
    return max(1, window // max(1, active))


def fair_slots(parallel: int, active: int) -> int:
    """Slots one requester is due when `active` requesters share `parallel` (at least 1):
    a requester running more than this while others wait saturates the engine."""
    return max(1, parallel // max(1, active))


def effective_priority(priority: int, waited_s: float, aging_s: float) -> float:
    """A queued job's priority, raised by one for every `aging_s` it has waited."""
    if aging_s <= 0:
        return float(priority)
    return priority + max(0.0, waited_s) / aging_s


@dataclass(frozen=True)
class Waiting:
    """A queued job, as the scheduler weighs it."""

    requester: str
    priority: int
    queued_at: float  # monotonic
    deadline: float | None  # monotonic
    order: int


def pick(
    waiting: Sequence[Waiting],
    running: Mapping[str, int],
    last_started: Mapping[str, float],
    free: int,
    active: Collection[str],
    now: float,
    aging_s: float,
) -> int | None:
    """The index of the queued job that takes one of `free` slots, or None when no queued
    job may: a requester that runs jobs already may take another only if a slot then stays
    free for each other active requester that runs none (it may send a job any moment).
    With `free` 0 or less (the context is short after a preemption, but a slot is there),
    only a requester that runs nothing may start one: the preempted job cannot come
    straight back, and a light requester is not kept waiting by a greedy one's long
    prompts."""
    best: tuple[int, float, float, float, int] | None = None
    chosen: int | None = None
    for i, w in enumerate(waiting):
        runs = running.get(w.requester, 0)
        if runs and free <= 0:
            continue
        if runs:
            idle = sum(1 for r in active if r != w.requester and not running.get(r, 0))
            if free - 1 < idle:
                continue
        key = (
            runs,
            last_started.get(w.requester, -math.inf),
            -effective_priority(w.priority, now - w.queued_at, aging_s),
            w.deadline if w.deadline is not None else math.inf,
            w.order,
        )
        if best is None or key < best:
            best, chosen = key, i
    return chosen


@dataclass(frozen=True)
class Runner:
    """A running job, as preemption weighs it."""

    requester: str
    priority: int
    order: int


def victim(running: Sequence[Runner], counts: Mapping[str, int]) -> int:
    """The running job to put back when the context is full: from the requester running
    the most, its lowest priority, its latest."""
    return max(
        range(len(running)),
        key=lambda i: (counts.get(running[i].requester, 0), -running[i].priority, running[i].order),
    )


def saturating(
    running: Mapping[str, int], waiting: Mapping[str, int], cap: int
) -> tuple[str, int, int] | None:
    """(requester, jobs it runs, jobs of others waiting) when one requester runs at its cap
    with more of its own waiting, while other requesters' jobs wait too: the engine is
    saturated by it. None otherwise (requesters that take turns do not saturate it)."""
    for requester, runs in running.items():
        others = sum(n for r, n in waiting.items() if r != requester)
        if runs >= cap and waiting.get(requester, 0) and others:
            return requester, runs, others
    return None


# A task with at most this many tokens to evaluate (a generating one) always gets them all:
# a few tokens more cost a step almost nothing.
SMALL_NEED = 16
# The least a prompt chunk may be, so a crowded step still moves every prompt on.
MIN_CHUNK = 32
# What another requester's task may add to a step that is not its turn: the next token it
# is generating (and a byte or two the schema forces).
TINY_NEED = 3
# A requester whose pending tokens are at most this many (a sensor's short classify job:
# 20-30) has them read in one step even while others use the engine.
SHORT_JOB = 32
# How fast a requester's served tokens are forgotten: kept x DECAY at every step.
SERVED_DECAY = 0.9


def step_shares(
    left: Sequence[int],
    groups: Sequence[str],
    served: Mapping[str, float],
    wide: int,
    narrow: int,
    also_active: Collection[str] = (),
) -> list[int]:
    """How many of its pending tokens each task evaluates in one engine step.

    The step belongs to one requester: the one served the fewest tokens lately (`served`)
    among those with tokens pending. Its tasks take the budget: generating ones (at most
    SMALL_NEED tokens) all of theirs first, then prompt chunks split evenly in the order
    given, at least MIN_CHUNK each while it lasts (a lone task takes all of it). Other
    requesters' tasks add only a next token they are generating (TINY_NEED): that costs the
    step almost nothing and keeps them moving.

    The budget is `wide` while one requester uses the engine. While several do
    (`also_active`: those with no task in this step), the owner takes all it needs when
    that is a short job's worth (SHORT_JOB tokens), else `narrow`: another requester's
    next job, which may come any moment, waits one short step, not a long prompt's. So a
    requester with one short job has it read in a step of its own instead of beside a
    greedy one's prompts; one that keeps the engine busy is served more and waits its
    turn, and served counts decay, so every requester gets steps."""
    out = [0] * len(left)
    pending = [i for i, n in enumerate(left) if n > 0]
    if not pending:
        return out
    floor = min(served.values(), default=0.0)  # a newcomer starts even with the lightest
    owner = min((served.get(groups[i], floor), groups[i]) for i in pending)[1]
    mine = [i for i in pending if groups[i] == owner]
    need = sum(left[i] for i in mine)
    if len({*groups, *also_active}) == 1:
        budget = wide
    else:  # a short job's prompt in one step; long ones a short step at a time
        budget = min(need, wide) if need <= SHORT_JOB else narrow
    for i in pending:
        if groups[i] != owner and left[i] <= TINY_NEED:
            out[i] = left[i]
    for i in mine:
        if left[i] <= SMALL_NEED and left[i] <= budget:
            out[i] = left[i]
            budget -= left[i]
    big = [i for i in mine if out[i] == 0]
    for k, i in enumerate(big):
        share = max(MIN_CHUNK, budget // (len(big) - k))
        out[i] = min(left[i], share, budget)
        budget -= out[i]
    return out


def served_after(
    served: Mapping[str, float], groups: Sequence[str], tokens: Sequence[int]
) -> dict[str, float]:
    """The served-tokens ledger after a step that evaluated `tokens` for tasks of `groups`:
    every entry decays by SERVED_DECAY, and the step's tokens are added. A requester new to
    the ledger starts even with the lightest one there, not at 0: it has no credit for the
    time it was away (as in start-time fair queuing), so a greedy newcomer cannot own the
    next steps while a light requester waits."""
    floor = min((v * SERVED_DECAY for v in served.values()), default=0.0)
    out = {g: v * SERVED_DECAY for g, v in served.items() if v * SERVED_DECAY >= 1.0}
    for group, n in zip(groups, tokens, strict=True):
        out[group] = out.get(group, floor) + n
    return out


class ShapeBudget:
    """New prompt shapes per requester: a token bucket each (`burst` tokens, refilled at
    `per_minute`), and the shapes seen recently (free to use again). Not thread-safe: one
    owner (the intake) calls it."""

    def __init__(self, per_minute: float, burst: int, known: int = 256) -> None:
        self.per_minute = per_minute
        self.burst = max(1, burst)
        self._known: OrderedDict[str, None] = OrderedDict()
        self._known_max = known
        self._tokens: OrderedDict[str, tuple[float, float]] = OrderedDict()  # -> (tokens, at)

    def admit(self, requester: str, shape: str, now: float) -> float | None:
        """None when the job may run (its shape is known, or a token was spent on it);
        else the seconds until its requester may bring a new shape again."""
        if self.per_minute <= 0 or shape in self._known:
            if shape in self._known:
                self._known.move_to_end(shape)
            return None
        tokens, at = self._tokens.get(requester, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.per_minute / 60.0)
        if tokens < 1.0:
            self._remember(requester, tokens, now)
            return (1.0 - tokens) * 60.0 / self.per_minute
        self._remember(requester, tokens - 1.0, now)
        self._known[shape] = None
        while len(self._known) > self._known_max:
            self._known.popitem(last=False)
        return None

    def _remember(self, requester: str, tokens: float, now: float) -> None:
        self._tokens[requester] = (tokens, now)
        self._tokens.move_to_end(requester)
        while len(self._tokens) > 1024:
            self._tokens.popitem(last=False)
