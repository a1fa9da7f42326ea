"""The daemon's memory: windowed counters, suspensions, quota overrides, scripts seen.

Trusts: only the daemon and root write it; it lives in ``<spool>/state/``
(0700, the daemon's user), so site users can neither read nor change it.  One
process writes at a time: the daemon, or the admin command while it holds the
daemon's lock (no daemon runs).
Guarantees: SQLite in WAL mode, so the admin command reads (and, with the
daemon stopped, writes) it safely beside the daemon; every operation holds one
lock, so a check and the event it reserves are atomic across the daemon's
threads (:meth:`State.transaction`); the state survives restarts.

Windows are bucketed counters, not event logs: each event adds to one
per-minute and one per-hour bucket of its site and, for accepted messages,
of its uid (per site: the account quota) and of its (site, script) (``top``,
rule new_script); so an event costs one statement, an accepted message three.
A window of W seconds is the current bucket plus the previous ones: up to
:data:`MINUTE_SPAN` in minutes (``the last hour`` = the current minute and the
previous 59), longer in hours (``the last day`` = the current hour and the
previous 23), at most :data:`RETENTION`.  So recording, checking and
reserving read and write a bounded number of rows (at most 120 per window),
whatever a site's traffic: the per-message work does not grow with the
window.  Distinct recipient domains are kept per (site, domain) with the
minute last seen, counted over the last hour and capped by the caller.
Minute buckets are pruned after :data:`MINUTE_SPAN`, hour buckets and the rest
after :data:`RETENTION`.  A state file of the previous version (an ``events``
table) has its events folded into buckets once, at open.

Suspensions, quota overrides and relay marks (burned relays) are also kept in
memory, in step with their tables (changed after the write succeeds, or after
the transaction commits, and re-read by :meth:`State.follow` when another
process committed: the relay's policy service on the same spool suspends a site
in the same file, and the daemon must see it): :meth:`State.suspension`, :meth:`State.overrides` and
:meth:`State.relay_marks` take neither the lock nor SQLite, so the event loop
may call them.

A quota check and its record are one step, :meth:`State.reserve`: the usage of
every :class:`Limit` is read and, only when each stays within its limit, the
event is counted, under the lock and in one SQLite transaction.  With the Redis
backend (``store.state_redis``) the same method is one Lua script, so the nodes
of a fleet cannot slip past a limit together.  Build a state with
:func:`open_state`, which picks the backend from the configuration.

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

import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sendmail_shim.wire import paths

if TYPE_CHECKING:
    from sendmail_shim.config import Config

log = logging.getLogger(__name__)

MINUTE, HOUR = 60, 3600
MINUTE_SPAN = 2 * 3600  # windows up to this long are counted in minutes, longer in hours
RETENTION = 2 * 86400.0  # hour buckets, and so the longest window, are kept this long
SUBMISSION_RETENTION = 7 * 86400.0
DOMAIN_WINDOW = 60  # minutes: distinct recipient domains are counted over the last hour
PRUNE_EVERY = 1000  # records between two prunes
ACCEPTED, REFUSED_QUOTA, RELAY_OK, RELAY_5XX = (
    "accepted", "refused_quota", "relay_ok", "relay_5xx")
# What the relay's policy service (relaypolicy/) counted: one event per message, n =
# recipients; all of a login's mail at the relays, through a shim or straight.
RELAY_ACCEPTED = "relay_accepted"

# Bucketed counters: name -> (key columns before the bucket, key columns after it).
COUNTER_TABLES = {
    "site_counts": (("site TEXT", "kind TEXT"), ()),
    "uid_counts": (("uid INTEGER", "kind TEXT"), ("site TEXT",)),  # accepted; share per site
    "script_counts": (("site TEXT", "script TEXT"), ()),  # accepted messages
}
COUNTERS = tuple(COUNTER_TABLES)


def _counter_table(name: str, head: tuple[str, ...], tail: tuple[str, ...]) -> str:
    """DDL of one counter table: a row per key, resolution and bucket, and its age index."""
    columns = (*head, "res INTEGER", "bucket INTEGER", *tail, "events INTEGER", "total INTEGER")
    key = ", ".join(column.split()[0] for column in (*head, "res", "bucket", *tail))
    return (f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(c + ' NOT NULL' for c in columns)}, "
            f"PRIMARY KEY ({key})) WITHOUT ROWID;\n"
            f"CREATE INDEX IF NOT EXISTS {name}_age ON {name}(res, bucket);\n")


def _counter_add(name: str, head: tuple[str, ...], tail: tuple[str, ...]) -> str:
    """Add (events, total) to the minute and the hour bucket of one key, in one statement."""
    rows = ", ".join("(" + ", ".join(["?"] * len(head) + [str(res), "?"] + ["?"] * len(tail)
                                     + ["?", "?"]) + ")" for res in (MINUTE, HOUR))
    return (f"INSERT INTO {name} VALUES {rows} ON CONFLICT DO UPDATE SET "  # noqa: S608
            "events = events + excluded.events, total = total + excluded.total")


ADD_SITE, ADD_UID, ADD_SCRIPT = (_counter_add(name, *cols)
                                  for name, cols in COUNTER_TABLES.items())
SCHEMA = "".join(_counter_table(name, *cols) for name, cols in COUNTER_TABLES.items()) + """
CREATE TABLE IF NOT EXISTS domains (
    site TEXT NOT NULL, domain TEXT NOT NULL, minute INTEGER NOT NULL,
    PRIMARY KEY (site, domain)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS domains_age ON domains(site, minute);
CREATE TABLE IF NOT EXISTS suspensions (
    site TEXT PRIMARY KEY, since REAL NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS relay_marks (
    name TEXT PRIMARY KEY, since REAL NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL);
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

# A state file of the previous version: its events folded into buckets, once.
FOLD = (
    "INSERT INTO site_counts SELECT site, kind, {res}, CAST(ts / {res} AS INTEGER) AS b, "
    "COUNT(*), SUM(n) FROM events WHERE ts >= ? AND kind != 'rcpt_domain' "
    "GROUP BY site, kind, b",
    "INSERT INTO uid_counts SELECT uid, kind, {res}, CAST(ts / {res} AS INTEGER) AS b, site, "
    "COUNT(*), SUM(n) FROM events WHERE ts >= ? AND kind = 'accepted' "
    "GROUP BY uid, kind, b, site",
    "INSERT INTO script_counts SELECT site, COALESCE(script, ''), {res}, "
    "CAST(ts / {res} AS INTEGER) AS b, COUNT(*), SUM(n) FROM events WHERE ts >= ? "
    "AND kind = 'accepted' GROUP BY site, COALESCE(script, ''), b",
)
FOLD_DOMAINS = (
    "INSERT INTO domains SELECT site, detail, MAX(CAST(ts / 60 AS INTEGER)) FROM events "
    "WHERE ts >= ? AND kind = 'rcpt_domain' AND detail IS NOT NULL GROUP BY site, detail")


def state_dir(layout: paths.SpoolLayout) -> str:
    return os.path.join(layout.root, "state")


def buckets(window: float, now: float) -> tuple[int, int]:
    """(resolution in seconds, first bucket) of the window of ``window`` seconds ending now.

    The window is the bucket ``now`` falls in and the previous ones: minutes up
    to :data:`MINUTE_SPAN`, hours beyond (and at most :data:`RETENTION`).
    """
    res = MINUTE if window <= MINUTE_SPAN else HOUR
    span = max(1, -int(-min(window, RETENTION) // res))  # whole buckets, rounded up
    return res, int(now // res) - span + 1


@dataclass(frozen=True)
class Reservation:
    """What :meth:`State.record` added, so that :meth:`State.forget` can take it back."""

    site: str
    uid: int
    kind: str
    n: int
    script: str | None
    ts: float
    shared: bool = False  # also counted in the shared (Redis) state


@dataclass(frozen=True)
class Limit:
    """One limit of :meth:`State.reserve`: the events of the reserved kind in the window
    (or, with ``total``, their sum of n) of the site (``scope`` "site") or of the uid
    ("uid"), plus what this event adds (1, or n), must stay within ``limit``
    (None: read and reported only)."""

    scope: str
    window: float
    limit: int | None
    total: bool = False


Marks = dict[str, tuple[float, str, str]]


def open_state(config: Config, layout: paths.SpoolLayout | None = None,
               create: bool = True) -> State:
    """The state of ``config``'s backend: this node's SQLite file, or Redis shared by the
    nodes (falling back to the SQLite file while Redis cannot be reached)."""
    layout = config.layout if layout is None else layout
    if config.state_backend == "redis":
        try:
            from sendmail_shim.store.state_redis import RedisState  # lazy: redis
        except ImportError as exc:
            log.error("state: state.backend is redis but the redis client cannot be imported "
                      "(%s); FAILING OPEN to this node's own state file: install python3-redis "
                      "(or pip install redis) and restart the daemon", exc)
        else:
            try:
                return RedisState(layout, create, node=config.node, url=config.state_url,
                                  prefix=config.state_prefix,
                                  password_file=config.state_password_file)
            except (ValueError, OSError) as exc:
                log.error("state: state.url or state.password_file cannot be used (%s); "
                          "FAILING OPEN to this node's own state file: fix them and restart "
                          "the daemon", exc)
    return State(layout, create, node=config.node)


class State:
    shared = False  # True for a backend the nodes of a fleet share

    def __init__(self, layout: paths.SpoolLayout, create: bool = True,
                 node: str | None = None) -> None:
        self.node = node or socket.gethostname()
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
        self._on_commit: list[Callable[[], object]] = []
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(SCHEMA)
                self._fold_events(time.time())
                self._suspended = self._marks("suspensions")
                self._relay_marks = self._marks("relay_marks")
                self._overrides = self._read_overrides()
                self._data_version = self._version()
        except BaseException:
            self._db.close()  # a full disk at start: the caller says why and retries
            raise
        self._inserts = 0
        # Suspensions another process made, seen by follow() (or the shared backend's
        # watcher) and not yet taken by suspended_elsewhere().
        self._elsewhere: list[tuple[str, tuple[float, str, str]]] = []

    def _version(self) -> int:
        """SQLite's data_version: it changes when another connection commits."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _read_overrides(self) -> dict[str, dict[str, int | None]]:
        overrides: dict[str, dict[str, int | None]] = {}
        for site, key, value in self._db.execute("SELECT site, key, value FROM quota_overrides"):
            overrides.setdefault(str(site), {})[str(key)] = None if value is None else int(value)
        return overrides

    def follow(self) -> bool:
        """Re-read suspensions, overrides and relay marks when another process (the policy
        service, the admin command) committed to the file since the last look; True then.

        One ``PRAGMA data_version`` when nothing changed (no disk read), so the daemon
        and the policy service call it every fraction of a second: every process on the
        file sees one suspension state.  Suspensions that appeared are kept for
        :meth:`suspended_elsewhere`.
        """
        with self._lock:
            if self._db.in_transaction:
                return False
            version = self._version()
            if version == self._data_version:
                return False
            self._data_version = version
            self._replace(self._marks("suspensions"), self._read_overrides(),
                          self._marks("relay_marks"))
            return True

    def suspended_elsewhere(self) -> list[tuple[str, tuple[float, str, str]]]:
        """(site, (since, reason, actor)) of the suspensions another process made, seen
        since the last call (by :meth:`follow` or the shared backend's watcher)."""
        with self._lock:
            taken, self._elsewhere = self._elsewhere, []
        return taken

    def _marks(self, table: str) -> Marks:
        """(since, reason, actor) by name: the rows of suspensions or relay_marks."""
        return {str(name): (float(since), str(reason), str(actor)) for name, since, reason, actor
                in self._db.execute(f"SELECT * FROM {table}")}  # noqa: S608

    def _fold_events(self, now: float) -> None:
        """Fold the events table of the previous version into buckets, then drop it."""
        exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
        if self._db.execute(exists).fetchone() is None:
            return
        with self.transaction():
            if self._db.execute(exists).fetchone() is None:
                return  # another process folded it meanwhile
            for res, since in ((MINUTE, now - MINUTE_SPAN - MINUTE), (HOUR, now - RETENTION)):
                for statement in FOLD:
                    self._db.execute(statement.format(res=res), (since,))
            self._db.execute(FOLD_DOMAINS, (now - DOMAIN_WINDOW * MINUTE,))
            (folded,) = self._db.execute("SELECT COUNT(*) FROM events").fetchone()
            self._db.execute("DROP TABLE events")
        log.info("state: folded %d events of the previous version into bucketed counters",
                 folded)

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
                self._on_commit.clear()
                # A COMMIT that failed (disk full) can leave the transaction open.
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
            changes, self._on_commit = self._on_commit, []
            for change in changes:
                change()

    def _in_step(self, change: Callable[[], object]) -> None:
        """Apply a change to the in-memory copy once its write is durable (holding the lock)."""
        if self._db.in_transaction:
            self._on_commit.append(change)
        else:
            change()

    # -- counters -------------------------------------------------------------
    def record(self, site: str, uid: int, kind: str, n: int = 1, script: str | None = None,
               ts: float | None = None) -> Reservation:
        """Count one event of ``kind`` (``n`` recipients, answers...) at ``ts``."""
        reservation = Reservation(site, uid, kind, n, script, time.time() if ts is None else ts)
        with self._lock:
            self._add(reservation, 1)
            self._inserts += 1
            if self._inserts % PRUNE_EVERY == 0:
                self.prune()
        return reservation

    def forget(self, reservation: Reservation) -> None:
        """Take back what :meth:`record` added (a commit that failed after the check)."""
        with self._lock:
            self._add(reservation, -1)

    def _add(self, r: Reservation, sign: int) -> None:
        minute, hour, n = int(r.ts // MINUTE), int(r.ts // HOUR), sign * r.n
        self._db.execute(ADD_SITE, (r.site, r.kind, minute, sign, n,
                                    r.site, r.kind, hour, sign, n))
        if r.kind == ACCEPTED:  # account quotas, top and new_script count messages only
            self._db.execute(ADD_UID, (r.uid, r.kind, minute, r.site, sign, n,
                                       r.uid, r.kind, hour, r.site, sign, n))
            script = r.script or ""
            self._db.execute(ADD_SCRIPT, (r.site, script, minute, sign, n,
                                          r.site, script, hour, sign, n))

    def prune(self, now: float | None = None) -> None:
        """Drop buckets, domains and submission ids older than their retention."""
        now = time.time() if now is None else now
        minute = int(now // MINUTE) - MINUTE_SPAN // MINUTE - 1
        hour = int(now // HOUR) - int(RETENTION // HOUR) - 1
        with self._lock:
            for table in COUNTERS:
                self._db.execute(f"DELETE FROM {table} WHERE res = ? AND bucket < ?",  # noqa: S608
                                 (MINUTE, minute))
                self._db.execute(f"DELETE FROM {table} WHERE res = ? AND bucket < ?",  # noqa: S608
                                 (HOUR, hour))
            self._db.execute("DELETE FROM domains WHERE minute < ?",
                             (int(now // MINUTE) - DOMAIN_WINDOW,))
            self._db.execute("DELETE FROM submissions WHERE ts < ?",
                             (now - SUBMISSION_RETENTION,))

    def count(self, kind: str, window: float, now: float, site: str | None = None,
              uid: int | None = None) -> tuple[int, int]:
        """(number of events, sum of n) of ``kind`` in the window, for a site or a uid.

        A uid's counters are kept for :data:`ACCEPTED` only.
        """
        res, first = buckets(window, now)
        table, column, value = (("site_counts", "site", site) if site is not None
                                else ("uid_counts", "uid", uid))
        with self._lock:
            row = self._db.execute(
                f"SELECT COALESCE(SUM(events), 0), COALESCE(SUM(total), 0) "  # noqa: S608
                f"FROM {table} WHERE {column} = ? AND kind = ? AND res = ? AND bucket >= ?",
                (value, kind, res, first)).fetchone()
        return int(row[0]), int(row[1])

    def reserve(self, site: str, uid: int, kind: str, n: int, script: str | None, ts: float,
                limits: Sequence[Limit]) -> tuple[Reservation | None, list[int]]:
        """Count the event only if every limit holds, atomically; (reservation, usage).

        The usage is each limit's count before this event; the reservation is
        None (and nothing was counted) when one limit would be exceeded.
        """
        with self._atomically():
            used = [(self.count(kind, limit.window, ts, site=site) if limit.scope == "site"
                     else self.count(kind, limit.window, ts, uid=uid))[1 if limit.total else 0]
                    for limit in limits]
            if not within(limits, used, n):
                return None, used
            return self.record(site, uid, kind, n, script, ts), used

    @contextmanager
    def _atomically(self) -> Iterator[None]:
        """The caller's transaction if one is open, else one of its own."""
        with self._lock:
            if self._db.in_transaction:
                yield
            else:
                with self.transaction():
                    yield

    def by_node(self, kind: str, window: float, now: float,
                site: str | None = None) -> dict[str, dict[str, tuple[int, int]]]:
        """site -> node -> (events, sum of n) of ``kind`` in the window: here, this node's."""
        if site is not None:
            events, total = self.count(kind, window, now, site=site)
            return {site: {self.node: (events, total)}} if events or total else {}
        rows = self.top(window, now) if kind == ACCEPTED else []
        return {name: {self.node: (events, total)} for name, _, events, total in rows}

    def count_script(self, site: str, script: str, since: float, now: float) -> int:
        """Messages ``script`` of ``site`` sent from the bucket of ``since`` on."""
        res = MINUTE if now - since <= MINUTE_SPAN else HOUR
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(events), 0) FROM script_counts WHERE site = ? AND "
                "script = ? AND res = ? AND bucket >= ?",
                (site, script, res, int(since // res))).fetchone()
        return int(row[0])

    def top(self, window: float, now: float,
            by_script: bool = False) -> list[tuple[str, str, int, int]]:
        """(site, script, messages, recipients) accepted in the window, busiest first."""
        res, first = buckets(window, now)
        if by_script:
            query = ("SELECT site, script, SUM(events) AS c, SUM(total) FROM script_counts "
                     "WHERE res = ? AND bucket >= ? GROUP BY site, script HAVING c > 0 "
                     "ORDER BY c DESC, site, script")
            params: tuple[object, ...] = (res, first)
        else:
            query = ("SELECT site, '', SUM(events) AS c, SUM(total) FROM site_counts "
                     "WHERE res = ? AND bucket >= ? AND kind = ? GROUP BY site "
                     "HAVING c > 0 ORDER BY c DESC, site")
            params = (res, first, ACCEPTED)
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        return [(str(a), str(b), int(c), int(d)) for a, b, c, d in rows]

    def reset_usage(self, site: str) -> int:
        """Forget every counter and recipient domain of ``site``; the events forgotten."""
        with self._lock:
            (events,) = self._db.execute(
                "SELECT COALESCE(SUM(events), 0) FROM site_counts WHERE site = ? AND res = ?",
                (site, HOUR)).fetchone()
            for table in (*COUNTERS, "domains"):
                self._db.execute(f"DELETE FROM {table} WHERE site = ?", (site,))  # noqa: S608
            return int(events)

    # -- recipient domains ------------------------------------------------------
    def record_domains(self, site: str, domains: Iterable[str], ts: float) -> None:
        """Note the recipient domains of one message of ``site`` (the minute last seen)."""
        minute = int(ts // MINUTE)
        with self._lock:
            self._db.executemany(
                "INSERT INTO domains VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET "
                "minute = MAX(minute, excluded.minute)",
                [(site, domain, minute) for domain in domains])

    def distinct_domains(self, site: str, now: float, cap: int) -> int:
        """Distinct recipient domains of ``site`` in the last hour, counted up to ``cap``."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM (SELECT 1 FROM domains WHERE site = ? AND minute >= ? "
                "LIMIT ?)", (site, int(now // MINUTE) - DOMAIN_WINDOW + 1, cap)).fetchone()
        return int(row[0])

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
        return self._set_mark("suspensions", "_suspended", site, reason, actor)

    def resume(self, site: str) -> bool:
        return self._drop_mark("suspensions", "_suspended", site)

    def _set_mark(self, table: str, memory: str, name: str, reason: str, actor: str) -> bool:
        """Insert a mark (suspension, relay mark) and, once written, its in-memory copy."""
        since = time.time()
        with self._lock:
            cur = self._db.execute(
                f"INSERT OR IGNORE INTO {table} VALUES (?, ?, ?, ?)",  # noqa: S608
                (name, since, reason, actor))
            if cur.rowcount != 1:
                return False
            self._in_step(lambda: getattr(self, memory).__setitem__(name, (since, reason, actor)))
            return True

    def _drop_mark(self, table: str, memory: str, name: str) -> bool:
        with self._lock:
            column = "site" if table == "suspensions" else "name"
            cur = self._db.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))  # noqa: S608
            if cur.rowcount != 1:
                return False
            self._in_step(lambda: getattr(self, memory).pop(name, None))
            return True

    def suspension(self, site: str) -> tuple[float, str, str] | None:
        """(since, reason, actor) of a suspended site: from memory, no lock, no SQL.

        Safe on the event loop; kept in step with the table by :meth:`suspend` and
        :meth:`resume` of this process, and by :meth:`follow` with other processes'.
        """
        return self._suspended.get(site)

    # -- quota overrides --------------------------------------------------------
    def overrides(self, site: str) -> dict[str, int | None]:
        """The operator's limits for ``site``: from memory, no lock, no SQL."""
        return dict(self._overrides.get(site, {}))

    def set_override(self, site: str, key: str, value: int | None) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO quota_overrides VALUES (?, ?, ?)",
                             (site, key, value))
            self._in_step(lambda: self._overrides.setdefault(site, {}).__setitem__(key, value))

    def clear_overrides(self, site: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM quota_overrides WHERE site = ?", (site,))
            self._in_step(lambda: self._overrides.pop(site, None))

    # -- relay marks (issue 14) ----------------------------------------------------
    def relay_marks(self) -> dict[str, tuple[float, str, str]]:
        """name -> (since, reason, actor) of the burned relay logins: from memory, no lock."""
        return dict(self._relay_marks)

    def burn_relay(self, name: str, reason: str, actor: str) -> bool:
        """Mark a relay login burned; True if it was not before."""
        return self._set_mark("relay_marks", "_relay_marks", name, reason, actor)

    def restore_relay(self, name: str) -> bool:
        """Lift a relay login's burn mark; True if it was burned."""
        return self._drop_mark("relay_marks", "_relay_marks", name)

    def mirror(self, suspended: Marks, overrides: dict[str, dict[str, int | None]],
               relay_marks: Marks) -> None:
        """Replace the suspensions, overrides and relay marks (file and memory) with these:
        the shared backend's copy, kept here for when it cannot be reached."""
        with self._atomically():
            for table in ("suspensions", "quota_overrides", "relay_marks"):
                self._db.execute(f"DELETE FROM {table}")  # noqa: S608
            self._db.executemany("INSERT INTO suspensions VALUES (?, ?, ?, ?)",
                                 [(k, *v) for k, v in suspended.items()])
            self._db.executemany("INSERT INTO relay_marks VALUES (?, ?, ?, ?)",
                                 [(k, *v) for k, v in relay_marks.items()])
            self._db.executemany("INSERT INTO quota_overrides VALUES (?, ?, ?)",
                                 [(site, key, value) for site, values in overrides.items()
                                  for key, value in values.items()])
            self._in_step(lambda: self._replace(suspended, overrides, relay_marks))

    def _replace(self, suspended: Marks, overrides: dict[str, dict[str, int | None]],
                 relay_marks: Marks) -> None:
        """New in-memory copies, each swapped in whole (readers take no lock)."""
        self._elsewhere.extend((site, mark) for site, mark in suspended.items()
                               if site not in self._suspended)
        self._suspended = dict(suspended)
        self._overrides = {site: dict(values) for site, values in overrides.items()}
        self._relay_marks = dict(relay_marks)

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


def within(limits: Sequence[Limit], used: Sequence[int], n: int) -> bool:
    """True when adding one event of ``n`` keeps every limit (usage ``used``) within bounds."""
    return all(limit.limit is None or value + (n if limit.total else 1) <= limit.limit
               for limit, value in zip(limits, used, strict=True))
