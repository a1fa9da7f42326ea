"""The queue runner: picks due messages, delivers them per site, retries, bounces.

Trusts: queue files (the daemon wrote them) but re-validates them on read; a
file that does not parse moves to ``corrupt/`` and is never delivered.
Guarantees:

* a message leaves the spool only when every recipient has a final outcome
  (delivered or bounced).  A message delivered to all its recipients is only
  removed (no status is written, the removal is not fsync'd): a crash before
  that reaches the disk re-sends it (at-least-once, as every MTA), never
  skips it.  Refused recipients are written to ``status/`` before their
  bounce is queued, waiting ones with the deferral;
* bookkeeping that fails (a full disk: the status, the bounce, the removal)
  never makes the runner send again: the attempt's outcome is kept in memory,
  delivery pauses (nothing is sent) and every run first retries that
  bookkeeping; when it succeeds, delivery resumes.  Only a restart while
  paused forgets it, and then the message in question is sent once more;
* temporary trouble (4xx, network, TLS, AUTH) waits with exponential backoff
  and jitter (``retry.initial`` doubling up to ``retry.maximum``); after
  ``retry.lifetime`` in the queue the remaining recipients are bounced;
* permanent refusals (5xx) are bounced at once (bounce.py), never for the
  null sender;
* scheduling without rescans: deferred messages are kept in memory by next
  attempt (:class:`_Schedule`, read once from ``deferred/`` in the background
  at start, then fed by the runner's own deferrals); new mail is announced by
  :meth:`QueueRunner.poke` and found by listing ``incoming/`` (names only).
  An idle runner with a long deferred queue reads nothing until one is due;
  a flush (``force``) lists ``deferred/`` once and takes every message in it.
  A run takes at most :data:`RUN_CHUNK` messages and the next run follows at
  once, so a long queue starts at once and costs the same per message;
* fairness: each site has its own work queue in a run; sites get sessions
  round-robin, at most :data:`MAX_PARALLEL_SITES` sites and
  :data:`MAX_SESSIONS` sessions at once.  A site with a long queue opens one
  more session per :data:`LANE_BATCH` waiting messages, up to the smallest
  ``sessions`` of the relays.  When no slot is free and another site waits,
  a session ends after its message in hand (at once if its site holds
  several, else after :data:`LANE_TURN` messages) and the waiting site gets
  it.  Mail of another site that arrives during a run joins it within
  :data:`REFILL_EVERY`; a site's own new mail waits for the next run (it
  would queue behind its backlog anyway).  The messages of one site are
  sent in queue order over its sessions, each session reused for many;
* a site's relay sessions outlive its lane by :data:`IDLE_SESSION` seconds
  (:class:`_IdleSessions`, Postfix's connection cache: ``smtp_connection_cache_on_demand``
  with its 2 s ``smtp_connection_cache_time_limit``): the site's next lane under the same
  configuration takes one instead of connecting and logging in again, after an RSET shows
  it still works (as Postfix checks a cached session); a session that fails the check
  is closed and a new one opened, so no message waits because of it.  Only
  :meth:`QueueRunner.run_forever` keeps sessions; at most :data:`MAX_SESSIONS` are kept
  (the oldest closed first), never one whose relay was down, and all are closed on a
  reload or at shutdown.  A burst of single messages (PHP's mail()) then costs one
  login per site, not one per message;
* :meth:`QueueRunner.stop` (daemon shutdown) lets each site finish the
  message in hand, including recording its outcome, and starts no other, so
  a SIGTERM never leaves a message the relay accepted unrecorded;
* with a ``local_transport`` configured, each recipient is routed by its
  domain's real MX (route.py): local ones go to the local MTA without any site
  login, remote ones to the relay as the site; NXDOMAIN and null MX bounce,
  DNS trouble defers.  Without a local transport there is nowhere local to
  deliver, so everything goes to the relay and no DNS is asked;
* relay pools (policy/relays.py): each message takes a pool (its site's pin
  or its score's band, ``choose_pool``) and is sent only through that pool's
  active relays (``active_relays``: burned relays out, standbys promoted one
  for one); a lane keeps one channel per pool, so a site's messages in
  different pools use different sessions, while fairness and the
  ``sessions`` limit stay per site as before.  A message of a ``hold`` pool
  moves to hold (a released one is routed, and so held, again); a pool
  without an active relay defers its mail (never another pool's relays).
  ``poke(force=True, pool=...)`` flushes one pool's deferred mail (a burn or
  restore), ``poke(force=True, uid=...)`` one uid's (a site's ``sendmail -q``:
  one site's flush never retries another site's mail).  Each relay's answers are
  counted in :attr:`QueueRunner.relay_stats`;
* the relay's answers feed the ``relay_5xx_share`` rule in groups (:class:`_AnswerBook`):
  the answers settled while one group is written form the next, written in one
  state transaction and checked once per site; a message's settling ends only after
  its answers were written and checked, so a lane never runs ahead of the rule;
* with ``scan.enabled``, a message is scored by spamd before its first attempt
  (scan.py): held above the maximum, deferred or sent unscored when spamd is
  down (``scan.on_failure``), never scored twice; its score then picks the pool;
* one message's failure is that message's alone: any exception while reading,
  routing, sending or recording one message is caught, the message is deferred
  with ``last_error`` naming the exception (and logged with its queue id, site
  and what to do next), and the run goes on with the next message.  After
  :data:`MAX_INTERNAL_FAILURES` such failures in a row the message moves to
  hold for the operator (``queue show``, then ``queue release`` or
  ``queue delete``) instead of being retried forever.  A queue file that does
  not parse moves to ``corrupt/``; one site's failing run does not stop the
  others.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
import sqlite3
import threading
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sendmail_shim.config import Config, Relay, Site
from sendmail_shim.delivery import bounce, loopback
from sendmail_shim.delivery.dkim import Signer
from sendmail_shim.delivery.local import Session, open_local_session
from sendmail_shim.delivery.relay import RelaysUnavailable, SessionBroken, open_session
from sendmail_shim.delivery.route import FAIL, LOCAL, REMOTE, Router
from sendmail_shim.delivery.scan import Scanner
from sendmail_shim.policy import outbreak
from sendmail_shim.policy.relays import (
    RelayStats,
    active_relays,
    choose_pool,
    is_hold,
    unscored_pool,
)
from sendmail_shim.policy.sanctions import suspend_site
from sendmail_shim.store import spool
from sendmail_shim.store.address import printable
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.outcome import OK, PERM, Outcome
from sendmail_shim.store.state import RELAY_5XX, RELAY_OK, State

log = logging.getLogger(__name__)
MAX_PARALLEL_SITES = 8  # sites delivered at once
MAX_SESSIONS = 20  # relay sessions open at once, all sites together (Postfix: 20 per destination)
LANE_BATCH = 4  # a site gets one more session (up to its relay's ``sessions``) per 4 queued
LANE_TURN = 20  # messages a session sends before it gives way to a site waiting for one
REFILL_EVERY = 0.2  # seconds: arrivals during a run are looked for at most this often
RUN_CHUNK = 5000  # messages taken into one run; the rest in the next (bounded memory)
IDLE_SESSION = 2.0  # seconds a relay session is kept after its lane (Postfix: 2 s)
CLOSE_WAIT = 1.0  # seconds the kept sessions' QUITs may take at shutdown
FLUSH_STEP = 250  # a flush's messages read at once: the sessions start after the first step
_ID_MASK = (1 << 64) - 1
MAX_INTERNAL_FAILURES = 3  # in a row; then the message waits in hold for the operator


def backoff(config: Config, attempts: int) -> float:
    """Seconds to wait after ``attempts`` failed attempts."""
    policy = config.retry
    exponent = min(max(0, attempts - 1), 60)  # 2**60 * initial is past any maximum
    delay: float = min(policy.maximum, policy.initial * (2.0 ** exponent))
    return delay * (1 + random.uniform(-policy.jitter, policy.jitter))


@dataclass
class _Attempt:
    """One attempt's outcome on its way to the disk, step by step (see _persist)."""

    state: str
    queue_id: str
    env: Envelope
    message: bytes
    status: spool.Status  # done, failed and delayed recipients of this attempt
    new_failures: dict[str, Outcome]
    deferred: spool.Status | None  # the status to write when recipients wait; None: remove
    delay: float = 0.0
    first: Outcome | None = None
    step: int = 0  # 0 status (if refusals), 1 queue the bounce, 2 remove or defer, 3 done
    notice: str | None = field(default=None)


class _Channel:
    """One lazily opened session (the relay as a site, or the local MTA) for a batch.

    A session that cannot be opened makes every later message of the batch wait
    with the same reason, instead of knocking again for each one.
    """

    def __init__(self, opener: Callable[[], Awaitable[Session]]) -> None:
        self.opener = opener
        self.session: Session | None = None
        self.down: Outcome | None = None
        self.kept = False  # kept from an earlier lane: checked before its next message

    async def send(self, env: Envelope, message: bytes,
                   recipients: list[str]) -> dict[str, Outcome]:
        if not recipients:
            return {}
        if self.down is not None:
            return dict.fromkeys(recipients, self.down)
        if self.kept:
            self.kept = False
            if self.session is not None and not await self.session.usable():
                await self._drop()  # the relay ended it meanwhile: a new one below
        if self.session is None:
            try:
                self.session = await self.opener()
            except RelaysUnavailable as exc:
                self.down = exc.outcome
                return dict.fromkeys(recipients, exc.outcome)
        try:
            return await self.session.send(env, message, recipients)
        except (SessionBroken, OSError, TimeoutError) as exc:
            await self._drop()
            return dict.fromkeys(recipients, Outcome.network(f"connection lost: {exc}"))
        except Exception:
            # This message broke the client mid-transaction: its state is unknown, so the
            # next message gets a new session; the runner records this one's failure.
            await self._drop()
            raise

    async def _drop(self) -> None:
        broken, self.session = self.session, None
        if broken is not None:
            with contextlib.suppress(Exception):
                await broken.close()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class _Pools:
    """A lane's relay channels, one per pool (policy/relays.py): a site's messages in
    different pools never share a session.  A channel is opened for the pool's active
    relays; when that set changes (a relay burned or restored) the old session ends
    and the next message opens one on the new set."""

    def __init__(self, opener: Callable[[str, tuple[Relay, ...]], Awaitable[Session]]) -> None:
        self.opener = opener
        self.channels: dict[str, tuple[tuple[Relay, ...], _Channel]] = {}

    async def channel(self, pool: str, active: tuple[Relay, ...]) -> _Channel:
        held = self.channels.get(pool)
        if held is not None and held[0] == active:
            return held[1]
        if held is not None:
            await held[1].close()
        opener = self.opener
        channel = _Channel(lambda: opener(pool, active))
        self.channels[pool] = (active, channel)
        return channel

    def keepable(self) -> bool:
        """Ready to be kept for the site's next lane: the channels that have a live
        session stay (marked to be checked first), the others are forgotten."""
        live = {pool: held for pool, held in self.channels.items()
                if held[1].session is not None and held[1].down is None}
        self.channels = live
        for _active, channel in live.values():
            channel.kept = True
        return bool(live)

    async def close(self) -> None:
        for _active, channel in self.channels.values():
            await channel.close()


class _IdleSessions:
    """Relay sessions kept after their lane, per site, for :data:`IDLE_SESSION` seconds.

    A kept entry is a lane's :class:`_Pools` with the configuration it was opened under;
    :meth:`take` gives it only to a lane of the same site under the same configuration
    object (a reload changes logins and relays: the old ones are closed).
    """

    def __init__(self) -> None:
        self.enabled = False  # run_forever's: a lone run_once closes its sessions
        self.kept: dict[str, list[tuple[_Pools, Config, float]]] = {}
        self.closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        """Relay sessions kept (a kept lane may hold one per pool)."""
        return sum(len(pools.channels) for entries in self.kept.values()
                   for pools, _config, _deadline in entries)

    def take(self, site: str, config: Config) -> _Pools | None:
        entries = self.kept.get(site)
        found = None
        while entries and found is None:
            pools, kept_config, _deadline = entries.pop()
            if kept_config is config:
                found = pools
            else:
                self._close(pools)
        if not entries:
            self.kept.pop(site, None)
        return found

    def keep(self, site: str, config: Config, pools: _Pools, room: int) -> bool:
        """Keep ``pools`` for the site's next lane, within ``room`` sessions kept in all
        (the oldest others are closed); False when it is not kept (the caller closes it)."""
        if not self.enabled or room <= 0 or not pools.keepable():
            return False
        loop = asyncio.get_running_loop()
        self.kept.setdefault(site, []).append((pools, config, loop.time() + IDLE_SESSION))
        self.trim(room)
        loop.call_later(IDLE_SESSION, self.expire)
        return True

    def trim(self, room: int) -> list[asyncio.Task[None]]:
        """Close the oldest kept sessions until at most ``room`` remain: kept sessions and
        lanes together stay within :data:`MAX_SESSIONS`.  The closing tasks."""
        tasks = []
        while self.kept and len(self) > max(0, room):
            oldest = min(self.kept, key=lambda s: self.kept[s][0][2])
            tasks.append(self._close(self.kept[oldest].pop(0)[0]))
            if not self.kept[oldest]:
                del self.kept[oldest]
        return tasks

    async def make_room(self, room: int) -> None:
        """Trim to ``room`` and wait for those sessions to end (at most CLOSE_WAIT): a new
        session opens only after the kept ones it replaces are gone."""
        tasks = self.trim(room)
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT)

    def expire(self) -> None:
        """Close the sessions unused for :data:`IDLE_SESSION` seconds (a timer may fire a
        little early: a small slack, so none is left until the next keep)."""
        now = asyncio.get_running_loop().time() + 0.05
        for site in list(self.kept):
            entries = self.kept[site]
            for entry in [e for e in entries if e[2] <= now]:
                entries.remove(entry)
                self._close(entry[0])
            if not entries:
                del self.kept[site]

    def _close(self, pools: _Pools) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(pools.close())
        self.closing.add(task)
        task.add_done_callback(self._closed)
        return task

    def _closed(self, task: asyncio.Task[None]) -> None:
        self.closing.discard(task)
        if not task.cancelled() and task.exception() is not None:  # retrieved: logged here
            log.warning("closing a kept relay session failed: %r", task.exception())

    async def close_all(self) -> None:
        """Close every kept session; QUITs a relay does not answer are cut after
        CLOSE_WAIT, so shutdown does not wait for it."""
        self.trim(0)
        if self.closing:
            _done, late = await asyncio.wait(list(self.closing), timeout=CLOSE_WAIT)
            for task in late:
                task.cancel()


_Answer = tuple[Site, int, str, float]  # site, uid, RELAY_OK or RELAY_5XX, time


class _AnswerBook:
    """The relay's answers on their way to the outbreak rules, written in groups.

    A settling thread hands in one message's answers and returns only after a group
    holding them was written (one state transaction) and the rule checked for its
    site, so a lane's next message still starts after its last answers were seen.
    One thread writes at a time; what is handed in meanwhile forms the next group
    (as ``durable.GroupSync`` does for fsyncs): under load one transaction and one
    rule check per site for many messages, instead of a write and two counts each.
    """

    def __init__(self, write: Callable[[list[_Answer]], None]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._pending: list[_Answer] = []
        self._handed = 0  # messages handed in
        self._written = 0  # messages whose group was written (or failed)
        self._writing = False

    def record(self, answers: list[_Answer]) -> None:
        with self._cond:
            self._pending.extend(answers)
            self._handed += 1
            mine = self._handed
            while self._written < mine:
                if self._writing:
                    self._cond.wait()
                    continue
                group, self._pending, upto = self._pending, [], self._handed
                self._writing = True
                self._cond.release()
                try:
                    self._write(group)
                finally:
                    self._cond.acquire()
                    self._writing = False
                    self._written = upto
                    self._cond.notify_all()


class _Schedule:
    """Deferred messages by their next attempt: the runner's in-memory index.

    Built once from ``deferred/`` in the background at start, then fed by the
    runner's own deferrals, so an idle runner reads nothing.  A heap of ints
    (the time in milliseconds above the 64-bit queue id: about 50 bytes a
    message, 5 MB for 100,000).  An entry is a hint, checked against the
    message's status when it comes due: one that is stale (rescheduled since)
    or gone (delivered, held, deleted) costs one read and is dropped.  Thread
    safe (the runner's disk work runs in threads).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heap: list[int] = []

    def __len__(self) -> int:
        return len(self._heap)

    def put(self, queue_id: str, when: float) -> None:
        key = (max(0, math.ceil(when * 1000)) << 64) | int(queue_id, 16)
        with self._lock:
            heapq.heappush(self._heap, key)

    def take_due(self, now: float, most: int) -> list[str]:
        """Remove and return up to ``most`` queue ids due at ``now`` (earliest first)."""
        limit = (math.floor(now * 1000) + 1) << 64
        out: list[str] = []
        with self._lock:
            while self._heap and self._heap[0] < limit and len(out) < most:
                out.append(f"{heapq.heappop(self._heap) & _ID_MASK:016X}")
        return out

    def clear(self) -> None:
        with self._lock:
            self._heap.clear()

    def next_time(self) -> float | None:
        """When the earliest deferred message is due; None when nothing is deferred."""
        with self._lock:
            return (self._heap[0] >> 64) / 1000 if self._heap else None


@dataclass
class _Run:
    """One queue run: per-site work queues served round-robin by sessions ("lanes")."""

    queues: dict[str, deque[tuple[str, str]]] = field(default_factory=dict)
    order: deque[str] = field(default_factory=deque)  # sites, least recently served first
    lanes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    taken: int = 0  # messages taken into this run

    def add(self, due: dict[str, list[tuple[str, str]]]) -> None:
        for site, items in due.items():
            if site not in self.queues:
                self.queues[site] = deque()
                self.order.append(site)
            self.queues[site].extend(items)
            self.taken += len(items)

    def queued(self) -> int:
        """Messages taken into the run and not yet in a session's hands."""
        return sum(map(len, self.queues.values()))

    def active_sites(self) -> int:
        return sum(1 for n in self.lanes.values() if n)

    def full(self) -> bool:
        return len(self.tasks) >= MAX_SESSIONS or self.active_sites() >= MAX_PARALLEL_SITES

    def waiting(self, besides: str) -> bool:
        """Another site has mail queued in this run and no session."""
        return any(q and not self.lanes[s] for s, q in self.queues.items() if s != besides)


@dataclass
class FlushScope:
    """What a flush retries: the deferred mail of these pools and of these uids."""

    pools: set[str] = field(default_factory=set)
    uids: set[int] = field(default_factory=set)


class QueueRunner:
    def __init__(self, config: Config, state: State) -> None:
        self.config = config
        loopback.configure(config)  # whose servers on local addresses are trusted
        self.state = state
        # DNS routing matters only where there is somewhere local to deliver to.
        self.router = Router(config) if config.local_transport is not None else None
        self.scanner = Scanner(config, state)  # content scoring (scan.py), if scan.enabled
        self.dkim = Signer(config)  # the relay road's DKIM signatures (dkim.py)
        self.wake = asyncio.Event()
        self._poked = asyncio.Event()  # an arrival during a run: look at incoming/ again
        self._force = False
        self._force_only: FlushScope | None = None  # a flush of these only; None: all
        self._flush_only: FlushScope | None = None  # the flush under way
        self.relay_stats = RelayStats()  # each relay's answers, for relay list
        self._answers = _AnswerBook(self._feed_outbreak_rules)  # for relay_5xx_share
        self._idle = _IdleSessions()  # relay sessions kept between a site's lanes
        self._lock = asyncio.Lock()
        self._unsaved: list[_Attempt] = []  # outcomes the disk refused: delivery is paused
        self._stopping = False  # read by the _due thread too: a plain flag is enough
        self._schedule = _Schedule()
        self._indexed = False  # the schedule holds every deferred message
        self._index_task: asyncio.Task[None] | None = None
        self._taken: set[str] = set()  # queue ids taken into the current run
        self._sites: dict[str, str] = {}  # incoming queue id -> site, read during this run
        self._flushing: deque[str] = deque()  # a flush's deferred messages not yet taken
        self._more = False  # incoming/ held more than one run takes

    def stop(self) -> None:
        """Finish the message in hand, start no other; run_forever then returns."""
        self._stopping = True
        self.wake.set()
        self._poked.set()

    def reconfigure(self, config: Config) -> None:
        """A reloaded configuration: new sites, relays and routing from the next run on."""
        self.config = config
        loopback.configure(config)
        self.router = Router(config) if config.local_transport is not None else None
        self.scanner.reconfigure(config)
        self.dkim.reconfigure(config)
        self._idle.trim(0)  # kept sessions: logins and relays may have changed

    def poke(self, force: bool = False, pool: str | None = None,
             uid: int | None = None) -> None:
        """Run soon; ``force`` also retries deferred mail before its time (flush): all of
        it, or with ``pool`` only the mail of that pool (after a relay burn or restore),
        with ``uid`` only that uid's (a site's flush)."""
        if force:
            if pool is None and uid is None:
                self._force_only = None
            else:
                if not self._force:
                    self._force_only = FlushScope()
                if self._force_only is not None:  # None: everything is flushed anyway
                    if pool is not None:
                        self._force_only.pools.add(pool)
                    if uid is not None:
                        self._force_only.uids.add(uid)
        self._force = self._force or force
        self.wake.set()
        self._poked.set()

    async def run_forever(self) -> None:
        # The schedule is built in the background: start-up and new mail do not wait for it.
        self._index_task = asyncio.create_task(asyncio.to_thread(self._load_schedule))
        self._idle.enabled = True
        try:
            await self._run_forever()
        finally:
            self._idle.enabled = False
            await self._idle.close_all()

    async def _run_forever(self) -> None:
        while not self._stopping:
            try:
                await self.run_once()
            except Exception:
                log.exception("queue run failed; retrying after the scan interval")
            if self._stopping:
                break
            timeout = self.config.queue_scan_interval
            upcoming = self._schedule.next_time()
            if upcoming is not None:
                timeout = max(0.0, min(timeout, upcoming - time.time()))
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                pass
        if self._index_task is not None:
            await asyncio.gather(self._index_task, return_exceptions=True)

    async def run_once(self) -> int:
        """Deliver every due message once; the number taken into the run."""
        async with self._lock:
            self.wake.clear()
            self._poked.clear()
            if self._unsaved and not await asyncio.to_thread(self._retry_unsaved):
                return 0  # still cannot record what was sent: send nothing more
            force, self._force = self._force, False
            only, self._force_only = self._force_only, None
            if force:
                self._flush_only = only
            await self._await_schedule(force)
            run = _Run()
            try:
                # Disk work (reads, fsyncs) runs in a thread: the loop keeps taking submissions.
                run.add(await asyncio.to_thread(self._due, force, frozenset()))
                await self._serve(run)
            finally:
                self._requeue_leftovers(run)
                self._taken.clear()
                self._sites.clear()
            if (self._more or self._flushing) and not self._stopping:
                self._more = False
                self.wake.set()  # the rest of a long queue: the next run follows at once
            return run.taken

    async def _await_schedule(self, force: bool) -> None:
        """The deferred index: built here when no background build runs (tests, first run)."""
        if self._indexed:
            return
        if self._index_task is None:
            await asyncio.to_thread(self._load_schedule)
        elif force:  # a flush means all of them: wait for the whole list
            await asyncio.gather(self._index_task, return_exceptions=True)

    def _load_schedule(self) -> None:
        """Read ``deferred/`` once: each message's next attempt (in a thread)."""
        layout = self.config.layout
        for queue_id in spool.queue_ids(layout, spool.DEFERRED):
            if self._stopping:
                return
            if queue_id in self._taken:
                continue
            self._schedule.put(queue_id, spool.read_status(layout, queue_id).next_attempt)
        self._indexed = True
        log.info("queue schedule ready: %d deferred", len(self._schedule))

    async def _serve(self, run: _Run) -> None:
        """Start sessions for the queued sites, refill on arrivals, until all is served."""
        loop = asyncio.get_running_loop()
        last_refill = loop.time()
        refill_at: float | None = None
        flushed: asyncio.Future[dict[str, list[tuple[str, str]]]] | None = None
        while True:
            self._start_lanes(run)
            if (flushed is None and self._flushing and not self._stopping
                    and not self._unsaved and run.taken < RUN_CHUNK
                    and run.queued() < FLUSH_STEP):
                # The flush's next step is read while the sessions deliver the last one.
                flushed = asyncio.ensure_future(asyncio.to_thread(
                    self._more_flushed, min(FLUSH_STEP, RUN_CHUNK - run.taken)))
            if not run.tasks and flushed is None:
                return
            waits: set[asyncio.Future[Any]] = set(run.tasks)
            if flushed is not None:
                waits.add(flushed)
            poked: asyncio.Future[Any] | None = None
            if refill_at is None:
                poked = asyncio.ensure_future(self._poked.wait())
                waits.add(poked)
            timeout = None if refill_at is None else max(0.0, refill_at - loop.time())
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if poked is not None:
                poked.cancel()
            if flushed is not None and flushed.done():
                try:
                    run.add(flushed.result())
                except Exception:  # the lanes under way go on; the rest waits for its time
                    log.exception("flush step failed; the messages not taken yet are tried "
                                  "at their scheduled time (or flush again)")
                flushed = None
            if refill_at is None and self._poked.is_set():
                refill_at = max(loop.time(), last_refill + REFILL_EVERY)
            if refill_at is not None and loop.time() >= refill_at:
                self._poked.clear()
                refill_at, last_refill = None, loop.time()
                if not self._stopping and not self._unsaved:
                    # Sites already in this run take their new mail in the next one: it
                    # queues behind their backlog anyway.  Another site's starts now.
                    run.add(await asyncio.to_thread(self._due, False, frozenset(run.queues)))

    def _start_lanes(self, run: _Run) -> None:
        """Sessions for sites without one (round-robin), then more for long queues."""
        if self._stopping or self._unsaved:
            return
        per_site = min((r.sessions for r in self.config.relays), default=1)
        for site in list(run.order):
            if run.full():
                break
            if run.queues[site] and not run.lanes[site]:
                self._start_lane(run, site)
        for site in list(run.order):
            queue = run.queues[site]
            while (queue and 0 < run.lanes[site] < per_site and len(run.tasks) < MAX_SESSIONS
                   and len(queue) > run.lanes[site] * LANE_BATCH and not run.waiting(site)):
                self._start_lane(run, site)

    def _start_lane(self, run: _Run, site: str) -> None:
        run.lanes[site] += 1
        run.order.remove(site)
        run.order.append(site)
        task = asyncio.create_task(self._lane(run, site))
        run.tasks.add(task)
        task.add_done_callback(run.tasks.discard)

    def _requeue_leftovers(self, run: _Run) -> None:
        """Messages not attempted (shutdown, pause): deferred ones are due in the next run."""
        now = time.time()
        for queue in run.queues.values():
            for state, queue_id in queue:
                if state == spool.DEFERRED:
                    self._schedule.put(queue_id, now)
            queue.clear()

    @property
    def paused(self) -> bool:
        """True while an attempt's outcome could not be written (delivery stops)."""
        return bool(self._unsaved)

    def _retry_unsaved(self) -> bool:
        """Write the outcomes that failed before; True when all of them are on disk now."""
        while self._unsaved:
            attempt = self._unsaved[0]
            try:
                self._persist(attempt)
            except OSError:
                return False
            self._unsaved.pop(0)
            log.info("resumed queue_id=%s site=%s: its delivery is recorded; delivery "
                     "continues", attempt.queue_id, attempt.env.site)
        return True

    def _due(self, force: bool, skip: frozenset[str]) -> dict[str, list[tuple[str, str]]]:
        """Due messages by site (in a thread), at most :data:`RUN_CHUNK`: new ones in
        ``incoming/``, deferred ones whose time came (all of them after a flush,
        ``force``); none of the sites in ``skip`` (a look during a run).

        ``incoming/`` is listed (its names only: it holds what arrived since the last
        run); deferred messages come from the schedule, never from a scan, except
        that a flush lists ``deferred/`` once and is worked off chunk by chunk: a
        run takes its first :data:`FLUSH_STEP` here, and :meth:`_serve` reads the next
        step while the sessions deliver (they start without waiting for all).
        What does not fit in this run is left for the next, which follows at once.
        """
        layout = self.config.layout
        now = time.time()
        due: dict[str, list[tuple[str, str]]] = defaultdict(list)
        room = RUN_CHUNK
        for queue_id in spool.queue_ids(layout, spool.INCOMING):
            if self._stopping:
                return due
            if not room:
                self._more = True
                break
            if queue_id in self._taken:
                continue
            site = self._sites.get(queue_id) or self._site_of(spool.INCOMING, queue_id)
            if site is None:
                continue
            if site in skip:
                self._sites[queue_id] = site
                continue
            self._taken.add(queue_id)
            due[site].append((spool.INCOMING, queue_id))
            room -= 1
        if force:  # a flush: every deferred message, whatever the schedule says
            self._schedule.clear()
            self._flushing = deque(spool.queue_ids(layout, spool.DEFERRED))
        if not skip:  # the flush's first step; _serve takes the next ones while it delivers
            room -= self._take_flushed(due, min(room, FLUSH_STEP))
        for queue_id in self._schedule.take_due(now, room):
            if queue_id in self._taken:
                continue
            if self._stopping:
                self._schedule.put(queue_id, now)
                continue
            when = spool.read_status(layout, queue_id).next_attempt
            if when > now:  # rescheduled since this entry was made
                self._schedule.put(queue_id, when)
                continue
            site = self._site_of(spool.DEFERRED, queue_id)
            if site is None:
                continue
            if site in skip:
                self._schedule.put(queue_id, now)
                continue
            self._taken.add(queue_id)
            due[site].append((spool.DEFERRED, queue_id))
        return due

    def _take_flushed(self, due: dict[str, list[tuple[str, str]]], most: int) -> int:
        """Up to ``most`` of a flush's deferred messages into ``due`` (in a thread); how
        many were looked at.  A pool's or a uid's flush leaves the other mail to its time."""
        layout = self.config.layout
        looked = 0
        scope = self._flush_only
        while self._flushing and looked < most and not self._stopping:
            queue_id = self._flushing.popleft()
            looked += 1
            if queue_id in self._taken:
                continue
            env = self._envelope_of(spool.DEFERRED, queue_id)
            if env is None:
                continue
            site = env.site
            if scope is not None and env.uid not in scope.uids:
                status = spool.read_status(layout, queue_id)
                pool, _why = choose_pool(self.config, site, status.score,
                                         unscored_pool(self.config))
                if pool not in scope.pools:  # not this flush's: it keeps its time
                    self._schedule.put(queue_id, status.next_attempt)
                    continue
            self._taken.add(queue_id)
            due[site].append((spool.DEFERRED, queue_id))
        return looked

    def _more_flushed(self, most: int) -> dict[str, list[tuple[str, str]]]:
        """The flush's next step for a run under way (in a thread)."""
        due: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self._take_flushed(due, most)
        return due

    def _site_of(self, state: str, queue_id: str) -> str | None:
        """The site of a queued message; None when it is gone or corrupt (moved aside)."""
        env = self._envelope_of(state, queue_id)
        return None if env is None else env.site

    def _envelope_of(self, state: str, queue_id: str) -> Envelope | None:
        """A queued message's envelope; None when it is gone or corrupt (moved aside)."""
        try:
            return spool.read_envelope(self.config.layout, state, queue_id)
        except FileNotFoundError:
            return None  # delivered, held or deleted meanwhile
        except (OSError, ValueError) as exc:
            self._corrupt(queue_id, state, str(exc))
            return None

    def _corrupt(self, queue_id: str, state: str, why: str) -> None:
        log.error("corrupt queue_id=%s state=%s reason=%r action='moved to corrupt/; "
                  "inspect it with sendmail-shim-admin queue show'", queue_id, state, why)
        try:
            spool.move(self.config.layout, queue_id, state, spool.CORRUPT)
        except OSError:
            pass

    def _hold(self, site_name: str, items: list[tuple[str, str]]) -> None:
        """A suspended site's queued mail goes to hold: nothing leaves (in a thread)."""
        for state, queue_id in items:
            with contextlib.suppress(FileNotFoundError):
                spool.move(self.config.layout, queue_id, state, spool.HOLD)
                log.warning("held queue_id=%s site=%s reason=suspended", queue_id,
                            printable(site_name))

    async def _lane(self, run: _Run, site_name: str) -> None:
        """One session of a site: its queued messages in order, until the queue is
        empty, shutdown, a pause, or a waiting site needs the slot (then it gives way)."""
        queue = run.queues[site_name]
        try:
            await self._deliver_site(run, site_name, queue)
        except Exception:
            log.exception("site run failed site=%s; the other sites go on, this one is "
                          "retried in the next run", printable(site_name))
        finally:
            run.lanes[site_name] -= 1

    async def _deliver_site(self, run: _Run, site_name: str,
                            queue: deque[tuple[str, str]]) -> None:
        site = self.config.site_named(site_name)
        if site is not None and self.state.suspension(site_name) is not None:
            # Suspended while queued (or by a rule just now): nothing leaves; hold it all.
            items = list(queue)
            queue.clear()
            await asyncio.to_thread(self._hold, site_name, items)
            return
        if site is None:
            while queue and not self._stopping and not self._unsaved:
                state, queue_id = queue.popleft()
                await self._record(state, queue_id, None, {}, Outcome.network(
                    f"site {printable(site_name)} is no longer in the configuration; add it back "
                    "or delete the message"))
            return
        config = self.config
        login = site.relay_login

        async def opener(pool: str, active: tuple[Relay, ...]) -> Session:
            if not active and any(r.pool == pool for r in config.relays):
                raise RelaysUnavailable(Outcome.network(
                    f"pool {pool} has no active relay (every relay of it is burned): the mail "
                    "waits; see 'sendmail-shim-admin relay list', then 'relay restore NAME'"))
            if not active and config.relays:
                raise RelaysUnavailable(Outcome.network(
                    f"pool {pool} has no relays (no relay names it in relays[].pool): the "
                    "mail waits; add a relay to the pool"))
            session = await open_session(active, login, config.hostname, site_name)
            session.wire = self.dkim.wire  # DKIM, per message and relay (dkim.py)
            return session

        relay = self._idle.take(site_name, config)
        if relay is None:  # a new session: kept ones give way so that all stay within bounds
            relay = _Pools(opener)
            await self._idle.make_room(MAX_SESSIONS - sum(run.lanes.values()))
        transport = config.local_transport
        local = _Channel(lambda: open_local_session(transport, config.hostname)) \
            if transport is not None else None
        kept = False
        try:
            await self._serve_site(run, site, queue, relay, local)
            kept = not self._stopping and self.config is config and self._idle.keep(
                site_name, config, relay, MAX_SESSIONS - (sum(run.lanes.values()) - 1))
        finally:
            if not kept:
                await relay.close()
            if local is not None:
                await local.close()

    async def _serve_site(self, run: _Run, site: Site, queue: deque[tuple[str, str]],
                          relay: _Pools, local: _Channel | None) -> None:
        """A lane's messages over its channels, until one of the ends _lane names."""
        site_name = site.name
        served = 0
        while queue:
            if self._stopping:
                return  # shutdown: the message in hand was recorded, the rest waits
            if self._unsaved:
                return  # paused: what was sent is not recorded yet
            if served and run.full() and run.waiting(site_name) and (
                    run.lanes[site_name] > 1 or served >= LANE_TURN):
                run.order.remove(site_name)  # behind the waiting site(s) now
                run.order.append(site_name)
                return  # give way to a site that waits for a session
            state, queue_id = queue.popleft()
            try:
                await self._deliver_one(site, state, queue_id, relay, local)
            except Exception as exc:  # this message's trouble, not the run's
                await asyncio.to_thread(self._internal_failure, state, queue_id,
                                        site_name, exc)
            served += 1
            if self.state.suspension(site_name) is not None:
                return  # an outbreak rule tripped: the next lane holds the rest

    async def _deliver_one(self, site: Site, state: str, queue_id: str, pools: _Pools,
                           local: _Channel | None) -> None:
        """One attempt for one message: read, route, send, record."""
        try:
            env, message = spool.read_entry(self.config.layout, state, queue_id)
            status = spool.read_status(self.config.layout, queue_id)  # a missing one is new
        except FileNotFoundError:
            return  # held or deleted by the operator meanwhile
        except (OSError, ValueError) as exc:  # also a status that cannot be read as a file
            self._corrupt(queue_id, state, str(exc))
            return
        config = self.config
        if config.scan.enabled:  # content score first (scan.py): hold, defer or go on
            verdict = await self.scanner.check(site, state, queue_id, env, message, status)
            if verdict.trouble is not None:
                await self._record(state, queue_id, (env, message), {}, verdict.trouble, status)
            if not verdict.deliver:
                return
        # The score (or its absence: scan.unscored_pool) picks the pool.
        pool, why = choose_pool(config, site.name, status.score, unscored_pool(config))
        if is_hold(config, pool):
            await asyncio.to_thread(self._hold_for_pool, state, queue_id, site.name, pool, why)
            return
        pending = [r for r in env.recipients if r not in status.done and r not in status.failed]
        results, to_relay, to_local = await self._route(pending)
        if to_relay:
            relay = await pools.channel(pool, active_relays(config, self.state.relay_marks(),
                                                            pool))
            results.update(await relay.send(env, message, to_relay))
        if local is not None:
            results.update(await local.send(env, message, to_local))
        relayed = {r: results[r] for r in to_relay}
        self.relay_stats.note(list(relayed.values()))

        def settle() -> bool:  # in a thread: the loop never waits on the state or the disk
            queued_bounce = self._after_attempt(state, queue_id, (env, message), results, None,
                                                status)
            self._watch_relay_answers(site, env, relayed)
            return queued_bounce

        if await asyncio.to_thread(settle):
            self.poke()  # a bounce was queued: deliver it in the next run

    def _hold_for_pool(self, state: str, queue_id: str, site_name: str, pool: str,
                       why: str) -> None:
        """A message routed to a hold-only pool goes to hold for the operator (in a thread)."""
        try:
            spool.move(self.config.layout, queue_id, state, spool.HOLD)
        except FileNotFoundError:
            return  # held or deleted by the operator meanwhile
        log.warning("held queue_id=%s site=%s pool=%s reason=%r action='pool %s is hold-only: "
                    "inspect it with sendmail-shim-admin queue show %s, then queue delete "
                    "it, or route it to a sending pool (sites.pool, pools:) and queue "
                    "release it'", queue_id, printable(site_name), pool, why, pool, queue_id,
                    )

    async def _record(self, state: str, queue_id: str, entry: tuple[Envelope, bytes] | None,
                      results: dict[str, Outcome], trouble: Outcome | None,
                      status: spool.Status | None = None) -> None:
        if await asyncio.to_thread(self._after_attempt, state, queue_id, entry, results,
                                   trouble, status):
            self.poke()  # a bounce was queued: deliver it in the next run

    def _internal_failure(self, state: str, queue_id: str, site_name: str,
                          exc: Exception) -> None:
        """Defer (or, after repeated failures, hold) one message that broke (in a thread)."""
        layout = self.config.layout
        reason = f"internal error: {exc.__class__.__name__}: {printable(str(exc))}"
        try:
            status = spool.read_status(layout, queue_id)
            status.internal_failures += 1
            status.attempts += 1
            status.last_error = reason
            delay = backoff(self.config, status.attempts)
            status.next_attempt = time.time() + delay
            hold = status.internal_failures >= MAX_INTERNAL_FAILURES
            target = spool.HOLD if hold else spool.DEFERRED
            spool.write_status(layout, queue_id, status)
            if state != target:
                spool.move(layout, queue_id, state, target)
        except FileNotFoundError:
            log.info("moved_meanwhile queue_id=%s site=%s", queue_id, printable(site_name))
            return
        except Exception:
            if state == spool.DEFERRED:  # still there: try it again after the backoff
                self._schedule.put(queue_id, time.time() + backoff(self.config, 1))
            log.exception("internal_error queue_id=%s site=%s reason=%r action='could not "
                          "record the failure either; it is retried in the next run: see "
                          "the traceback'", queue_id, printable(site_name), reason)
            return
        if not hold:
            self._schedule.put(queue_id, status.next_attempt)
        if hold:
            action = (f"held after {status.internal_failures} internal failures: inspect it "
                      f"with 'sendmail-shim-admin queue show {queue_id}', then 'queue release "
                      f"{queue_id}' once fixed or 'queue delete {queue_id}'")
        else:
            action = (f"deferred, retried in {int(delay)}s; held after "
                      f"{MAX_INTERNAL_FAILURES} such failures in a row")
        log.error("internal_error queue_id=%s site=%s attempts=%d reason=%r action=%r",
                  queue_id, printable(site_name), status.attempts, reason, action,
                  exc_info=exc)

    async def _route(self, recipients: list[str]
                     ) -> tuple[dict[str, Outcome], list[str], list[str]]:
        """Outcomes decided by routing (DNS failures), recipients for the relay, for local."""
        if self.router is None:
            return {}, list(recipients), []
        decided: dict[str, Outcome] = {}
        to_relay: list[str] = []
        to_local: list[str] = []
        for rcpt in recipients:
            route = await self.router.route(rcpt.rsplit("@", 1)[-1])
            if route.kind == LOCAL:
                to_local.append(rcpt)
            elif route.kind == REMOTE:
                to_relay.append(rcpt)
            elif route.kind == FAIL:
                decided[rcpt] = Outcome(PERM, 0, route.reason)
            else:
                decided[rcpt] = Outcome.network(route.reason)
        return decided, to_relay, to_local

    def _watch_relay_answers(self, site: Site, env: Envelope,
                             results: dict[str, Outcome]) -> None:
        """Feed the relay's answers to the outbreak rules (relay_5xx_share), in groups."""
        if env.origin in ("bounce", "notice"):
            return
        now = time.time()
        answers = [(site, env.uid, RELAY_OK if out.kind == OK else RELAY_5XX, now)
                   for out in results.values()
                   if out.kind == OK or (out.kind == PERM and out.code >= 500)]
        if answers:
            self._answers.record(answers)

    def _feed_outbreak_rules(self, group: list[_Answer]) -> None:
        """Write one group of answers in one state transaction, then check the rule once
        for each site in it (in the thread of one settling message, _AnswerBook)."""
        sites = {site.name: site for site, _uid, _kind, _ts in group}
        try:
            with self.state.transaction():
                for site, uid, kind, ts in group:
                    self.state.record(site.name, uid, kind, ts=ts)
        except (sqlite3.Error, OSError) as exc:
            log.warning("outbreak_rules_skipped sites=%s answers=%d reason=%r action='the state "
                        "database cannot be written; free space on the spool disk'",
                        ",".join(map(printable, sites)), len(group), str(exc))
            return
        now = time.time()
        for site in sites.values():  # one site's trouble is not another's
            try:
                reason = outbreak.after_relay_results(self.state, site, now)
                if reason is not None:
                    suspend_site(self.config, self.state, site.name, reason, "outbreak rule")
            except Exception:
                log.exception("outbreak rule relay_5xx_share not checked site=%s; its answers "
                              "are counted, the next ones check it again", printable(site.name))

    def _after_attempt(self, state: str, queue_id: str, entry: tuple[Envelope, bytes] | None,
                       results: dict[str, Outcome], trouble: Outcome | None,
                       status: spool.Status | None = None) -> bool:
        """Record one attempt: status, bounces, removal or deferral (runs in a thread).

        True when it queued a bounce, which the caller's loop should deliver soon.
        """
        layout = self.config.layout
        if entry is None:
            try:
                entry = spool.read_entry(layout, state, queue_id)
            except (OSError, ValueError) as exc:
                self._corrupt(queue_id, state, str(exc))
                return False
        env, message = entry
        site, sender = printable(env.site), printable(env.sender)  # one log line each
        if status is None:
            status = spool.read_status(layout, queue_id)
        pending = [r for r in env.recipients if r not in status.done and r not in status.failed]
        if trouble is not None:
            results = dict.fromkeys(pending, trouble)
        now = time.time()
        new_failures: dict[str, Outcome] = {}
        temp: dict[str, Outcome] = {}
        for rcpt in pending:
            out = results.get(rcpt) or Outcome.network("no result for this recipient")
            if out.kind == OK:
                status.done.append(rcpt)
                log.info("delivered queue_id=%s site=%s uid=%d rcpt=<%s> relay=%s status=%d "
                         "reply=%r", queue_id, site, env.uid, printable(rcpt), out.relay,
                         out.code, out.text)
            elif out.kind == PERM:
                new_failures[rcpt] = out
            else:
                temp[rcpt] = out
        if temp and now - env.arrival > self.config.retry.lifetime:
            days = self.config.retry.lifetime / 86400
            for rcpt, out in temp.items():
                new_failures[rcpt] = Outcome(PERM, 0, f"message expired after {days:g} days "
                                             f"in the queue; last error: {out.describe()}",
                                             out.relay)
            temp = {}
        for rcpt, out in new_failures.items():
            status.failed[rcpt] = out.describe()
            log.warning("bounced queue_id=%s site=%s uid=%d sender=<%s> rcpt=<%s> relay=%s "
                        "status=%d reply=%r", queue_id, site, env.uid, sender, printable(rcpt),
                        out.relay, out.code, out.text)
        status.delayed = {r: o.describe() for r, o in temp.items()}
        status.internal_failures = 0  # this attempt ran to its end
        attempt = _Attempt(state, queue_id, env, message, status, new_failures, None)
        if temp:
            attempt.deferred = replace(status, attempts=status.attempts + 1)
            attempt.delay = backoff(self.config, attempt.deferred.attempts)
            attempt.first = next(iter(temp.values()))
            attempt.deferred.next_attempt = now + attempt.delay
            attempt.deferred.last_error = attempt.first.describe()
        try:
            self._persist(attempt)
        except OSError as exc:
            self._unsaved.append(attempt)
            log.error("paused queue_id=%s site=%s reason=%r action='cannot record the outcome "
                      "of this attempt (free space on the disk holding %s); delivery stops and "
                      "nothing is sent again until it is written'", queue_id, printable(env.site),
                      str(exc), layout.root)
        return attempt.notice is not None

    def _persist(self, attempt: _Attempt) -> None:
        """Status (with failures), the bounce, then removal or deferral; resumable after
        OSError.  A message whose recipients were all delivered writes nothing: it is
        removed (a crash first means one more delivery, never a loss)."""
        layout = self.config.layout
        queue_id, env, status = attempt.queue_id, attempt.env, attempt.status
        if attempt.step == 0:
            if attempt.new_failures:
                # Failures are on disk before their bounce is queued: never two bounces.
                spool.write_status(layout, queue_id, status)
            attempt.step = 1
        if attempt.step == 1:
            if attempt.new_failures:
                attempt.notice = bounce.queue_bounce(self.config, env, attempt.message,
                                                     attempt.new_failures)
                if attempt.notice:
                    log.info("bounce_queued queue_id=%s bounce_of=%s to=<%s>", attempt.notice,
                             queue_id, printable(env.sender))
            attempt.step = 2
        if attempt.step == 2:
            if attempt.deferred is None:
                try:
                    spool.remove_delivered(layout, queue_id, attempt.state)
                except FileNotFoundError:
                    # Held by the operator meanwhile; its status says it is done.
                    log.info("moved_meanwhile queue_id=%s site=%s", queue_id, printable(env.site))
                else:
                    log.info("removed queue_id=%s site=%s delivered=%d bounced=%d", queue_id,
                             printable(env.site), len(status.done), len(status.failed))
            else:
                deferred, first = attempt.deferred, attempt.first
                assert first is not None
                spool.write_status(layout, queue_id, deferred)
                if attempt.state == spool.INCOMING:
                    with contextlib.suppress(FileNotFoundError):  # held meanwhile
                        spool.move(layout, queue_id, spool.INCOMING, spool.DEFERRED)
                self._schedule.put(queue_id, deferred.next_attempt)
                log.warning("deferred queue_id=%s site=%s uid=%d nrcpt=%d attempts=%d "
                            "retry_in=%ds relay=%s reason=%r", queue_id, printable(env.site),
                            env.uid, len(status.delayed), deferred.attempts,
                            int(attempt.delay),
                            first.relay, first.describe())
            attempt.step = 3
