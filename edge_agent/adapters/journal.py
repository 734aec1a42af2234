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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from edge_agent.core.errors import StoreError

log = structlog.get_logger("edge_agent.journal")

# IN_FLIGHT is only found in journals of earlier versions: which replies are out is kept in
# memory now (a restart makes them all pending again anyway).
PENDING, IN_FLIGHT, DELIVERED = 0, 1, 2
# A job that was running when the agent died this many times is not run again.
POISON_AFTER_CRASHES = 2

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
_COLUMNS = "row, key, digest, job_id, status, topic, payload, correlation, created, deadline, state"


def job_key(job_id: str, reply_topic: str) -> str:
    """Dedup key: the same id from a different requester (reply topic) is a different job."""
    return hashlib.sha256(f"{job_id}\x00{reply_topic}".encode("utf-8", "surrogatepass")).hexdigest()


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True)
class Stored:
    row: int
    key: str | None
    digest: str | None
    job_id: str | None
    status: str
    topic: str
    payload: bytes
    correlation: bytes | None
    created: float
    deadline: float | None
    state: int


@dataclass(frozen=True)
class Entry:
    """One reply to store."""

    key: str | None
    digest: str | None
    job_id: str | None
    status: str
    topic: str
    payload: bytes
    correlation: bytes | None
    deadline: float | None


class Journal:
    """Durable replies (the offline spool and the dedup memory) and the crash record."""

    def __init__(
        self,
        path: Path,
        dedup_window_s: float,
        spool_max: int,
        synchronous: str = "FULL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.dedup_window_s = dedup_window_s
        self.spool_max = spool_max
        self.clock = clock
        self._write_lock = threading.Lock()  # one writer; the lock only guards misuse
        self._read_lock = threading.Lock()
        self.dropped_full = 0  # pending replies dropped because the spool was full
        self.dropped_expired = 0  # pending replies dropped because their deadline passed
        self.dropped_unsendable = 0  # pending replies the link refused again and again
        self._records = 0
        self._syncs = 0
        self._synchronous = synchronous.upper()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"job journal {path}: {exc}") from exc
        try:
            self._db = self._open(path, synchronous)
        except sqlite3.DatabaseError as exc:
            # A journal SQLite cannot read (a torn write on power loss, a disk error): keep
            # it for inspection and start empty, rather than fail every start for good.
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            log.error("journal.unreadable", path=str(path), error=str(exc), moved_to=str(aside))
            for suffix in ("", "-wal", "-shm"):
                old = Path(f"{path}{suffix}")
                if old.exists():
                    os.replace(old, Path(f"{aside}{suffix}"))
            try:
                self._db = self._open(path, synchronous)
            except sqlite3.Error as again:
                raise StoreError(f"job journal {path}: {again}") from again
        try:
            self._reader = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._reader.execute("PRAGMA query_only=1")
        except sqlite3.Error as exc:
            raise StoreError(f"job journal {path}: {exc}") from exc

    @staticmethod
    def _open(path: Path, synchronous: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(_SCHEMA)
        db.execute("PRAGMA quick_check(1)").fetchone()
        # Nothing is in flight in a new process: paho's own resend queue died with the old
        # one, so replies it held are pending again.
        db.execute("UPDATE replies SET state=?, mid=NULL WHERE state=?", (PENDING, IN_FLIGHT))
        return db

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._reader.close()
            self._db.close()

    # ---- readers (any thread) ----------------------------------------------------------

    def lookup(self, key: str) -> Stored | None:
        with self._read_lock:
            row = self._reader.execute(
                "SELECT row, key, digest, job_id, status, topic, payload, correlation, created,"
                " deadline, state FROM replies WHERE key=?",
                (key,),
            ).fetchone()
        if row is None:
            return None
        stored = Stored(*row)
        if self.clock() - stored.created > self.dedup_window_s and stored.state == DELIVERED:
            return None
        return stored

    def pending(self, limit: int = 1000, exclude: Sequence[int] = ()) -> list[Stored]:
        """Replies waiting to be published, oldest first (`exclude`: rows already out)."""
        skip = set(exclude)
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT row, key, digest, job_id, status, topic, payload, correlation, created,"
                " deadline, state FROM replies WHERE state=? ORDER BY row LIMIT ?",
                (PENDING, limit + len(skip)),
            ).fetchall()
        return [s for s in (Stored(*r) for r in rows) if s.row not in skip][:limit]

    def is_poison(self, digest: str) -> bool:
        with self._read_lock:
            row = self._reader.execute(
                "SELECT count FROM crashes WHERE digest=?", (digest,)
            ).fetchone()
        return row is not None and int(row[0]) >= POISON_AFTER_CRASHES

    def counts(self) -> dict[str, int]:
        with self._read_lock:
            by_state = dict(
                self._reader.execute(
                    "SELECT state, COUNT(*) FROM replies GROUP BY state"
                ).fetchall()
            )
            (poison,) = self._reader.execute(
                "SELECT COUNT(*) FROM crashes WHERE count >= ?", (POISON_AFTER_CRASHES,)
            ).fetchone()
        return {
            "spool_pending": int(by_state.get(PENDING, 0)) + int(by_state.get(IN_FLIGHT, 0)),
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
        `sync`) makes it survive power loss too."""
        now = self.clock()
        rows: list[int] = []
        lazy = contextlib.nullcontext() if durable else self._lazy_sync()
        with self._write_lock, lazy:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for e in entries:
                    cursor = self._db.execute(
                        "INSERT OR REPLACE INTO replies (key, digest, job_id, status, topic,"
                        " payload, correlation, created, deadline, state)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (
                            e.key,
                            e.digest,
                            e.job_id,
                            e.status,
                            e.topic,
                            e.payload,
                            e.correlation,
                            now,
                            e.deadline,
                            PENDING,
                        ),
                    )
                    rows.append(int(cursor.lastrowid or 0))
                self._enforce_bound()
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"job journal: cannot store reply: {exc}") from exc
            self._records += len(entries)
            if self._records >= 256:
                self._records = 0
                self._prune(now)
        return rows

    def sync(self) -> None:
        """Make every commit so far survive power loss (one fsync of the WAL)."""
        with self._write_lock:
            # An empty transaction writes (and syncs) nothing: change a header field, so the
            # commit writes a frame and, with synchronous=FULL, fsyncs the WAL up to it.
            self._syncs = (self._syncs + 1) % 1_000_000
            try:
                self._db.execute(f"PRAGMA user_version={self._syncs}")
            except sqlite3.Error as exc:
                raise StoreError(f"job journal: cannot sync: {exc}") from exc

    def mark_delivered(self, rows: Sequence[int]) -> None:
        """The broker acknowledged these replies. Replies nobody will ask for again go.

        Committed without its own fsync: the next stored reply's commit makes it durable
        (the WAL is written in order). A crash before that only means the reply is
        published once more after the restart.
        """
        with self._write_lock, self._lazy_sync():
            try:
                self._db.execute("BEGIN")
                for row in rows:
                    self._db.execute(
                        "UPDATE replies SET state=?, mid=NULL WHERE row=? AND key IS NOT NULL",
                        (DELIVERED, row),
                    )
                    self._db.execute("DELETE FROM replies WHERE row=? AND key IS NULL", (row,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"job journal: cannot mark replies delivered: {exc}") from exc

    def drop(self, row: int, why: str) -> None:
        """Give up on a pending reply (its deadline passed, or it cannot be published)."""
        self._write("DELETE FROM replies WHERE row=? AND state<>?", (row, DELIVERED))
        if why == "expired":
            self.dropped_expired += 1
        else:
            self.dropped_unsendable += 1

    def note_crash(self, digest: str, job_id: str | None) -> int:
        """Count one death of the agent while `digest` was running; the new count."""
        now = self.clock()
        with self._write_lock:
            try:
                self._db.execute(
                    "INSERT INTO crashes (digest, job_id, count, last) VALUES (?,?,1,?)"
                    " ON CONFLICT(digest) DO UPDATE SET count=count+1, last=excluded.last",
                    (digest, job_id, now),
                )
            except sqlite3.Error as exc:
                raise StoreError(f"job journal: cannot record a crash: {exc}") from exc
        with self._read_lock:
            (count,) = self._reader.execute(
                "SELECT count FROM crashes WHERE digest=?", (digest,)
            ).fetchone()
        return int(count)

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        """A bookkeeping write that needs no fsync of its own (see mark_delivered)."""
        with self._write_lock, self._lazy_sync():
            try:
                self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise StoreError(f"job journal: {exc}") from exc

    @contextlib.contextmanager
    def _lazy_sync(self) -> Iterator[None]:
        if self._synchronous != "FULL":
            yield
            return
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # no transaction was open
            self._db.execute("ROLLBACK")

    def _prune(self, now: float) -> None:
        try:
            self._db.execute(
                "DELETE FROM replies WHERE state=? AND created < ?",
                (DELIVERED, now - self.dedup_window_s),
            )
            self._db.execute(
                "DELETE FROM crashes WHERE last < ?", (now - max(self.dedup_window_s, 86400),)
            )
        except sqlite3.Error as exc:
            log.warning("journal.prune_failed", error=str(exc))

    def _enforce_bound(self) -> None:
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
