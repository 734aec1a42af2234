"""How many jobs run at once (core/slots.py): at most the engine's capacity, fewer right
after a preemption, one more as each job ends."""

from __future__ import annotations

from edge_agent.core.slots import Slots


def test_at_most_capacity_jobs_run() -> None:
    slots = Slots(3)
    assert [slots.free(n) for n in range(5)] == [True, True, True, False, False]
    assert Slots(0).parallel == 1  # an engine always holds one


def test_after_a_preemption_the_room_is_what_ran_and_grows_by_one_per_end() -> None:
    slots = Slots(4)
    slots.preempted(running=2)
    assert slots.fair_room(2) == 0  # the preempted job does not come straight back
    slots.ended()
    assert slots.fair_room(1) == 2
    for _ in range(5):
        slots.ended()
    assert slots.room == 4  # never past capacity


def test_another_engine_brings_its_own_capacity() -> None:
    slots = Slots(4)
    slots.preempted(1)
    slots.resize(2)
    assert (slots.parallel, slots.room) == (2, 2)
