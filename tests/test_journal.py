"""The job journal (SQLite, WAL): spool order and bounds, dedup memory, restart."""

from __future__ import annotations

from pathlib import Path

from edge_agent.adapters.journal import (
    DELIVERED,
    IN_FLIGHT,
    PENDING,
    Entry,
    Journal,
    RunningMarker,
    job_key,
)


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
    assert [s.row for s in j.pending(exclude=[rows[0]])] == rows[1:]  # already out
    j.mark_delivered([rows[0]])
    assert j.counts()["spool_pending"] == 4


def test_a_journal_written_by_an_older_version_has_no_reply_in_flight_after_a_restart(
    tmp_path: Path,
) -> None:
    j = Journal(tmp_path / "j.db", 60, 100)
    row = put(j, 1, key="k")
    j._db.execute("UPDATE replies SET state=?, mid=3 WHERE row=?", (IN_FLIGHT, row))
    j.close()
    again = Journal(tmp_path / "j.db", 60, 100)
    assert [s.row for s in again.pending()] == [row]
    stored = again.lookup("k")
    assert stored is not None and stored.state == PENDING


def test_spool_bound_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", 60, 3)
    rows = [put(j, n) for n in range(5)]
    assert [s.row for s in j.pending()] == rows[2:]
    assert j.counts()["spool_dropped_full"] == 2


def test_a_batch_is_stored_in_one_transaction_in_order(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", 60, 100)
    rows = j.record_many(
        [Entry(f"k{n}", "d", f"j{n}", "done", "r", b"p", None, None) for n in range(3)]
    )
    assert rows == sorted(rows) and len(set(rows)) == 3
    assert [s.job_id for s in j.pending()] == ["j0", "j1", "j2"]


def test_dropped_replies_are_counted_by_why(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", 60, 100)
    late, bad = put(j, 1, deadline=1.0), put(j, 2)
    j.drop(late, "expired")
    j.drop(bad, "unsendable")
    counts = j.counts()
    assert counts["spool_pending"] == 0
    assert (counts["spool_dropped_expired"], counts["spool_dropped_unsendable"]) == (1, 1)


def test_dedup_memory_lasts_the_window(tmp_path: Path) -> None:
    clock = Clock()
    j = Journal(tmp_path / "j.db", 60, 100, clock=clock)
    key = job_key("job-1", "edge/replies/s1")
    row = put(j, 1, key=key)
    j.mark_delivered([row])
    stored = j.lookup(key)
    assert stored is not None and stored.state == DELIVERED and stored.payload == b"p1"
    clock.now += 61
    assert j.lookup(key) is None
    # the journal prunes every 256 stored replies, on the writer's thread
    for n in range(2, 258):
        j.mark_delivered([put(j, n)])
    assert j.counts()["remembered"] == 0


def test_unremembered_replies_leave_once_delivered(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", 60, 100)
    row = put(j, 1)
    j.mark_delivered([row])
    assert j.counts() == {
        "spool_pending": 0,
        "remembered": 0,
        "spool_dropped_full": 0,
        "spool_dropped_expired": 0,
        "spool_dropped_unsendable": 0,
        "poison_jobs": 0,
    }


def test_a_job_is_poison_after_it_was_running_at_two_deaths(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", 60, 100)
    assert j.note_crash("abc", "job-1") == 1
    assert not j.is_poison("abc")
    j.close()
    again = Journal(tmp_path / "j.db", 60, 100)  # the count survives the restart
    assert again.note_crash("abc", "job-1") == 2
    assert again.is_poison("abc")
    assert again.counts()["poison_jobs"] == 1


def test_a_journal_sqlite_cannot_read_is_set_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    path.write_bytes(b"this is not an SQLite database at all" * 100)
    j = Journal(path, 60, 100)
    assert put(j, 1) > 0
    assert [p.name for p in tmp_path.glob("j.db.unreadable-*")]


def test_the_running_marker_names_the_running_jobs_once(tmp_path: Path) -> None:
    marker = RunningMarker(tmp_path / "running")
    assert marker.take() == []
    marker.set("d1", "job-1")
    assert RunningMarker(tmp_path / "running").take() == [("d1", "job-1")]
    assert marker.take() == []
    marker.set_running([("d2", "job-2"), ("d3", "job-3")])
    assert marker.take() == [("d2", "job-2"), ("d3", "job-3")]
    marker.set("d2", "job-2")
    marker.clear()
    assert marker.take() == []
    (tmp_path / "running").write_text("{not json")
    assert marker.take() == []
    # the one-job file of an earlier release still counts after an upgrade
    (tmp_path / "running").write_text('{"digest": "d4", "id": "job-4"}')
    assert marker.take() == [("d4", "job-4")]
    (tmp_path / "running").write_text('{"jobs": [{"digest": 5}, {"digest": "d6"}]}')
    assert marker.take() == [("d6", None)]


def test_keys_separate_requesters() -> None:
    assert job_key("1", "edge/replies/a") != job_key("1", "edge/replies/b")
    assert IN_FLIGHT != PENDING != DELIVERED
