"""The job journal: every final reply, durably, until it is delivered (and remembered for
the dedup window when it answers a job that ran), and the jobs that crashed the agent.

Adapter over SQLite in WAL mode, in the state directory. Tables:
    replies  the spool (replies the broker has not acknowledged: pending or in flight),
             published oldest first after a reconnect or a restart, bounded in count;
             and the dedup memory (`done` and `failed` replies by job key), so a
             redelivered or retried job gets the stored reply instead of running twice.
    crashes  payload digests of jobs that were running when the agent died, with a count:
             a job that did it twice is poison and is answered without running again.

One writer: only the outbox's thread calls the methods marked "writer" (plus start-up,
before any thread runs). Readers (`lookup`, `pending`, `counts`, `is_poison`) use a
connection of their own: in WAL mode a reader never waits for the writer's fsync, so the
intake stays quick on an SD card whose fsync takes a second.

A reply is committed (fsync) before the job's PUBLISH is acknowledged: a crash after that
point loses nothing, the reply goes out after restart.

Time. Deadlines come and go on the monotonic clock (the agent's clock for every duration);
the journal keeps each time twice, as wall-clock time and as monotonic time with the boot
it belongs to, and reads it back on the monotonic clock when the boot is the same: a clock
that NTP steps by hours after a Pi boots without a real-time clock neither expires the
spool nor forgets the dedup memory. Rows of an earlier boot are read by the wall clock.

A full disk is not a corrupt journal. SQLite's "database or disk is full" and "disk I/O
error" leave the journal where it is: its replies stay on disk, new ones are kept in
memory meanwhile (`problem` says why, and health turns degraded), and `retry()` (the
outbox, every few seconds) moves them to disk once it can write again. Only a file SQLite
reports corrupt (SQLITE_CORRUPT, SQLITE_NOTADB, or a failed quick check) is set aside, and
the pending replies that can still be read from it are carried over.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from edge_agent.core.errors import StoreError

log = structlog.get_logger("edge_agent.journal")

# IN_FLIGHT is only found in journals of earlier versions: which replies are out is kept in
# memory now (a restart makes them all pending again anyway).
PENDING, IN_FLIGHT, DELIVERED = 0, 1, 2
# A job that was running when the agent died this many times is not run again.
POISON_AFTER_CRASHES = 2
# SQLite's primary result codes that mean the file itself is damaged; every other error
# (full, I/O, cannot open, read-only, busy) is the storage's, and the file is kept.
_CORRUPT_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE,
    digest TEXT,
    job_id TEXT,
    status TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    correlation BLOB,
    created REAL NOT NULL,
    deadline REAL,
    state INTEGER NOT NULL,
    mid INTEGER
);
CREATE INDEX IF NOT EXISTS replies_state ON replies(state, row);
CREATE INDEX IF NOT EXISTS replies_created ON replies(created);
CREATE TABLE IF NOT EXISTS crashes (
    digest TEXT PRIMARY KEY,
    job_id TEXT,
    count INTEGER NOT NULL,
    last REAL NOT NULL
);
"""
# Added after the first release: the monotonic times, and the boot they belong to.
_NEW_COLUMNS = (("boot", "TEXT"), ("created_mono", "REAL"), ("deadline_mono", "REAL"))
_SELECT_BY_KEY = (
    "SELECT row, key, digest, job_id, status, topic, payload, correlation, created, deadline,"
    " state, boot, created_mono, deadline_mono FROM replies WHERE key=?"
)
_SELECT_PENDING = (
    "SELECT row, key, digest, job_id, status, topic, payload, correlation, created, deadline,"
    " state, boot, created_mono, deadline_mono FROM replies WHERE state=? ORDER BY row LIMIT ?"
)
_INSERT = (
    "INSERT OR REPLACE INTO replies (key, digest, job_id, status, topic, payload, correlation,"
    " created, deadline, state, boot, created_mono, deadline_mono)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def job_key(job_id: str, reply_topic: str) -> str:
    """Dedup key: the same id from a different requester (reply topic) is a different job."""
    return hashlib.sha256(f"{job_id}\x00{reply_topic}".encode("utf-8", "surrogatepass")).hexdigest()


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True)
class Stored:
    row: int  # negative: kept in memory while the disk cannot take it
    key: str | None
    digest: str | None
    job_id: str | None
    status: str
    topic: str
    payload: bytes
    correlation: bytes | None
    created: float  # wall clock
    deadline: float | None  # monotonic, as the outbox's deadlines are
    state: int
    age: float = 0.0  # seconds since it was stored (monotonic within a boot)


@dataclass(frozen=True)
class Entry:
    """One reply to store. `deadline` is on the monotonic clock."""

    key: str | None
    digest: str | None
    job_id: str | None
    status: str
    topic: str
    payload: bytes
    correlation: bytes | None
    deadline: float | None


class _Unavailable(Exception):
    """The storage refused (full, I/O error, cannot open): not the file's fault."""


def is_corrupt(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the file itself is damaged (as opposed to the disk being full,
    failing or read-only, which a restart or freed space cures)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _CORRUPT_CODES
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


class Journal:
    """Durable replies (the offline spool and the dedup memory) and the crash record."""

    def __init__(
        self,
        path: Path,
        dedup_window_s: float,
        spool_max: int,
        synchronous: str = "FULL",
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        boot: str = "",
    ) -> None:
        self.path = path
        self.dedup_window_s = dedup_window_s
        self.spool_max = spool_max
        self.clock = clock  # the wall clock
        self.mono = mono
        # This boot's id: rows of the same boot are read on the monotonic clock. Unknown
        # (""), this process stands for it: its own rows are, older ones go by the wall.
        self.boot = boot or f"process-{uuid.uuid4().hex}"
        self._write_lock = threading.Lock()  # one writer; the lock only guards misuse
        self._read_lock = threading.Lock()
        self.dropped_full = 0  # pending replies dropped because the spool was full
        self.dropped_expired = 0  # pending replies dropped because their deadline passed
        self.dropped_unsendable = 0  # pending replies the link refused again and again
        self.recovered = 0  # pending replies carried over from a journal set aside
        self._records = 0
        self._syncs = 0
        self._synchronous = synchronous.upper()
        # While the disk refuses: replies and crash counts in memory (negative rows), and
        # what happened to rows on disk that could not be written down yet.
        self.problem: str | None = None
        self._mem: dict[int, Stored] = {}
        self._mem_at: dict[int, float] = {}  # memory row -> when it was kept (monotonic)
        self._mem_rows = itertools.count(-1, -1)
        self._mem_crashes: dict[str, int] = {}
        self._unsaved_delivered: set[int] = set()
        self._unsaved_dropped: set[int] = set()
        self._moved: dict[int, int] = {}  # memory row -> its row on disk, once moved
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        try:
            self._open_all()
        except _Unavailable as exc:
            self._unavailable(exc)

    # ---- opening ------------------------------------------------------------------------

    def _open_all(self) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _Unavailable(f"{path.parent}: {exc.strerror or exc}") from exc
        recovered: list[Stored] = []
        try:
            db = self._open(path)
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise _Unavailable(str(exc)) from exc
            recovered = self._set_aside(path, exc)
            try:
                db = self._open(path)
            except sqlite3.Error as again:
                raise _Unavailable(str(again)) from again
        try:
            reader = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=30
            )
            reader.execute("PRAGMA query_only=1")
        except sqlite3.Error as exc:
            db.close()
            raise _Unavailable(str(exc)) from exc
        self._db, self._reader = db, reader
        if recovered:
            self._carry_over(recovered)

    def _open(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            (verdict,) = db.execute("PRAGMA quick_check(1)").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({verdict})")
            db.executescript(_SCHEMA)
            present = {row[1] for row in db.execute("PRAGMA table_info(replies)")}
            for name, kind in _NEW_COLUMNS:
                if name not in present:
                    db.execute(f"ALTER TABLE replies ADD COLUMN {name} {kind}")
            # Nothing is in flight in a new process: paho's own resend queue died with the
            # old one, so replies it held are pending again.
            db.execute("UPDATE replies SET state=?, mid=NULL WHERE state=?", (PENDING, IN_FLIGHT))
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _set_aside(self, path: Path, exc: sqlite3.Error) -> list[Stored]:
        """Move a corrupt journal aside (kept for inspection) and read what pending replies
        can still be read from it."""
        aside = path.with_name(f"{path.name}.unreadable-{int(self.clock())}")
        log.error("journal.unreadable", path=str(path), error=str(exc), moved_to=str(aside))
        for suffix in ("", "-wal", "-shm"):
            old = Path(f"{path}{suffix}")
            if old.exists():
                os.replace(old, Path(f"{aside}{suffix}"))
        found: list[Stored] = []
        try:
            old_db = sqlite3.connect(f"file:{aside}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error:
            return found
        try:
            cursor = old_db.execute(
                "SELECT row, key, digest, job_id, status, topic, payload, correlation, created,"
                " deadline, state FROM replies WHERE state IN (?, ?) ORDER BY row",
                (PENDING, IN_FLIGHT),
            )
            for row in cursor:  # up to where the damage is
                wall = row[9]
                deadline = None if wall is None else self.mono() + (float(wall) - self.clock())
                found.append(
                    Stored(
                        int(row[0]),
                        row[1],
                        row[2],
                        row[3],
                        str(row[4]),
                        str(row[5]),
                        bytes(row[6]),
                        row[7],
                        float(row[8]),
                        deadline,
                        PENDING,
                    )
                )
        except sqlite3.Error as why:
            log.warning("journal.recovery_partial", recovered=len(found), error=str(why))
        finally:
            old_db.close()
        return found

    def _carry_over(self, rows: list[Stored]) -> None:
        """Pending replies read from a journal set aside, into the new one."""
        entries = [
            Entry(
                s.key, s.digest, s.job_id, s.status, s.topic, s.payload, s.correlation, s.deadline
            )
            for s in rows
        ]
        self.record_many(entries)
        self.recovered += len(entries)
        log.warning("journal.recovered", replies=len(entries))

    def _unavailable(self, exc: BaseException) -> None:
        if self.problem is None:
            log.error("journal.unwritable", path=str(self.path), error=str(exc))
        self.problem = f"journal cannot be written ({exc}): replies are kept in memory"

    def retry(self) -> bool:
        """Writer: try the disk again after it refused; move what was kept in memory onto
        it. True when the journal is whole on disk again."""
        if self.problem is None:
            return True
        if self._db is None:
            try:
                self._open_all()
            except _Unavailable as exc:
                self.problem = f"journal cannot be written ({exc}): replies are kept in memory"
                return False
        try:
            self._save_memory()
        except sqlite3.Error as exc:
            self._unavailable(exc)
            return False
        log.info("journal.writable", path=str(self.path))
        self.problem = None
        return True

    def _save_memory(self) -> None:
        assert self._db is not None
        with self._write_lock:
            with self._read_lock:
                waiting = sorted(self._mem.values(), key=lambda s: -s.row)
                crashes = dict(self._mem_crashes)
            now, mono = self.clock(), self.mono()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                moved: dict[int, int] = {}
                for s in waiting:
                    cursor = self._db.execute(
                        _INSERT,
                        self._values(s, s.deadline, now, mono, s.state),
                    )
                    moved[s.row] = int(cursor.lastrowid or 0)
                for row in self._unsaved_delivered:
                    self._mark_delivered_sql(row)
                for row in self._unsaved_dropped:
                    self._db.execute(
                        "DELETE FROM replies WHERE row=? AND state<>?", (row, DELIVERED)
                    )
                for digest, count in crashes.items():
                    self._db.execute(
                        "INSERT INTO crashes (digest, job_id, count, last) VALUES (?,NULL,?,?)"
                        " ON CONFLICT(digest) DO UPDATE SET count=count+excluded.count",
                        (digest, count, now),
                    )
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise
            with self._read_lock:
                for old in moved:
                    self._forget(old)
                self._moved.update(moved)
                self._mem_crashes.clear()
                self._unsaved_delivered.clear()
                self._unsaved_dropped.clear()

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            for db in (self._reader, self._db):
                if db is not None:
                    with contextlib.suppress(sqlite3.Error):
                        db.close()

    # ---- time -----------------------------------------------------------------------

    def _read(self, raw: tuple[Any, ...]) -> Stored:
        """A row as the callers see it: its deadline and age on the monotonic clock."""
        (row, key, digest, job_id, status, topic, payload, correlation, created, deadline,
         state, boot, created_mono, deadline_mono) = raw  # fmt: skip
        now, mono = self.clock(), self.mono()
        same_boot = boot == self.boot
        age = mono - created_mono if same_boot and created_mono is not None else now - created
        mono_deadline: float | None = None
        if same_boot and deadline_mono is not None:
            mono_deadline = float(deadline_mono)
        elif deadline is not None:
            mono_deadline = mono + (float(deadline) - now)
        return Stored(
            int(row), key, digest, job_id, str(status), str(topic), bytes(payload),
            correlation, float(created), mono_deadline, int(state), max(0.0, float(age)),
        )  # fmt: skip

    def _values(
        self, e: Entry | Stored, deadline: float | None, now: float, mono: float, state: int
    ) -> tuple[object, ...]:
        wall_deadline = None if deadline is None else now + (deadline - mono)
        return (
            e.key, e.digest, e.job_id, e.status, e.topic, e.payload, e.correlation,
            now, wall_deadline, state, self.boot, mono, deadline,
        )  # fmt: skip

    # ---- readers (any thread) ----------------------------------------------------------

    def lookup(self, key: str) -> Stored | None:
        with self._read_lock:
            kept = next((s for s in self._mem.values() if s.key == key), None)
            raw = None
            if kept is None and self._reader is not None:
                try:
                    raw = self._reader.execute(_SELECT_BY_KEY, (key,)).fetchone()
                except sqlite3.Error as exc:
                    log.warning("journal.read_failed", error=str(exc))
        if kept is not None:
            at = self._mem_at.get(kept.row, self.mono())
            stored = replace(kept, age=max(0.0, self.mono() - at))
        elif raw is not None:
            stored = self._read(raw)
        else:
            return None
        if stored.state == DELIVERED and stored.age > self.dedup_window_s:
            return None
        return stored

    def pending(self, limit: int = 1000, exclude: Sequence[int] = ()) -> list[Stored]:
        """Replies waiting to be published, oldest first (`exclude`: rows already out)."""
        with self._read_lock:
            skip = {self._moved.get(r, r) for r in exclude} | self._unsaved_delivered
            skip |= self._unsaved_dropped
            rows: list[tuple[Any, ...]] = []
            if self._reader is not None:
                try:
                    rows = self._reader.execute(
                        _SELECT_PENDING,
                        (PENDING, limit + len(skip)),
                    ).fetchall()
                except sqlite3.Error as exc:
                    log.warning("journal.read_failed", error=str(exc))
            kept = sorted(
                (s for s in self._mem.values() if s.state == PENDING), key=lambda s: -s.row
            )
        found = [s for s in (self._read(r) for r in rows) if s.row not in skip]
        found += [s for s in kept if s.row not in skip]
        return found[:limit]

    def is_poison(self, digest: str) -> bool:
        return self._crash_count(digest) >= POISON_AFTER_CRASHES

    def _crash_count(self, digest: str) -> int:
        with self._read_lock:
            count = self._mem_crashes.get(digest, 0)
            if self._reader is not None:
                try:
                    row = self._reader.execute(
                        "SELECT count FROM crashes WHERE digest=?", (digest,)
                    ).fetchone()
                except sqlite3.Error as exc:
                    log.warning("journal.read_failed", error=str(exc))
                    row = None
                if row is not None:
                    count += int(row[0])
        return count

    def counts(self) -> dict[str, int]:
        by_state: dict[int, int] = {}
        poison = 0
        with self._read_lock:
            if self._reader is not None:
                try:
                    by_state = dict(
                        self._reader.execute(
                            "SELECT state, COUNT(*) FROM replies GROUP BY state"
                        ).fetchall()
                    )
                    (poison,) = self._reader.execute(
                        "SELECT COUNT(*) FROM crashes WHERE count >= ?", (POISON_AFTER_CRASHES,)
                    ).fetchone()
                except sqlite3.Error as exc:
                    log.warning("journal.read_failed", error=str(exc))
            for s in self._mem.values():
                by_state[s.state] = by_state.get(s.state, 0) + 1
            unsaved = len(self._unsaved_delivered | self._unsaved_dropped)
        pending = int(by_state.get(PENDING, 0)) + int(by_state.get(IN_FLIGHT, 0))
        return {
            "spool_pending": max(0, pending - unsaved),
            "remembered": int(by_state.get(DELIVERED, 0)),
            "spool_dropped_full": self.dropped_full,
            "spool_dropped_expired": self.dropped_expired,
            "spool_dropped_unsendable": self.dropped_unsendable,
            "poison_jobs": int(poison),
        }

    # ---- writer (the outbox's thread, or start-up) -----------------------------------

    def record(
        self,
        *,
        key: str | None,
        digest: str | None,
        job_id: str | None,
        status: str,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
        deadline: float | None,
    ) -> int:
        """Store one reply as pending (committed before returning); returns its row."""
        entry = Entry(key, digest, job_id, status, topic, payload, correlation, deadline)
        return self.record_many([entry])[0]

    def record_many(self, entries: Sequence[Entry], durable: bool = True) -> list[int]:
        """Store replies as pending in one transaction; their rows, in order. `durable`:
        committed with an fsync (a reply that waits for the broker must survive a power
        cut); otherwise it survives a crash of the agent, and the next durable commit (or
        `sync`) makes it survive power loss too. While the disk refuses, they are kept in
        memory (negative rows) and `problem` says so."""
        if self._db is not None and self.problem is None:
            try:
                return self._insert(entries, durable)
            except sqlite3.Error as exc:
                if is_corrupt(exc):
                    raise StoreError(f"job journal: cannot store reply: {exc}") from exc
                self._unavailable(exc)
        return self._keep(entries)

    def _insert(self, entries: Sequence[Entry], durable: bool) -> list[int]:
        assert self._db is not None
        now, mono = self.clock(), self.mono()
        rows: list[int] = []
        lazy = contextlib.nullcontext() if durable else self._lazy_sync()
        with self._write_lock, lazy:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for e in entries:
                    cursor = self._db.execute(
                        _INSERT,
                        self._values(e, e.deadline, now, mono, PENDING),
                    )
                    rows.append(int(cursor.lastrowid or 0))
                self._enforce_bound()
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise
            self._records += len(entries)
            if self._records >= 256:
                self._records = 0
                self._prune(now, mono)
        return rows

    def _keep(self, entries: Sequence[Entry]) -> list[int]:
        """Replies kept in memory until the disk takes them (`retry`)."""
        mono = self.mono()
        rows: list[int] = []
        with self._read_lock:
            for e in entries:
                if e.key is not None:  # INSERT OR REPLACE by key, as on disk
                    for row in [r for r, s in self._mem.items() if s.key == e.key]:
                        self._forget(row)
                row = next(self._mem_rows)
                self._mem[row] = Stored(
                    row, e.key, e.digest, e.job_id, e.status, e.topic, e.payload,
                    e.correlation, self.clock(), e.deadline, PENDING,
                )  # fmt: skip
                self._mem_at[row] = mono
                rows.append(row)
            # oldest first: rows count down from -1
            pending = sorted((r for r, s in self._mem.items() if s.state == PENDING), reverse=True)
            for row in pending[: max(0, len(pending) - self.spool_max)]:
                self._forget(row)
                self.dropped_full += 1
        return rows

    def sync(self) -> None:
        """Make every commit so far survive power loss (one fsync of the WAL). Replies
        kept in memory cannot be: `problem` says so."""
        if self._db is None or self.problem is not None:
            return
        with self._write_lock:
            # An empty transaction writes (and syncs) nothing: change a header field, so the
            # commit writes a frame and, with synchronous=FULL, fsyncs the WAL up to it.
            self._syncs = (self._syncs + 1) % 1_000_000
            try:
                self._db.execute(f"PRAGMA user_version={self._syncs}")
            except sqlite3.Error as exc:
                if is_corrupt(exc):
                    raise StoreError(f"job journal: cannot sync: {exc}") from exc
                self._unavailable(exc)

    def mark_delivered(self, rows: Sequence[int]) -> None:
        """The broker acknowledged these replies. Replies nobody will ask for again go.

        Committed without its own fsync: the next stored reply's commit makes it durable
        (the WAL is written in order). A crash before that only means the reply is
        published once more after the restart.
        """
        on_disk = self._in_memory(rows, self._delivered_in_memory)
        if not on_disk:
            return
        if self._db is None or self.problem is not None:
            with self._read_lock:
                self._unsaved_delivered.update(on_disk)
            return
        with self._write_lock, self._lazy_sync():
            try:
                self._db.execute("BEGIN")
                for row in on_disk:
                    self._mark_delivered_sql(row)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                if is_corrupt(exc):
                    raise StoreError(f"job journal: cannot mark replies delivered: {exc}") from exc
                self._unavailable(exc)
                with self._read_lock:
                    self._unsaved_delivered.update(on_disk)

    def _mark_delivered_sql(self, row: int) -> None:
        assert self._db is not None
        self._db.execute(
            "UPDATE replies SET state=?, mid=NULL WHERE row=? AND key IS NOT NULL",
            (DELIVERED, row),
        )
        self._db.execute("DELETE FROM replies WHERE row=? AND key IS NULL", (row,))

    def _delivered_in_memory(self, row: int) -> None:
        kept = self._mem.get(row)
        if kept is None:
            return
        if kept.key is None:
            self._forget(row)
        else:
            self._mem[row] = replace(kept, state=DELIVERED)

    def _forget(self, row: int) -> None:
        """A memory row goes (under the read lock)."""
        self._mem.pop(row, None)
        self._mem_at.pop(row, None)

    def _in_memory(self, rows: Sequence[int], apply: Callable[[int], None]) -> list[int]:
        """Apply to rows kept in memory; the rows that are on disk (moved ones mapped)."""
        on_disk: list[int] = []
        with self._read_lock:
            for row in rows:
                if row < 0 and row in self._mem:
                    apply(row)
                elif row < 0 and row in self._moved:
                    on_disk.append(self._moved[row])
                elif row > 0:
                    on_disk.append(row)
        return on_disk

    def drop(self, row: int, why: str) -> None:
        """Give up on a pending reply (its deadline passed, or it cannot be published)."""

        def forget(r: int) -> None:
            if self._mem[r].state != DELIVERED:
                self._forget(r)

        on_disk = self._in_memory([row], forget)
        for r in on_disk:
            try:
                self._write("DELETE FROM replies WHERE row=? AND state<>?", (r, DELIVERED))
            except StoreError:
                with self._read_lock:
                    self._unsaved_dropped.add(r)
        if why == "expired":
            self.dropped_expired += 1
        else:
            self.dropped_unsendable += 1

    def note_crash(self, digest: str, job_id: str | None) -> int:
        """Count one death of the agent while `digest` was running; the new count."""
        now = self.clock()
        if self._db is not None and self.problem is None:
            with self._write_lock:
                try:
                    self._db.execute(
                        "INSERT INTO crashes (digest, job_id, count, last) VALUES (?,?,1,?)"
                        " ON CONFLICT(digest) DO UPDATE SET count=count+1, last=excluded.last",
                        (digest, job_id, now),
                    )
                    return self._crash_count(digest)
                except sqlite3.Error as exc:
                    if is_corrupt(exc):
                        raise StoreError(f"job journal: cannot record a crash: {exc}") from exc
                    self._unavailable(exc)
        with self._read_lock:
            self._mem_crashes[digest] = self._mem_crashes.get(digest, 0) + 1
        return self._crash_count(digest)

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        """A bookkeeping write that needs no fsync of its own (see mark_delivered)."""
        if self._db is None or self.problem is not None:
            raise StoreError("job journal: the disk refuses writes")
        with self._write_lock, self._lazy_sync():
            try:
                self._db.execute(sql, args)
            except sqlite3.Error as exc:
                if not is_corrupt(exc):
                    self._unavailable(exc)
                raise StoreError(f"job journal: {exc}") from exc

    @contextlib.contextmanager
    def _lazy_sync(self) -> Iterator[None]:
        if self._synchronous != "FULL" or self._db is None:
            yield
            return
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA synchronous=FULL")

    def _rollback(self) -> None:
        if self._db is None:
            return
        with contextlib.suppress(sqlite3.Error):  # no transaction was open
            self._db.execute("ROLLBACK")

    def _prune(self, now: float, mono: float) -> None:
        """Forget remembered replies older than the dedup window (by the monotonic clock
        for rows of this boot, by the wall clock for older ones) and old crash counts."""
        assert self._db is not None
        window = self.dedup_window_s
        try:
            self._db.execute(
                "DELETE FROM replies WHERE state=? AND ("
                "(boot IS ? AND created_mono < ?) OR (boot IS NOT ? AND created < ?))",
                (DELIVERED, self.boot, mono - window, self.boot, now - window),
            )
            self._db.execute("DELETE FROM crashes WHERE last < ?", (now - max(window, 86400),))
        except sqlite3.Error as exc:
            log.warning("journal.prune_failed", error=str(exc))

    def _enforce_bound(self) -> None:
        assert self._db is not None
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM replies WHERE state IN (?, ?)", (PENDING, IN_FLIGHT)
        ).fetchone()
        excess = int(count) - self.spool_max
        if excess > 0:
            victims = self._db.execute(
                "SELECT row FROM replies WHERE state=? ORDER BY row LIMIT ?", (PENDING, excess)
            ).fetchall()
            self._db.executemany("DELETE FROM replies WHERE row=?", victims)
            self.dropped_full += len(victims)


class RunningMarker:
    """A small file naming the jobs the scheduler is running, so a restart knows which
    jobs were running when the agent died (a crash in llama.cpp, an OOM kill, the
    watchdog). Written without fsync: it must survive the process, not a power cut, and
    costs a write when the running set changes instead of a flush.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, digest: str, job_id: str) -> None:
        self.set_running([(digest, job_id)])

    def set_running(self, jobs: list[tuple[str, str]]) -> None:
        data = [{"digest": digest, "id": job_id} for digest, job_id in jobs]
        try:
            self.path.write_text(json.dumps({"jobs": data}))
        except OSError as exc:
            log.warning("journal.marker_failed", error=str(exc))

    def clear(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("journal.marker_failed", error=str(exc))

    def take(self) -> list[tuple[str, str | None]]:
        """What the last process left running (digest, job id each), and forget it."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = None
        self.clear()
        if not isinstance(data, dict):
            return []
        rows = data.get("jobs")
        if not isinstance(rows, list):
            rows = [data]  # the one-job format of earlier releases
        out: list[tuple[str, str | None]] = []
        for row in rows:
            if isinstance(row, dict) and isinstance(row.get("digest"), str):
                job_id = row.get("id")
                out.append((row["digest"], job_id if isinstance(job_id, str) else None))
        return out
