"""The job journal: every final reply, durably, until it is delivered (and remembered for
the dedup window when it answers a job that ran).

Adapter over SQLite in WAL mode, in the state directory. Two jobs in one table:
    spool   replies not yet acknowledged by the broker (state pending or in flight),
            published oldest first after a reconnect or a restart, bounded in count;
    dedup   `done` and `failed` replies by job key, so a redelivered or retried job gets
            the stored reply again instead of running twice.

A reply is committed (fsync) before the job's PUBLISH is acknowledged: a crash after that
point loses nothing, the reply goes out after restart. One connection, one lock: paho's
thread looks up keys, the inference thread records replies.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import StoreError

PENDING, IN_FLIGHT, DELIVERED = 0, 1, 2

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
"""


def job_key(job_id: str, reply_topic: str) -> str:
    """Dedup key: the same id from a different requester (reply topic) is a different job."""
    return hashlib.sha256(f"{job_id}\x00{reply_topic}".encode()).hexdigest()


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


class Journal:
    """Durable replies: the offline spool and the dedup memory."""

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
        self._lock = threading.Lock()
        self.dropped_full = 0  # pending replies dropped because the spool was full
        self.dropped_expired = 0  # pending replies dropped because their deadline passed
        self._records = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(_SCHEMA)
            # Nothing is in flight in a new process: paho's own resend queue died with the
            # old one, so replies it held are pending again.
            self._db.execute(
                "UPDATE replies SET state=?, mid=NULL WHERE state=?", (PENDING, IN_FLIGHT)
            )
        except sqlite3.Error as exc:
            raise StoreError(f"job journal {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def lookup(self, key: str) -> Stored | None:
        with self._lock:
            row = self._db.execute(
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
        """Store a reply as pending (committed before returning); returns its row."""
        now = self.clock()
        with self._lock:
            try:
                cursor = self._db.execute(
                    "INSERT OR REPLACE INTO replies (key, digest, job_id, status, topic, payload,"
                    " correlation, created, deadline, state) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        key,
                        digest,
                        job_id,
                        status,
                        topic,
                        payload,
                        correlation,
                        now,
                        deadline,
                        PENDING,
                    ),
                )
            except sqlite3.Error as exc:
                raise StoreError(f"job journal: cannot store reply: {exc}") from exc
            row = int(cursor.lastrowid or 0)
            self._enforce_bound()
            self._records += 1
            if self._records % 256 == 0:
                self._prune(now)
        return row

    def mark_in_flight(self, row: int, mid: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE replies SET state=?, mid=? WHERE row=? AND state=?",
                (IN_FLIGHT, mid, row, PENDING),
            )

    def mark_delivered(self, row: int) -> None:
        """The broker acknowledged the reply. Replies nobody will ask for again go at once."""
        with self._lock:
            self._db.execute(
                "UPDATE replies SET state=?, mid=NULL WHERE row=? AND key IS NOT NULL",
                (DELIVERED, row),
            )
            self._db.execute("DELETE FROM replies WHERE row=? AND key IS NULL", (row,))

    def mark_pending(self, row: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE replies SET state=?, mid=NULL WHERE row=? AND state=?",
                (PENDING, row, IN_FLIGHT),
            )

    def pending(self, limit: int = 1000) -> list[Stored]:
        """Replies to publish, oldest first; those past their deadline are dropped here."""
        now = self.clock()
        with self._lock:
            expired = self._db.execute(
                "SELECT row FROM replies WHERE state=? AND deadline IS NOT NULL AND deadline < ?",
                (PENDING, now),
            ).fetchall()
            if expired:
                self._db.executemany("DELETE FROM replies WHERE row=?", expired)
                self.dropped_expired += len(expired)
            rows = self._db.execute(
                "SELECT row, key, digest, job_id, status, topic, payload, correlation, created,"
                " deadline, state FROM replies WHERE state=? ORDER BY row LIMIT ?",
                (PENDING, limit),
            ).fetchall()
        return [Stored(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            by_state = dict(
                self._db.execute("SELECT state, COUNT(*) FROM replies GROUP BY state").fetchall()
            )
        return {
            "spool_pending": int(by_state.get(PENDING, 0)) + int(by_state.get(IN_FLIGHT, 0)),
            "remembered": int(by_state.get(DELIVERED, 0)),
            "spool_dropped_full": self.dropped_full,
            "spool_dropped_expired": self.dropped_expired,
        }

    def prune(self) -> None:
        with self._lock:
            self._prune(self.clock())

    def _prune(self, now: float) -> None:
        self._db.execute(
            "DELETE FROM replies WHERE state=? AND created < ?",
            (DELIVERED, now - self.dedup_window_s),
        )

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
