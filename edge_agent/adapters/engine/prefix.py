"""Prompt prefixes kept evaluated in the KV cache: each prefix slot (a sequence) holds
one shape's fixed part for every job of that shape, evaluated once; a slot that takes
another prefix saves its state first (`StateCache`), to be restored instead of evaluated
when that prefix comes back.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from cachetools import LRUCache

from edge_agent.adapters.engine.need import WAIT, Gen, Need, Run
from edge_agent.adapters.engine.port import Context
from edge_agent.core.inference import Timings


class StateCache:
    """Saved KV states of prompt prefixes, bounded by their total size, least recently
    used dropped first (cachetools' LRUCache weighing each state by its bytes)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: LRUCache[str, bytes] = LRUCache(maxsize=max(capacity, 1), getsizeof=len)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> bytes | None:
        return self._items.get(key)

    def put(self, key: str, value: bytes) -> None:
        if key in self._items or len(value) > self.capacity:
            return  # a state bigger than the whole cache is not kept (nor evicts the rest)
        self._items[key] = value


@dataclass(eq=False)
class Slot:
    """A KV sequence that holds one prompt prefix, shared by the jobs of that shape."""

    seq: int
    key: str | None = None
    tokens: list[int] = field(default_factory=list)
    building: bool = False
    used: int = 0
    keep: bool = True  # save its state when it takes another prefix


class PrefixSlots:
    """The prefix slots (sequences 0..count-1) and the saved states of prefixes."""

    def __init__(self, ctx: Context, count: int, cache_bytes: int, stats: dict[str, int]) -> None:
        self._ctx = ctx
        self._cache_bytes = cache_bytes
        self.slots = [Slot(seq) for seq in range(count)]
        self.saved = StateCache(cache_bytes)
        self._tick = 0
        self.stats = stats
        for name in ("prefix_hits", "prefix_restores", "prefix_misses"):
            stats.setdefault(name, 0)

    def attach(self, run: Run, prefix: list[int], timings: Timings, keep: bool = True) -> Gen[None]:
        """Give the job's sequence the shape's prefix: shared cells of a prefix slot,
        evaluated once, restored from a saved state, or built from the longest common
        start of the slot it takes."""
        key = token_key(prefix)
        while True:
            slot = next((s for s in self.slots if s.key == key), None)
            if slot is not None and not slot.building:
                self.stats["prefix_hits"] += 1
                timings.cached_tokens = len(prefix)
                self._share(slot, run, len(prefix))
                return
            idle = [s for s in self.slots if not s.building]
            if slot is None and idle:
                break
            yield WAIT  # another job is building this prefix, or every slot is
        victim = min(idle, key=lambda s: s.used)
        self._save(victim)
        saved = self.saved.get(key)
        # The slot's own start is kept when the new prefix shares it (a longer or edited
        # fixed part). Cells copied from another slot's start would do too in theory, but
        # scores then moved by up to 0.02 (attention over cells in another order), so a
        # new prefix is evaluated whole.
        common = common_prefix(victim.tokens, prefix) if saved is None else 0
        self._ctx.seq_remove(victim.seq, common, -1)
        victim.key, victim.tokens, victim.building = key, list(prefix), True
        victim.keep = keep
        try:
            if saved is not None:
                if self._ctx.restore_sequence(victim.seq, saved):
                    self.stats["prefix_restores"] += 1
                    timings.cached_tokens = len(prefix)
                else:  # restore failed: evaluate it
                    self._ctx.seq_remove(victim.seq)
                    saved = None
            if saved is None:
                self.stats["prefix_misses"] += 1
                rest = prefix[common:]
                if rest:
                    yield Need.one_run(rest, common, victim.seq, logits=False)
                timings.cached_tokens = common
                timings.prompt_tokens += len(rest)
        except BaseException:
            self._ctx.seq_remove(victim.seq)
            victim.key, victim.tokens, victim.building = None, [], False
            raise
        victim.building = False
        self._share(victim, run, len(prefix))

    def drop_idle(self) -> bool:
        """Free the cells of prefixes no job is building (under memory pressure); True if
        there was one. Jobs that share a prefix keep their cells."""
        dropped = False
        for slot in self.slots:
            if slot.tokens and not slot.building:
                self._save(slot)
                self._ctx.seq_remove(slot.seq)
                slot.key, slot.tokens = None, []
                dropped = True
        return dropped

    def reset(self) -> None:
        """Forget every slot's prefix and every saved state (the cache was cleared)."""
        for slot in self.slots:
            slot.key, slot.tokens, slot.building, slot.used = None, [], False, 0
        self.saved = StateCache(self._cache_bytes)

    def _share(self, slot: Slot, run: Run, length: int) -> None:
        self._tick += 1
        slot.used = self._tick
        self._ctx.seq_copy(slot.seq, run.seq)
        run.pos = length

    def _save(self, slot: Slot) -> None:
        """Keep a slot's prefix state before the slot takes another one."""
        if not slot.tokens or slot.key is None or not slot.keep or slot.key in self.saved:
            return
        if self.saved.capacity <= 0:
            return
        data = self._ctx.save_sequence(slot.seq, self.saved.capacity)
        if data is not None:
            self.saved.put(slot.key, data)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def token_key(tokens: Sequence[int]) -> str:
    return hashlib.blake2b(array("i", tokens).tobytes(), digest_size=16).hexdigest()
