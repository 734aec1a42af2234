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
    j = Journal(tmp_path / "j.db", 60, 100, clock=clock, mono=clock)
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


# ---- time that jumps, a full disk, a corrupt file (issue 21) -----------------------------


def test_a_wall_clock_step_neither_forgets_nor_expires_within_a_boot(tmp_path: Path) -> None:
    wall, mono = Clock(), Clock()
    j = Journal(tmp_path / "j.db", 60, 100, clock=wall, mono=mono, boot="b1")
    key = job_key("job-1", "edge/replies/s1")
    j.mark_delivered([put(j, 1, key=key)])
    spooled = put(j, 2, deadline=mono.now + 30)
    wall.now += 10 * 365 * 86400  # NTP steps the clock of a Pi that booted in the past
    assert j.lookup(key) is not None  # still remembered: 0 s passed on the monotonic clock
    (pending,) = j.pending()
    assert pending.row == spooled and pending.deadline == mono.now + 30
    mono.now += 61
    assert j.lookup(key) is None  # the window is counted on the monotonic clock


def test_rows_of_an_earlier_boot_are_read_by_the_wall_clock(tmp_path: Path) -> None:
    wall, mono = Clock(), Clock()
    j = Journal(tmp_path / "j.db", 60, 100, clock=wall, mono=mono, boot="b1")
    key = job_key("job-1", "edge/replies/s1")
    j.mark_delivered([put(j, 1, key=key)])
    put(j, 2, deadline=mono.now + 30)
    j.close()
    wall.now += 20
    mono.now = 5.0  # a new boot: the monotonic clock started again
    again = Journal(tmp_path / "j.db", 60, 100, clock=wall, mono=mono, boot="b2")
    stored = again.lookup(key)
    assert stored is not None and stored.age == 20
    (pending,) = again.pending()
    assert pending.deadline == 5.0 + 10  # 10 s of its 30 left, by the wall clock


def full(j: Journal) -> None:
    """SQLite refuses to grow the file: the same SQLITE_FULL a full disk gives."""
    assert j._db is not None
    (pages,) = j._db.execute("PRAGMA page_count").fetchone()
    j._db.execute(f"PRAGMA max_page_count={pages}")


def test_a_full_disk_keeps_replies_in_memory_until_it_takes_them_again(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", 60, 100)
    first = put(j, 0)
    full(j)
    rows = [  # more than the pages it has hold
        j.record(key=f"k{n}", digest="d", job_id=f"j{n}", status="done", topic="r",
                 payload=b"x" * 3000, correlation=None, deadline=None)
        for n in range(1, 60)
    ]  # fmt: skip
    assert j.problem is not None and "full" in j.problem
    assert min(rows) < 0  # kept in memory
    assert [s.job_id for s in j.pending()] == [f"j{n}" for n in range(60)]  # oldest first
    assert j.lookup("k59") is not None  # the dedup memory answers from memory too
    j.mark_delivered([rows[0]])
    assert j.retry() is False  # still full
    assert j._db is not None
    j._db.execute("PRAGMA max_page_count=1073741823")  # space returns
    assert j.retry() is True and j.problem is None
    assert [s.job_id for s in j.pending()] == ["j0", *[f"j{n}" for n in range(2, 60)]]
    assert all(s.row > 0 for s in j.pending())
    j.mark_delivered([rows[1]])  # a row moved to disk is still known by its memory row
    assert "j2" not in [s.job_id for s in j.pending()]
    j.close()
    assert len(Journal(tmp_path / "j.db", 60, 100).pending()) == 58
    assert first > 0


def test_a_journal_that_cannot_be_opened_for_want_of_space_is_kept(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")  # its "parent directory" cannot be made: as ENOSPC would
    j = Journal(blocked / "j.db", 60, 100)
    assert j.problem is not None
    assert put(j, 1) < 0 and [s.job_id for s in j.pending()] == ["j1"]
    assert blocked.read_text() == "x"  # nothing set aside


def test_a_corrupt_journal_is_set_aside_with_its_pending_replies_carried_over(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    j = Journal(path, 60, 100)
    for n in range(3):
        put(j, n)
    j.note_crash("abc", "job")
    assert j._db is not None
    (root,) = j._db.execute("SELECT rootpage FROM sqlite_master WHERE name='crashes'").fetchone()
    (size,) = j._db.execute("PRAGMA page_size").fetchone()
    j._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    j.close()
    with path.open("r+b") as f:  # damage the crash table's page, not the replies'
        f.seek((root - 1) * size)
        f.write(b"\xff" * size)
    again = Journal(path, 60, 100)
    assert [p.name for p in tmp_path.glob("j.db.unreadable-*")]
    assert [s.job_id for s in again.pending()] == ["j0", "j1", "j2"]
    assert again.recovered == 3 and again.problem is None
