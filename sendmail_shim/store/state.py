"""The daemon's memory: sending events, suspensions, quota overrides, scripts seen.

Trusts: only the daemon and root write it; it lives in ``<spool>/state/``
(0700, the daemon's user), so site users can neither read nor change it.
Guarantees: SQLite in WAL mode, so the admin command reads (and, with the
daemon stopped, writes) it safely beside the daemon; every operation holds one
lock, so a check and the event it reserves are atomic across the daemon's
threads; the state survives restarts.  Events older than two days are pruned.

Submission ids (``subid``, chosen at random by the front end and sent on
both roads) are remembered per uid for :data:`SUBMISSION_RETENTION`, with the
queue id they were given: a row is written (``committed`` 0) in the quota
transaction before the spool commit, set to 1 after it, and deleted when the
commit failed.  Which submissions this process is committing right now is
kept in memory (:meth:`State.in_flight`), so a row with ``committed`` 0 that
is not in flight belongs to a writer that died or could not finish its
bookkeeping (:meth:`State.unresolved_submissions`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from sendmail_shim.wire import paths

RETENTION = 2 * 86400.0
SUBMISSION_RETENTION = 7 * 86400.0
ACCEPTED, REFUSED_QUOTA, RCPT_DOMAIN, RELAY_OK, RELAY_5XX = (
    "accepted", "refused_quota", "rcpt_domain", "relay_ok", "relay_5xx")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    ts REAL NOT NULL, site TEXT NOT NULL, uid INTEGER NOT NULL, kind TEXT NOT NULL,
    script TEXT, n INTEGER NOT NULL DEFAULT 1, detail TEXT);
CREATE INDEX IF NOT EXISTS events_site ON events(site, kind, ts);
CREATE INDEX IF NOT EXISTS events_uid ON events(uid, kind, ts);
CREATE TABLE IF NOT EXISTS suspensions (
    site TEXT PRIMARY KEY, since REAL NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quota_overrides (
    site TEXT NOT NULL, key TEXT NOT NULL, value INTEGER, PRIMARY KEY (site, key));
CREATE TABLE IF NOT EXISTS scripts (
    site TEXT NOT NULL, script TEXT NOT NULL, first_seen REAL NOT NULL,
    PRIMARY KEY (site, script));
CREATE TABLE IF NOT EXISTS submissions (
    uid INTEGER NOT NULL, subid TEXT NOT NULL, queue_id TEXT NOT NULL, ts REAL NOT NULL,
    committed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (uid, subid));
CREATE INDEX IF NOT EXISTS submissions_ts ON submissions(ts);
"""


def state_dir(layout: paths.SpoolLayout) -> str:
    return os.path.join(layout.root, "state")


class State:
    def __init__(self, layout: paths.SpoolLayout, create: bool = True) -> None:
        directory = state_dir(layout)
        if create:
            os.makedirs(directory, mode=paths.MODE_PRIVATE_DIR, exist_ok=True)
        path = os.path.join(directory, "state.sqlite")
        if not create and not os.path.exists(path):
            raise FileNotFoundError(path)
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False,
                                   isolation_level=None)
        self._lock = threading.RLock()
        self._in_flight: set[tuple[int, str]] = set()
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(SCHEMA)
        except BaseException:
            self._db.close()  # a full disk at start: the caller says why and retries
            raise
        self._inserts = 0

    def close(self) -> None:
        """Close the database; the daemon calls it only after joining its worker threads.

        Taking the lock as well means a straggler's statement finishes first and the
        next one fails with sqlite3.ProgrammingError instead of touching freed memory.
        """
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[State]:
        """Hold the lock (and an SQLite write transaction) for a check and its record."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
                self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (disk full) can leave the transaction open.
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    # -- events -------------------------------------------------------------
    def record(self, site: str, uid: int, kind: str, n: int = 1, script: str | None = None,
               detail: str | None = None, ts: float | None = None) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO events (ts, site, uid, kind, script, n, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ts or time.time(), site, uid, kind, script, n, detail))
            self._inserts += 1
            if self._inserts % 1000 == 0:
                self.prune()
            return int(cur.lastrowid or 0)

    def forget(self, rowid: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM events WHERE rowid = ?", (rowid,))

    def prune(self, now: float | None = None) -> None:
        now = now or time.time()
        with self._lock:
            self._db.execute("DELETE FROM events WHERE ts < ?", (now - RETENTION,))
            self._db.execute("DELETE FROM submissions WHERE ts < ?",
                             (now - SUBMISSION_RETENTION,))

    def count(self, kind: str, since: float, site: str | None = None,
              uid: int | None = None) -> tuple[int, int]:
        """(number of events, sum of n) of ``kind`` since ``since`` for a site or a uid."""
        column, value = ("site", site) if site is not None else ("uid", uid)
        with self._lock:
            row = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(n), 0) FROM events "  # noqa: S608 - fixed names
                f"WHERE {column} = ? AND kind = ? AND ts > ?", (value, kind, since)).fetchone()
        return int(row[0]), int(row[1])

    def distinct_details(self, site: str, kind: str, since: float) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(DISTINCT detail) FROM events WHERE site = ? AND kind = ? "
                "AND ts > ?", (site, kind, since)).fetchone()
        return int(row[0])

    def top(self, since: float, by_script: bool = False) -> list[tuple[str, str, int, int]]:
        """(site, script, messages, recipients) accepted since ``since``, busiest first."""
        group = "site, script" if by_script else "site"
        script = "COALESCE(script, '')" if by_script else "''"
        with self._lock:
            rows = self._db.execute(
                f"SELECT site, {script}, COUNT(*), SUM(n) FROM events "  # noqa: S608
                f"WHERE kind = ? AND ts > ? GROUP BY {group} ORDER BY COUNT(*) DESC",
                (ACCEPTED, since)).fetchall()
        return [(str(a), str(b), int(c), int(d)) for a, b, c, d in rows]

    def count_script(self, site: str, script: str, since: float) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM events WHERE site = ? AND kind = ? AND script = ? "
                "AND ts > ?", (site, ACCEPTED, script, since)).fetchone()
        return int(row[0])

    def reset_usage(self, site: str) -> int:
        with self._lock:
            cur = self._db.execute("DELETE FROM events WHERE site = ?", (site,))
            return int(cur.rowcount)

    # -- scripts ------------------------------------------------------------
    def script_first_seen(self, site: str, script: str, now: float) -> float:
        """When ``script`` of ``site`` first sent; records ``now`` if never."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO scripts VALUES (?, ?, ?)",
                             (site, script, now))
            row = self._db.execute("SELECT first_seen FROM scripts WHERE site = ? AND "
                                   "script = ?", (site, script)).fetchone()
        return float(row[0])

    # -- suspensions ----------------------------------------------------------
    def suspend(self, site: str, reason: str, actor: str) -> bool:
        """True when the site was not suspended before."""
        with self._lock:
            cur = self._db.execute("INSERT OR IGNORE INTO suspensions VALUES (?, ?, ?, ?)",
                                   (site, time.time(), reason, actor))
            return cur.rowcount == 1

    def resume(self, site: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM suspensions WHERE site = ?", (site,))
            return cur.rowcount == 1

    def suspension(self, site: str) -> tuple[float, str, str] | None:
        with self._lock:
            row = self._db.execute("SELECT since, reason, actor FROM suspensions WHERE "
                                   "site = ?", (site,)).fetchone()
        return (float(row[0]), str(row[1]), str(row[2])) if row else None

    # -- quota overrides --------------------------------------------------------
    def overrides(self, site: str) -> dict[str, int | None]:
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM quota_overrides WHERE site = ?",
                                    (site,)).fetchall()
        return {str(k): (None if v is None else int(v)) for k, v in rows}

    def set_override(self, site: str, key: str, value: int | None) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO quota_overrides VALUES (?, ?, ?)",
                             (site, key, value))

    def clear_overrides(self, site: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM quota_overrides WHERE site = ?", (site,))

    # -- submission ids (de-duplication of the socket and drop-file roads) ------
    def submission(self, uid: int, subid: str) -> tuple[str, bool] | None:
        """(queue id, committed) of a submission id this uid used before."""
        with self._lock:
            row = self._db.execute("SELECT queue_id, committed FROM submissions WHERE uid = ? "
                                   "AND subid = ?", (uid, subid)).fetchone()
        return (str(row[0]), bool(row[1])) if row else None

    def in_flight(self, uid: int, subid: str) -> bool:
        """True while this process is committing that submission (between claim and end)."""
        with self._lock:
            return (uid, subid) in self._in_flight

    def claim_submission(self, uid: int, subid: str, queue_id: str, now: float) -> None:
        """Record a submission id before its commit (call inside the quota transaction)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO submissions VALUES (?, ?, ?, ?, 0)",
                             (uid, subid, queue_id, now))
            self._in_flight.add((uid, subid))

    def drop_in_flight(self, uid: int, subid: str) -> None:
        """Forget the in-flight mark only (its claim was rolled back)."""
        with self._lock:
            self._in_flight.discard((uid, subid))

    def end_submission(self, uid: int, subid: str, committed: bool) -> None:
        """After the commit: mark the row committed, or delete it when the commit failed.

        The in-flight mark goes first, so a failing write leaves a row that
        :meth:`unresolved_submissions` or the next claim can settle.
        """
        with self._lock:
            self._in_flight.discard((uid, subid))
            if committed:
                self._db.execute("UPDATE submissions SET committed = 1 WHERE uid = ? AND "
                                 "subid = ?", (uid, subid))
            else:
                self._db.execute("DELETE FROM submissions WHERE uid = ? AND subid = ? AND "
                                 "committed = 0", (uid, subid))

    def unresolved_submissions(self) -> list[tuple[int, str, str]]:
        """(uid, subid, queue id) of rows whose commit was never confirmed."""
        with self._lock:
            rows = self._db.execute("SELECT uid, subid, queue_id FROM submissions WHERE "
                                    "committed = 0").fetchall()
        return [(int(u), str(s), str(q)) for u, s, q in rows
                if (int(u), str(s)) not in self._in_flight]
