"""The job journal (SQLite, WAL): spool order and bounds, dedup memory, restart."""

from __future__ import annotations

from pathlib import Path

from edge_agent.journal import DELIVERED, IN_FLIGHT, PENDING, Journal, job_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def put(j: Journal, n: int, key: str | None = None, deadline: float | None = None) -> int:
    return j.record(
        key=key,
        digest="d",
        job_id=f"j{n}",
        status="done",
        topic="r",
        payload=f"p{n}".encode(),
        correlation=None,
        deadline=deadline,
    )


def test_pending_replies_come_back_oldest_first(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", 60, 100)
    rows = [put(j, n) for n in range(5)]
    assert [s.row for s in j.pending()] == rows
    j.mark_in_flight(rows[0], mid=7)
    assert [s.row for s in j.pending()] == rows[1:]
    j.mark_delivered(rows[0])
    assert j.counts()["spool_pending"] == 4


def test_in_flight_replies_are_pending_again_after_a_restart(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", 60, 100)
    row = put(j, 1, key="k")
    j.mark_in_flight(row, mid=3)
    j.close()
    again = Journal(tmp_path / "j.db", 60, 100)
    assert [s.row for s in again.pending()] == [row]
    assert again.lookup("k") is not None and again.lookup("k").state == PENDING  # type: ignore[union-attr]


def test_spool_bound_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", 60, 3)
    rows = [put(j, n) for n in range(5)]
    assert [s.row for s in j.pending()] == rows[2:]
    assert j.counts()["spool_dropped_full"] == 2


def test_replies_past_their_deadline_are_dropped_from_the_spool(tmp_path: Path) -> None:
    clock = Clock()
    j = Journal(tmp_path / "j.db", 60, 100, clock=clock)
    put(j, 1, deadline=1005.0)
    keep = put(j, 2, deadline=2000.0)
    clock.now = 1010.0
    assert [s.row for s in j.pending()] == [keep]
    assert j.counts()["spool_dropped_expired"] == 1


def test_dedup_memory_lasts_the_window(tmp_path: Path) -> None:
    clock = Clock()
    j = Journal(tmp_path / "j.db", 60, 100, clock=clock)
    key = job_key("job-1", "edge/replies/s1")
    row = put(j, 1, key=key)
    j.mark_delivered(row)
    stored = j.lookup(key)
    assert stored is not None and stored.state == DELIVERED and stored.payload == b"p1"
    clock.now += 61
    assert j.lookup(key) is None
    j.prune()
    assert j.counts()["remembered"] == 0


def test_unremembered_replies_leave_once_delivered(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", 60, 100)
    row = put(j, 1)
    j.mark_in_flight(row, 1)
    j.mark_delivered(row)
    assert j.counts() == {
        "spool_pending": 0,
        "remembered": 0,
        "spool_dropped_full": 0,
        "spool_dropped_expired": 0,
    }


def test_keys_separate_requesters() -> None:
    assert job_key("1", "edge/replies/a") != job_key("1", "edge/replies/b")
    assert IN_FLIGHT != PENDING != DELIVERED
