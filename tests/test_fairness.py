"""Fair shares of the engine (core/fairness.py): the pure decisions, with made-up counts and
clocks. The same rules against a running agent and real requesters are in
tests/test_starvation.py."""

from __future__ import annotations

import pytest

from edge_agent.core.fairness import (
    MIN_CHUNK,
    Runner,
    ShapeBudget,
    Waiting,
    effective_priority,
    fair_slots,
    held_share,
    pick,
    saturating,
    served_after,
    step_shares,
    victim,
)
from edge_agent.core.protocol import Topics


def test_a_requester_is_the_reply_subtree_of_the_fleets_convention() -> None:
    topics = Topics("edge", "pi-1", "g")
    assert topics.requester_of("edge/replies/alice/job-7") == "edge/replies/alice"
    assert topics.requester_of("edge/replies/alice") == "edge/replies/alice"
    assert topics.requester_of("edge/devices/pi-1/results") == "edge/devices/pi-1/results"
    assert topics.requester_of("other/replies/x/y") == "other/replies/x/y"


def test_each_active_requester_may_hold_its_share_of_the_window() -> None:
    assert held_share(8, 1) == 8
    assert held_share(8, 2) == 4
    assert held_share(8, 100) == 1  # never nothing


def test_a_requesters_due_slots_are_its_share_of_them() -> None:
    assert fair_slots(4, 1) == 4
    assert fair_slots(4, 2) == 2
    assert fair_slots(1, 3) == 1  # one slot cannot be split


def wait(requester: str, priority: int = 5, at: float = 0.0, order: int = 0) -> Waiting:
    return Waiting(requester, priority, at, None, order)


def test_a_free_slot_goes_to_the_requester_running_fewest_whatever_the_priorities() -> None:
    queue = [wait("a", 9, order=1), wait("a", 9, order=2), wait("b", 1, order=3)]
    assert pick(queue, {"a": 2, "b": 0}, {}, 2, {"a", "b"}, 0.0, 5.0) == 2


def test_requesters_running_alike_take_turns_served_longest_ago_first() -> None:
    queue = [wait("a", 9, order=1), wait("b", 1, order=2)]
    assert pick(queue, {}, {"a": 10.0, "b": 5.0}, 1, {"a", "b"}, 11.0, 5.0) == 1
    assert pick(queue, {}, {"a": 5.0, "b": 10.0}, 1, {"a", "b"}, 11.0, 5.0) == 0


def test_within_a_requester_priority_decides_and_age_raises_it() -> None:
    # a stream of fresh priority-9 jobs: one that waited 20 s at 5 outranks the next
    old_low = wait("a", 5, at=0.0, order=1)
    assert pick([old_low, wait("a", 9, at=19.0, order=2)], {}, {}, 1, {"a"}, 19.0, 5.0) == 1
    assert pick([old_low, wait("a", 9, at=21.0, order=3)], {}, {}, 1, {"a"}, 21.0, 5.0) == 0
    assert effective_priority(5, 20.0, 0.0) == 5.0  # aging off


def test_a_slot_stays_free_for_each_active_requester_that_runs_nothing() -> None:
    queue = [wait("a", order=1), wait("c", order=2)]
    # a runs 2 and c 1 of 4 slots; b uses the agent but runs nothing: the last slot is b's
    assert pick(queue, {"a": 2, "c": 1}, {}, 1, {"a", "b", "c"}, 0.0, 5.0) is None
    assert pick(queue, {"a": 2, "c": 1}, {}, 2, {"a", "b", "c"}, 0.0, 5.0) == 1
    assert pick([wait("b")], {"a": 2, "c": 1}, {}, 1, {"a", "b", "c"}, 0.0, 5.0) == 0
    assert pick([wait("a")], {"a": 3}, {}, 1, {"a"}, 0.0, 5.0) == 0  # alone: all slots


def test_preemption_takes_from_the_requester_running_most_its_least_urgent() -> None:
    running = [Runner("a", 9, 1), Runner("a", 2, 2), Runner("b", 1, 3)]
    assert victim(running, {"a": 2, "b": 1}) == 1


def test_saturation_is_one_requester_at_its_cap_while_others_wait() -> None:
    assert saturating({"a": 3}, {"a": 5, "b": 1}, cap=3) == ("a", 3, 1)
    assert saturating({"a": 3}, {"a": 5}, cap=3) is None  # nobody else waits
    assert saturating({"a": 2, "b": 1}, {"b": 1}, cap=3) is None
    assert saturating({"b": 1}, {"a": 1}, cap=1) is None  # taking turns for one slot


def test_a_step_belongs_to_the_requester_served_least_others_add_only_a_token() -> None:
    # b's short prompt is read in a step of its own; a's generating task adds its token,
    # a's prompt waits
    shares = step_shares([200, 1, 26], ["a", "a", "b"], {"a": 900.0, "b": 0.0}, wide=128, narrow=32)
    assert shares == [0, 1, 26]


def test_a_step_is_narrow_while_another_requester_may_send_any_moment() -> None:
    wide = step_shares([600], ["a"], {"a": 900.0}, wide=512, narrow=32)
    narrow = step_shares([600], ["a"], {"a": 900.0, "b": 30.0}, 512, 32, also_active={"b"})
    # a flood that has just come is served less than a sensor that sends steadily: narrow
    newcomer = step_shares([600], ["a"], {"b": 300.0}, 512, 32, also_active={"b"})
    assert (wide, narrow, newcomer) == ([512], [32], [32])


def test_one_requesters_tasks_split_the_prompt_budget_in_order() -> None:
    shares = step_shares([100, 100, 5], ["a", "a", "a"], {}, wide=128, narrow=32)
    assert shares[2] == 5  # generating: all of it first
    assert shares[0] + shares[1] <= 128 - 5 and min(shares[:2]) >= MIN_CHUNK


def test_served_counts_decay_so_every_requester_gets_its_turn() -> None:
    served = {"a": 0.0, "b": 0.0}
    owners = []
    for _ in range(20):  # both keep long prompts pending
        shares = step_shares([500, 500], ["a", "b"], served, wide=64, narrow=64)
        owners.append("a" if shares[0] else "b")
        served = served_after(served, ["a", "b"], shares)
    assert owners.count("a") == owners.count("b") == 10


def test_served_after_forgets_what_decays_away() -> None:
    after = served_after({"gone": 1.05, "kept": 100.0}, ["new"], [3])
    assert after == {"kept": pytest.approx(90.0), "new": pytest.approx(3 + 1.05 * 0.9)}


def test_new_shapes_cost_their_requester_a_token_each_known_ones_nothing() -> None:
    budget = ShapeBudget(per_minute=6, burst=2)
    assert budget.admit("a", "s1", now=0.0) is None
    assert budget.admit("a", "s2", now=0.0) is None
    wait_s = budget.admit("a", "s3", now=0.0)
    assert wait_s == pytest.approx(10.0)  # one token every 10 s
    assert budget.admit("a", "s1", now=0.0) is None  # known: free
    assert budget.admit("b", "s4", now=0.0) is None  # another requester's own budget
    assert budget.admit("a", "s3", now=10.0) is None  # refilled
    assert ShapeBudget(per_minute=0, burst=1).admit("a", "x", 0.0) is None  # no limit


def test_a_newcomer_starts_even_with_the_lightest_requester_not_ahead_of_it() -> None:
    served = {"light": 40.0, "busy": 900.0}
    # the newcomer ties with "light": it owns no more steps than "light" does
    owners = []
    for _ in range(4):
        shares = step_shares([300, 20], ["new", "light"], served, wide=32, narrow=32)
        owners.append("new" if shares[0] > 1 else "light")
        served = served_after(served, ["new", "light"], shares)
    assert owners.count("light") >= 1 and owners[:2] != ["new", "new"]


def test_after_a_preemption_only_a_requester_running_nothing_may_start() -> None:
    queue = [wait("a", 9, order=1), wait("b", 1, order=2)]
    assert pick(queue, {"a": 2}, {}, 0, {"a", "b"}, 0.0, 5.0) == 1
    assert pick([wait("a")], {"a": 2}, {}, 0, {"a"}, 0.0, 5.0) is None


def test_a_short_job_is_read_in_one_step_even_while_others_use_the_engine() -> None:
    shares = step_shares([26], ["b"], {"a": 900.0}, wide=128, narrow=16, also_active={"a"})
    assert shares == [26]
