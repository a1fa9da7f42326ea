"""The state shared by the nodes of a fleet, in Redis (6 or later) or Valkey.

Trusts: the Redis server of ``state.url`` and everyone who can write to it.
Sites can read the configuration file and reach the network, so the server
must require a password, read from ``state.password_file`` (the daemon's, not
the sites'); ``config check`` warns when there is none or when it sits in
``state.url``.  The keys under ``state.prefix`` are ours;
the node's own SQLite state (``store.state``), which this class extends.
Guarantees: the same interface and the same sliding windows as the SQLite
:class:`~sendmail_shim.store.state.State` (minute buckets up to two hours, hour
buckets beyond), shared by every node that names the same server and prefix:

* quota windows, outbreak counters and the per-script statistics of ``top``:
  one hash per bucket (``<prefix>b:<60|3600>:<bucket>``), expiring after the
  bucket's retention, whose fields count events and their sum of n per site
  and kind, per site, kind and node (who sent what), per uid, per script;
* :meth:`RedisState.reserve` is one Lua script: it reads every limit's usage
  and counts the event only if each holds, so nodes racing for a site's last
  message let exactly one through;
* suspensions, quota overrides and relay marks: hashes, and a generation
  counter bumped by every change; a thread of each node polls the counter
  every :data:`REFRESH` seconds and reloads the three on a change, so a
  ``site suspend`` on one node stops the site on every node within half a
  second.  :meth:`suspension`, :meth:`overrides` and :meth:`relay_marks` read
  the in-memory copy, never Redis (the event loop calls them);
* recipient domains (a sorted set per site) and scripts' first sighting.
  To spare round trips on the hand-off path, :meth:`record_domains` also
  counts the site's domains, and a :meth:`distinct_domains` within
  :data:`NOTE_FRESH` seconds uses that count; a script's first sighting,
  which never changes, is remembered once read.

Submission ids (``claim_submission`` and the rest) stay in the node's SQLite
file: they are about the node's own spool and its two roads (socket, drop
file), which no other node sees.

Every counter is also written to the node's SQLite file (its own share), and
the shared marks are mirrored there.  When Redis cannot be reached, at start
or mid-run, the node FAILS OPEN: it logs an ERROR naming the URL and what to do
(at most one a minute), counts and checks with its SQLite file alone, keeps
enforcing the suspensions and overrides last seen from Redis, applies
suspensions, resumes, overrides and relay marks made meanwhile to its file and
replays them to Redis when it answers again; a thread tries the server every
:data:`RETRY` seconds and logs when the state is shared again.  A Redis error
never reaches the caller: no message is refused or lost for it.  The price is
bounded over-sending: during an outage or a partition each node enforces each
limit alone against its own share, so a site sends at most N times its limit
per window with N nodes (2 nodes: twice ``per_hour``).  Counts made during
the outage are not copied to Redis afterwards.  A Redis found empty (new, or
restarted without persistence) is seeded with the node's copy of the
suspensions, overrides and relay marks, so a lost server loses no suspension;
run Redis with persistence (appendonly) to keep the counters too.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from sendmail_shim.store.state import (
    ACCEPTED,
    DOMAIN_WINDOW,
    HOUR,
    MINUTE,
    MINUTE_SPAN,
    RETENTION,
    Limit,
    Marks,
    Reservation,
    State,
    buckets,
)
from sendmail_shim.wire import paths

log = logging.getLogger(__name__)

REFRESH = 0.25  # seconds between two looks at the generation counter
RETRY = 3.0  # seconds between two connection attempts while Redis is away
LOG_EVERY = 60.0  # at most one ERROR line a minute while Redis is away
TIMEOUT = 1.0  # connect and command timeout: a hung server costs a message at most this
NOTE_FRESH = 0.1  # seconds: distinct_domains right after record_domains uses its count
FIRST_SEEN_CACHE = 100_000  # (site, script) first sightings remembered in memory
TTL = {MINUTE: MINUTE_SPAN + 2 * MINUTE, HOUR: int(RETENTION) + 2 * HOUR}
SEP = "\t"

# Reserve (with no limits: record; with sign -1: forget).  ARGV: prefix, minute bucket,
# hour bucket, minute ttl, hour ttl, sign, n, site, kind, node, uid, script, then six
# values per limit: scope (s|u), resolution, first bucket, last bucket, total (0|1),
# limit (-1: none).  Returns {1 if counted else 0, usage of each limit...}.
RESERVE = """
local p, site, kind, node, uid, script = ARGV[1], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local sign, n = tonumber(ARGV[6]), tonumber(ARGV[7])
local t = '\\t'
local result, ok = {0}, true
-- Limits sharing a range of buckets are read together: one HMGET per bucket.
local groups, order, limits = {}, {}, {}
local i = 13
while i + 5 <= #ARGV do
  local scope, total = ARGV[i], ARGV[i+4] == '1'
  local field
  if scope == 's' then field = (total and 'st' or 'se') .. t .. site .. t .. kind
  else field = (total and 'ut' or 'ue') .. t .. uid .. t .. kind end
  local range = ARGV[i+1] .. ':' .. ARGV[i+2] .. ':' .. ARGV[i+3]
  if not groups[range] then
    groups[range] = {res = ARGV[i+1], first = tonumber(ARGV[i+2]), last = tonumber(ARGV[i+3]),
                     fields = {}, members = {}}
    order[#order + 1] = range
  end
  local group = groups[range]
  group.fields[#group.fields + 1] = field
  group.members[#group.members + 1] = #limits + 1
  limits[#limits + 1] = {sum = 0, add = total and n or 1, limit = tonumber(ARGV[i+5])}
  i = i + 6
end
for _, range in ipairs(order) do
  local group = groups[range]
  for b = group.first, group.last do
    local values = redis.call('HMGET', p .. 'b:' .. group.res .. ':' .. b, unpack(group.fields))
    for j, value in ipairs(values) do
      if value then
        local limit = limits[group.members[j]]
        limit.sum = limit.sum + tonumber(value)
      end
    end
  end
end
for _, limit in ipairs(limits) do
  result[#result + 1] = limit.sum
  if limit.limit >= 0 and limit.sum + limit.add > limit.limit then ok = false end
end
if not ok then return result end
result[1] = 1
for j, res in ipairs({'60', '3600'}) do
  local key = p .. 'b:' .. res .. ':' .. ARGV[1 + j]
  redis.call('HINCRBY', key, 'se' .. t .. site .. t .. kind, sign)
  redis.call('HINCRBY', key, 'st' .. t .. site .. t .. kind, sign * n)
  redis.call('HINCRBY', key, 'ne' .. t .. site .. t .. kind .. t .. node, sign)
  redis.call('HINCRBY', key, 'nt' .. t .. site .. t .. kind .. t .. node, sign * n)
  if kind == 'accepted' then
    redis.call('HINCRBY', key, 'ue' .. t .. uid .. t .. kind, sign)
    redis.call('HINCRBY', key, 'ut' .. t .. uid .. t .. kind, sign * n)
    redis.call('HINCRBY', key, 'xe' .. t .. site .. t .. script, sign)
    redis.call('HINCRBY', key, 'xt' .. t .. site .. t .. script, sign * n)
  end
  redis.call('EXPIRE', key, ARGV[3 + j])
end
return result
"""

# Sums of fields over a range of buckets, in one call.  ARGV: prefix, resolution, first
# bucket, last bucket, fields...  Returns each field's sum.
SUM = """
local fields, sums = {}, {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i]; sums[#sums + 1] = 0 end
for b = tonumber(ARGV[3]), tonumber(ARGV[4]) do
  local values = redis.call('HMGET', ARGV[1] .. 'b:' .. ARGV[2] .. ':' .. b, unpack(fields))
  for j, value in ipairs(values) do
    if value then sums[j] = sums[j] + tonumber(value) end
  end
end
return sums
"""

# reset_usage: delete every field of one site from the given bucket keys; the events
# forgotten (hour buckets).  KEYS: bucket keys.  ARGV: site.
RESET = """
local t, site, events = '\\t', ARGV[1], 0
for _, key in ipairs(KEYS) do
  local fields = redis.call('HKEYS', key)
  for _, f in ipairs(fields) do
    local tag, rest = string.sub(f, 1, 2), string.sub(f, 4)
    if tag ~= 'ue' and tag ~= 'ut' and string.sub(rest, 1, #site + 1) == site .. t then
      if tag == 'se' and string.find(key, ':3600:', 1, true) then
        events = events + tonumber(redis.call('HGET', key, f))
      end
      redis.call('HDEL', key, f)
    end
  end
end
return events
"""


def read_password(password_file: str | None) -> str | None:
    """The first line of ``password_file`` (None without one); OSError when unreadable."""
    if password_file is None:
        return None
    with open(password_file, encoding="utf-8") as fh:
        return fh.readline().rstrip("\r\n")


def insecure(url: str, password_file: str | None) -> str | None:
    """Why this Redis set-up lets sites change the shared state; None when it does not."""
    if "@" in url.partition("://")[2].split("/", 1)[0]:
        return ("state.url holds a password, but every site can read the configuration "
                "file (the sendmail front end reads it): move it to state.password_file")
    if password_file is None:
        return ("no state.password_file: unless the Redis server is out of every site's "
                "reach, a site can connect to it and lift its own suspension or quota; set "
                "requirepass (or an ACL user) and state.password_file")
    return None


def check_backend(url: str, prefix: str, password_file: str | None = None) -> str | None:
    """None when the Redis server answers (and runs Lua), else what is wrong and what to do."""
    try:
        import redis  # lazy: only the redis backend needs it
    except ImportError as exc:
        return (f"state.backend redis: the redis client cannot be imported ({exc}); install "
                "python3-redis")

    try:
        password = read_password(password_file)
    except OSError as exc:
        return f"state.password_file {password_file}: {exc.strerror}"
    try:
        client = redis.Redis.from_url(url, socket_timeout=TIMEOUT, password=password,
                                      socket_connect_timeout=TIMEOUT)
    except ValueError as exc:
        return f"state.url {_safe(url)} cannot be used ({exc}); fix state.url"
    try:
        client.ping()
        client.eval("return 1", 0)
        client.get(prefix + "gen")
    except redis.RedisError as exc:
        return (f"state.backend redis: {_safe(url)} does not answer ({exc}); start the Redis "
                "or Valkey server, or fix state.url")
    finally:
        client.close()
    return None


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def _key(*parts: object) -> str:
    return SEP.join(str(part) for part in parts)


class RedisState(State):
    """:class:`State` with its shared parts in Redis; the SQLite file is the fallback."""

    shared = True

    def __init__(self, layout: paths.SpoolLayout, create: bool = True, node: str | None = None,
                 url: str = "redis://127.0.0.1:6379/0", prefix: str = "sendmail-shim:",
                 password_file: str | None = None) -> None:
        import redis  # lazy: the redis client is not on the sqlite path

        password = read_password(password_file)  # unreadable: OSError
        client = redis.Redis.from_url(url, socket_timeout=TIMEOUT,  # a bad URL: ValueError
                                      socket_connect_timeout=TIMEOUT, decode_responses=True,
                                      password=password)
        super().__init__(layout, create, node)
        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.url, self.prefix = url, prefix
        self._client = client
        self._reserve = self._client.register_script(RESERVE)
        self._reset = self._client.register_script(RESET)
        self._sum_script = self._client.register_script(SUM)
        self._up = False
        self._generation: str | None = None
        self._last_error = 0.0
        self._pending: list[tuple[str, tuple[Any, ...]]] = []  # mark changes made while down
        self._undo: list[Reservation] | None = None
        self._domains_counted: dict[str, tuple[int, int, float]] = {}  # site: minute, count, when
        self._first_seen: dict[tuple[str, str], float] = {}
        self._closed = threading.Event()
        self._connect()
        self._thread = threading.Thread(target=self._watch, name="state-redis", daemon=True)
        self._thread.start()

    # -- connection ---------------------------------------------------------------
    @property
    def up(self) -> bool:
        """True while the shared state answers (False: this node runs on its own file)."""
        return self._up

    def _down(self, exc: BaseException) -> None:
        """Redis failed: run on the local file until the watcher reconnects."""
        was_up, self._up = self._up, False
        now = time.monotonic()
        if was_up or now - self._last_error >= LOG_EVERY or not self._last_error:
            self._last_error = now
            log.error("state: the shared Redis state %s cannot be reached (%s); FAILING OPEN: "
                      "this node %s counts quotas alone in its own state file and keeps the "
                      "suspensions last seen, so a site may send up to its limit on each node; "
                      "start the Redis or Valkey server or fix state.url; retrying every "
                      "%gs", _safe(self.url), exc, self.node, RETRY)

    def _connect(self) -> bool:
        """Try the server; on success replay the changes made meanwhile and reload the marks."""
        try:
            self._client.ping()
            with self._lock:
                if self._client.get(self.prefix + "gen") is None:
                    self._seed()
                for op, args in self._pending:
                    getattr(self, "_shared_" + op)(*args)
                self._pending.clear()
            self._reload(force=True)
        except self._redis_errors as exc:
            self._down(exc)
            return False
        if self._last_error:
            log.info("state: the shared Redis state %s answers again; node %s counts and reads "
                     "the fleet's state there", _safe(self.url), self.node)
            self._last_error = 0.0
        self._up = True
        return True

    def _seed(self) -> None:
        """An empty Redis (new, or restarted without its data): push this node's copy of
        the suspensions, overrides and relay marks, so none is lost with the server."""
        pipe = self._client.pipeline(transaction=True)
        for table, marks in (("suspensions", self._suspended), ("relay_marks", self._relay_marks)):
            for name, mark in marks.items():
                pipe.hsetnx(self.prefix + table, name, json.dumps(mark))
        for site, values in self._overrides.items():
            for key, value in values.items():
                pipe.hsetnx(self.prefix + "overrides", _key(site, key), json.dumps(value))
        self._bump(pipe)
        pipe.execute()
        if not (self._suspended or self._relay_marks or self._overrides):
            return
        log.warning("state: the shared Redis state %s was empty; node %s wrote its copy of "
                    "%d suspensions, %d relay marks and the quota overrides of %d sites there",
                    _safe(self.url), self.node, len(self._suspended), len(self._relay_marks),
                    len(self._overrides))

    def follow(self) -> bool:
        """The watcher thread follows Redis; while it is away, the local file (changes of
        other processes on this node) as the SQLite state does."""
        return False if self._up else super().follow()

    def _watch(self) -> None:
        """Poll the generation counter (reload on a change); reconnect while Redis is away."""
        while not self._closed.wait(REFRESH if self._up else RETRY):
            try:
                if self._up:
                    self._reload()
                else:
                    self._connect()
            except self._redis_errors as exc:
                self._down(exc)
            except Exception:  # the watcher must outlive any one failure
                log.exception("state: reading the shared suspensions failed; retrying")

    def _reload(self, force: bool = False) -> None:
        """Load suspensions, overrides and relay marks when their generation changed.

        Under the lock, so a change this node makes (which holds it too) is never
        overwritten by a copy read before it; the in-memory copy is swapped in even
        when the local file cannot be written.
        """
        generation = self._client.get(self.prefix + "gen")
        if not force and generation == self._generation:
            return
        with self._lock:
            pipe = self._client.pipeline(transaction=True)
            pipe.get(self.prefix + "gen")
            for name in ("suspensions", "overrides", "relay_marks"):
                pipe.hgetall(self.prefix + name)
            generation, suspended, raw_overrides, relay = pipe.execute()
            overrides: dict[str, dict[str, int | None]] = {}
            for field, value in raw_overrides.items():
                site, _, key = field.partition(SEP)
                overrides.setdefault(site, {})[key] = json.loads(value)
            self._replace(_marks(suspended), overrides, _marks(relay))
            self._generation = generation
            try:
                self.mirror(_marks(suspended), overrides, _marks(relay))
            except sqlite3.Error as exc:
                log.warning("state: the copy of the shared suspensions could not be written "
                            "to the local state file (%s); free space on the spool disk", exc)

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * TIMEOUT + REFRESH)
        self._client.close()
        super().close()

    def _shared(self, what: str, call: Any, *args: Any) -> Any:
        """Run ``call(*args)`` against Redis while it is up; None when it is not (or fails)."""
        if not self._up:
            return None
        try:
            return call(*args)
        except self._redis_errors as exc:
            self._down(exc)
            log.debug("state: %s fell back to the local file", what)
            return None

    # -- counters ---------------------------------------------------------------
    def _script_args(self, r: Reservation, sign: int) -> list[Any]:
        return [self.prefix, int(r.ts // MINUTE), int(r.ts // HOUR), TTL[MINUTE], TTL[HOUR],
                sign, r.n, r.site, r.kind, self.node, r.uid, r.script or ""]

    def reserve(self, site: str, uid: int, kind: str, n: int, script: str | None, ts: float,
                limits: Sequence[Limit]) -> tuple[Reservation | None, list[int]]:
        if not self._up:
            return super().reserve(site, uid, kind, n, script, ts, limits)
        probe = Reservation(site, uid, kind, n, script, ts, shared=True)
        args = self._script_args(probe, 1)
        for limit in limits:
            res, first = buckets(limit.window, ts)
            args += ["s" if limit.scope == "site" else "u", res, first, int(ts // res),
                     1 if limit.total else 0, -1 if limit.limit is None else limit.limit]
        with self._lock:  # a transaction holds it: _undo is this thread's
            result = self._shared("reserve", self._reserve, [], args)
            if result is None:
                return super().reserve(site, uid, kind, n, script, ts, limits)
            used = [int(value) for value in result[1:]]
            if not result[0]:
                return None, used
            self._counted(probe)
            super().record(site, uid, kind, n, script, ts)  # this node's own share
            return probe, used

    def _counted(self, reservation: Reservation) -> None:
        """Note a count made in Redis inside a transaction (held lock), to undo on rollback."""
        if self._undo is not None:
            self._undo.append(reservation)

    def record(self, site: str, uid: int, kind: str, n: int = 1, script: str | None = None,
               ts: float | None = None) -> Reservation:
        with self._lock:
            local = super().record(site, uid, kind, n, script, ts)
            shared = Reservation(site, uid, kind, n, script, local.ts, shared=True)
            if self._shared("record", self._reserve, [], self._script_args(shared, 1)) is None:
                return local
            self._counted(shared)
            return shared

    def forget(self, reservation: Reservation) -> None:
        super().forget(reservation)
        if reservation.shared:
            self._shared("forget", self._reserve, [], self._script_args(reservation, -1))

    @contextmanager
    def transaction(self) -> Iterator[State]:
        """The local transaction; on a rollback, counts made in Redis are taken back too."""
        with self._lock:
            self._undo = []
            try:
                with super().transaction() as state:
                    yield state
            except BaseException:
                for reservation in self._undo:
                    self._shared("undo", self._reserve, [], self._script_args(reservation, -1))
                raise
            finally:
                self._undo = None

    def _bucket_keys(self, window: float, now: float) -> tuple[int, list[str]]:
        res, first = buckets(window, now)
        return res, [f"{self.prefix}b:{res}:{b}" for b in range(first, int(now // res) + 1)]

    def _sum(self, res: int, first: int, last: int, fields: Sequence[str]) -> list[int] | None:
        """Each field summed over the buckets first..last; None when Redis is away."""
        result = self._shared("count", self._sum_script, [],
                              [self.prefix, res, first, last, *fields])
        return None if result is None else [int(value) for value in result]

    def _hashes(self, keys: list[str]) -> list[dict[str, str]] | None:
        def read() -> list[dict[str, str]]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return list(pipe.execute())
        result: list[dict[str, str]] | None = self._shared("read", read)
        return result

    def count(self, kind: str, window: float, now: float, site: str | None = None,
              uid: int | None = None) -> tuple[int, int]:
        res, first = buckets(window, now)
        head = ("s", site) if site is not None else ("u", uid)
        sums = self._sum(res, first, int(now // res), [_key(head[0] + "e", head[1], kind),
                                                       _key(head[0] + "t", head[1], kind)])
        if sums is None:
            return super().count(kind, window, now, site, uid)
        return sums[0], sums[1]

    def count_script(self, site: str, script: str, since: float, now: float) -> int:
        res = MINUTE if now - since <= MINUTE_SPAN else HOUR
        sums = self._sum(res, int(since // res), int(now // res), [_key("xe", site, script)])
        return super().count_script(site, script, since, now) if sums is None else sums[0]

    def _fields(self, window: float, now: float, tag: str) -> dict[tuple[str, ...], list[int]]:
        """The fields tagged ``tag`` (e: events; t: sums) summed over the window, by key."""
        _, keys = self._bucket_keys(window, now)
        hashes = self._hashes(keys)
        if hashes is None:
            raise LookupError("redis away")
        found: dict[tuple[str, ...], list[int]] = {}
        for fields in hashes:
            for field, value in fields.items():
                if field[1] in "et" and field[0] == tag:
                    parts = tuple(field.split(SEP)[1:])
                    found.setdefault(parts, [0, 0])[0 if field[1] == "e" else 1] += int(value)
        return found

    def top(self, window: float, now: float,
            by_script: bool = False) -> list[tuple[str, str, int, int]]:
        try:
            found = self._fields(window, now, "x" if by_script else "s")
        except LookupError:
            return super().top(window, now, by_script)
        rows = [(parts[0], parts[1] if by_script else "", events, total)
                for parts, (events, total) in found.items()
                if events > 0 and (by_script or parts[1] == ACCEPTED)]
        return sorted(rows, key=lambda row: (-row[2], row[0], row[1]))

    def by_node(self, kind: str, window: float, now: float,
                site: str | None = None) -> dict[str, dict[str, tuple[int, int]]]:
        try:
            found = self._fields(window, now, "n")
        except LookupError:
            return super().by_node(kind, window, now, site)
        nodes: dict[str, dict[str, tuple[int, int]]] = {}
        for (name, what, node), (events, total) in found.items():
            if what == kind and (site is None or name == site) and (events or total):
                nodes.setdefault(name, {})[node] = (events, total)
        return nodes

    def reset_usage(self, site: str) -> int:
        local = super().reset_usage(site)
        self._domains_counted.pop(site, None)

        def reset() -> int:
            keys = [key for pattern in (f"{self.prefix}b:60:*", f"{self.prefix}b:3600:*")
                    for key in self._client.scan_iter(match=pattern, count=1000)]
            events = int(self._reset(keys, [site])) if keys else 0
            self._client.delete(self.prefix + "d:" + site)
            return events
        shared: int | None = self._shared("reset_usage", reset)
        return local if shared is None else shared

    # -- recipient domains and scripts -------------------------------------------------
    def record_domains(self, site: str, domains: Iterable[str], ts: float) -> None:
        domains = list(domains)
        super().record_domains(site, domains, ts)
        minute = int(ts // MINUTE)

        def add() -> None:
            key = self.prefix + "d:" + site
            pipe = self._client.pipeline(transaction=False)
            pipe.zadd(key, dict.fromkeys(domains, minute))
            pipe.zremrangebyscore(key, "-inf", minute - DOMAIN_WINDOW)
            pipe.expire(key, (DOMAIN_WINDOW + 1) * MINUTE)
            pipe.zcount(key, minute - DOMAIN_WINDOW + 1, "+inf")
            counted = int(pipe.execute()[-1])
            self._domains_counted[site] = (minute, counted, time.monotonic())
        if domains:
            self._shared("record_domains", add)

    def distinct_domains(self, site: str, now: float, cap: int) -> int:
        minute = int(now // MINUTE)
        noted = self._domains_counted.pop(site, None)
        if noted is not None and noted[0] == minute and time.monotonic() - noted[2] < NOTE_FRESH:
            return min(noted[1], cap)  # counted with the note just made: no second round trip
        found = self._shared("distinct_domains", self._client.zcount,
                             self.prefix + "d:" + site, minute - DOMAIN_WINDOW + 1, "+inf")
        if found is None:
            return super().distinct_domains(site, now, cap)
        return min(int(found), cap)

    def script_first_seen(self, site: str, script: str, now: float) -> float:
        known = self._first_seen.get((site, script))
        if known is not None:
            return known  # a first sighting never changes: asked once per process
        local = super().script_first_seen(site, script, now)

        def seen() -> float:
            pipe = self._client.pipeline(transaction=True)
            pipe.hsetnx(self.prefix + "scripts", _key(site, script), repr(now))
            pipe.hget(self.prefix + "scripts", _key(site, script))
            return float(pipe.execute()[1])
        shared: float | None = self._shared("script_first_seen", seen)
        if shared is None:
            return local
        if len(self._first_seen) >= FIRST_SEEN_CACHE:
            self._first_seen.clear()
        self._first_seen[(site, script)] = shared
        return shared

    # -- suspensions, overrides, relay marks ----------------------------------------------
    def _change(self, op: str, *args: Any) -> Any:
        """Apply a mark change to Redis, or queue it for replay when Redis is away."""
        with self._lock:
            if self._up:
                result = self._shared(op, getattr(self, "_shared_" + op), *args)
                if self._up:
                    return result
            self._pending.append((op, args))
            return None

    def _bump(self, pipe: Any) -> None:
        pipe.incr(self.prefix + "gen")

    def _shared_set_mark(self, table: str, name: str, mark: tuple[float, str, str]) -> bool:
        pipe = self._client.pipeline(transaction=True)
        pipe.hsetnx(self.prefix + table, name, json.dumps(mark))
        self._bump(pipe)
        return bool(pipe.execute()[0])

    def _shared_drop_mark(self, table: str, name: str) -> bool:
        pipe = self._client.pipeline(transaction=True)
        pipe.hdel(self.prefix + table, name)
        self._bump(pipe)
        return bool(pipe.execute()[0])

    def _shared_override(self, site: str, key: str, value: int | None) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self.prefix + "overrides", _key(site, key), json.dumps(value))
        self._bump(pipe)
        pipe.execute()

    def _shared_clear_overrides(self, site: str) -> None:
        names = cast("list[str]", self._client.hkeys(self.prefix + "overrides"))
        fields = [field for field in names if field.split(SEP, 1)[0] == site]
        pipe = self._client.pipeline(transaction=True)
        if fields:
            pipe.hdel(self.prefix + "overrides", *fields)
        self._bump(pipe)
        pipe.execute()

    def _mark(self, table: str, name: str, reason: str, actor: str) -> bool:
        with self._lock:  # no reload in between: see _reload
            local = (super().suspend(name, reason, actor) if table == "suspensions"
                     else super().burn_relay(name, reason, actor))
            mark = (self._suspended if table == "suspensions" else self._relay_marks).get(name)
            shared = self._change("set_mark", table, name, mark or (time.time(), reason, actor))
            return local if shared is None else bool(shared)

    def _unmark(self, table: str, name: str) -> bool:
        with self._lock:
            local = (super().resume(name) if table == "suspensions"
                     else super().restore_relay(name))
            shared = self._change("drop_mark", table, name)
            return local if shared is None else bool(shared)

    def suspend(self, site: str, reason: str, actor: str) -> bool:
        return self._mark("suspensions", site, reason, actor)

    def resume(self, site: str) -> bool:
        return self._unmark("suspensions", site)

    def burn_relay(self, name: str, reason: str, actor: str) -> bool:
        return self._mark("relay_marks", name, reason, actor)

    def restore_relay(self, name: str) -> bool:
        return self._unmark("relay_marks", name)

    def set_override(self, site: str, key: str, value: int | None) -> None:
        with self._lock:
            super().set_override(site, key, value)
            self._change("override", site, key, value)

    def clear_overrides(self, site: str) -> None:
        with self._lock:
            super().clear_overrides(site)
            self._change("clear_overrides", site)


def _marks(raw: dict[str, str]) -> Marks:
    marks: Marks = {}
    for name, value in raw.items():
        since, reason, actor = json.loads(value)
        marks[name] = (float(since), str(reason), str(actor))
    return marks
