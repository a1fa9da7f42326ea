"""The queue runner: picks due messages, delivers them per site, retries, bounces.

Trusts: queue files (the daemon wrote them) but re-validates them on read; a
file that does not parse moves to ``corrupt/`` and is never delivered.
Its parts, one concern each: ``lanes`` (a run's per-site queues and the fairness
bounds), ``channels`` (a lane's sessions, one per pool), ``keptsessions`` (sessions
kept between a site's lanes), ``record`` (an attempt's outcome to disk, backoff),
``removal`` (delivered messages unlinked in the background), ``answerbook`` (the
relay's answers to the outbreak rules in groups) and ``schedule`` (the deferred
index).  Guarantees:

* a message leaves the spool only when every recipient has a final outcome
  (delivered or bounced); outcomes, bounces and deferrals are written as
  record.py says, removals as removal.py says (a message being removed is
  never taken again); bookkeeping that fails (a full disk) pauses delivery
  until it is written, and nothing is sent twice because of it;
* temporary trouble (4xx, network, TLS, AUTH) waits with exponential backoff
  and jitter (``retry.initial`` doubling up to ``retry.maximum``); after
  ``retry.lifetime`` in the queue the remaining recipients are bounced;
* permanent refusals (5xx) are bounced at once (bounce.py), never for the
  null sender;
* scheduling without rescans: deferred messages are kept in memory by next
  attempt (:class:`Schedule`, read once from ``deferred/`` in the background
  at start, then fed by the runner's own deferrals); new mail is announced by
  :meth:`QueueRunner.poke` and found by listing ``incoming/`` (names only).
  An idle runner with a long deferred queue reads nothing until one is due;
  a flush (``force``) lists ``deferred/`` once and takes every message in it.
  A run takes at most :data:`RUN_CHUNK` messages and the next run follows at
  once, so a long queue starts at once and costs the same per message;
* fairness (lanes.py): each site has its own work queue in a run; sites get
  sessions round-robin, at most ``MAX_PARALLEL_SITES`` sites and ``MAX_SESSIONS``
  sessions at once.  A site with a long queue opens one more session per
  ``LANE_BATCH`` waiting messages, up to the smallest ``sessions`` of the relays.
  When no slot is free and another site waits, a session ends after its message
  in hand (at once if its site holds several, else after ``LANE_TURN`` messages)
  and the waiting site gets it.  Mail that arrives during a run is looked for
  within :data:`REFILL_EVERY`: another site's joins the run; a site that still has
  mail queued in the run gets its new mail in the next run (it would queue behind
  that backlog anyway); a site whose lanes ran out of mail meanwhile waits for that
  one look (:meth:`QueueRunner._linger`, only while no other site waits for a
  session) and sends its new mail over the sessions it holds.  A burst of one
  site's single messages (PHP's mail() in a loop) is then one run over kept
  sessions, not a run, a lane and a session check per message.  The messages of
  one site are sent in queue order over its sessions, each session reused for many;
* a site's relay sessions outlive its lane by ``IDLE_SESSION`` seconds
  (keptsessions.py, Postfix's connection cache: ``smtp_connection_cache_on_demand``
  with its 2 s ``smtp_connection_cache_time_limit``): the site's next lane under the same
  configuration takes one instead of connecting and logging in again, after an RSET shows
  it still works (as Postfix checks a cached session); a session that fails the check
  is closed and a new one opened, so no message waits because of it.  Only
  :meth:`QueueRunner.run_forever` keeps sessions; at most ``MAX_SESSIONS`` are kept
  (the oldest closed first), never one whose relay was down, and all are closed on a
  reload or at shutdown;
* :meth:`QueueRunner.stop` (daemon shutdown) lets each site finish the
  message in hand, including recording its outcome, and starts no other, so
  a SIGTERM never leaves a message the relay accepted unrecorded; run_forever
  returns after the removals handed in are done (at most :data:`REMOVAL_WAIT`);
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
* the relay's answers feed the ``relay_5xx_share`` rule in groups (answerbook.py);
  a message's settling ends only after its answers were written and checked, so a
  lane never runs ahead of the rule;
* the loop does no disk writes and no state work: listings of ``incoming/`` and
  ``deferred/``, status writes, bounces, deferrals and removals run in threads; a
  message whose recipients were all delivered is recorded on the loop (log lines,
  its removal handed to removal.py's threads), with no thread hop.  The one read
  left on the loop is the message in hand's queue file and status (files written
  moments ago, in the page cache: about 30 µs, less than the hop that would move
  it; measured in docs/performance.md);
* with ``scan.enabled``, a message is scored by spamd before its first attempt
  (scan.py): held above the maximum, deferred or sent unscored when spamd is
  down (``scan.on_failure``), never scored twice; its score then picks the pool;
* one message's failure is that message's alone: any exception while reading,
  routing, sending or recording one message is caught, the message is deferred
  with ``last_error`` naming the exception (and logged with its queue id, site
  and what to do next), and the run goes on with the next message.  After
  ``MAX_INTERNAL_FAILURES`` (record.py) such failures in a row the message moves
  to hold for the operator (``queue show``, then ``queue release`` or
  ``queue delete``) instead of being retried forever.  A queue file that does
  not parse moves to ``corrupt/``; one site's failing run does not stop the
  others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from sendmail_shim.config import Config, Relay, Site
from sendmail_shim.delivery import lanes, loopback
from sendmail_shim.delivery.answerbook import Answer, AnswerBook
from sendmail_shim.delivery.channels import Channel, Pools
from sendmail_shim.delivery.dkim import Signer
from sendmail_shim.delivery.keptsessions import IdleSessions
from sendmail_shim.delivery.lanes import Run
from sendmail_shim.delivery.local import Session, open_local_session
from sendmail_shim.delivery.record import Recorder
from sendmail_shim.delivery.relay import RelaysUnavailable, open_session
from sendmail_shim.delivery.route import FAIL, LOCAL, REMOTE, Router
from sendmail_shim.delivery.scan import Scanner
from sendmail_shim.delivery.schedule import Schedule
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
REFILL_EVERY = 0.2  # seconds: arrivals during a run are looked for at most this often
LINGER_SLACK = 0.05  # seconds an empty lane waits beyond REFILL_EVERY for the look it awaits
RUN_CHUNK = 5000  # messages taken into one run; the rest in the next (bounded memory)
FLUSH_STEP = 250  # a flush's messages read at once: the sessions start after the first step
REMOVAL_WAIT = 30.0  # seconds a stopping runner waits for the removals handed in

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
        self._answers = AnswerBook(self._feed_outbreak_rules)  # for relay_5xx_share
        self._idle = IdleSessions()  # relay sessions kept between a site's lanes
        self._lock = asyncio.Lock()
        self._stopping = False  # read by the _due thread too: a plain flag is enough
        self._schedule = Schedule()
        self._recorder = Recorder(config, self._schedule)  # outcomes to disk (record.py)
        self._removals = self._recorder.removals  # delivered, being unlinked (removal.py)
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
        self._recorder.config = config
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
            # Delivered messages still being removed: gone before the daemon exits (a
            # removal left undone means one more delivery after the restart).
            await asyncio.to_thread(self._removals.wait, REMOVAL_WAIT)

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
            if self._recorder.blocked and not await asyncio.to_thread(
                    self._recorder.retry_unsaved):
                return 0  # still cannot record what was sent: send nothing more
            force, self._force = self._force, False
            only, self._force_only = self._force_only, None
            if force:
                self._flush_only = only
            await self._await_schedule(force)
            run = Run()
            try:
                # Disk work (reads, fsyncs) runs in a thread: the loop keeps taking submissions.
                run.add(await asyncio.to_thread(self._due, force, frozenset()))
                await self._serve(run)
            finally:
                self._requeue_leftovers(run)
                self._taken.clear()
                self._sites.clear()
            if not self._idle.enabled:  # a lone run (no run_forever) ends with its removals
                await asyncio.to_thread(self._removals.wait, REMOVAL_WAIT)
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
            if queue_id in self._taken or queue_id in self._removals:
                continue
            self._schedule.put(queue_id, spool.read_status(layout, queue_id).next_attempt)
        self._indexed = True
        log.info("queue schedule ready: %d deferred", len(self._schedule))

    async def _serve(self, run: Run) -> None:
        """Start sessions for the queued sites, refill on arrivals, until all is served."""
        loop = asyncio.get_running_loop()
        last_refill = loop.time()
        refill_at: float | None = None
        flushed: asyncio.Future[dict[str, list[tuple[str, str]]]] | None = None
        while True:
            self._start_lanes(run)
            if (flushed is None and self._flushing and not self._stopping
                    and not self._recorder.blocked and run.taken < RUN_CHUNK
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
                if not self._stopping and not self._recorder.blocked and \
                        run.taken < RUN_CHUNK:
                    # A site with mail still queued in this run takes its new mail in the
                    # next one: it queues behind that backlog anyway.  Another site's
                    # starts now, and so does that of a site whose lanes wait for more
                    # (_linger): a burst of one site's single messages goes on over the
                    # sessions it holds, without a new run, lane or session check each.
                    backlog = frozenset(site for site, queue in run.queues.items() if queue)
                    run.refilling = True
                    try:
                        run.add(await asyncio.to_thread(self._due, False, backlog))
                    finally:
                        run.refilling = False
                        run.arrived.set()

    def _start_lanes(self, run: Run) -> None:
        """Sessions for sites without one (round-robin), then more for long queues."""
        if self._stopping or self._recorder.blocked:
            return
        per_site = min((r.sessions for r in self.config.relays), default=1)
        for site in list(run.order):
            if run.full():
                break
            if run.queues[site] and not run.lanes[site]:
                self._start_lane(run, site)
        for site in list(run.order):
            queue = run.queues[site]
            while (queue and 0 < run.lanes[site] < per_site and len(run.tasks) < lanes.MAX_SESSIONS
                   and len(queue) > run.lanes[site] * lanes.LANE_BATCH and not run.waiting(site)):
                self._start_lane(run, site)

    def _start_lane(self, run: Run, site: str) -> None:
        run.lanes[site] += 1
        run.order.remove(site)
        run.order.append(site)
        task = asyncio.create_task(self._lane(run, site))
        run.tasks.add(task)
        task.add_done_callback(run.tasks.discard)

    def _requeue_leftovers(self, run: Run) -> None:
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
        return bool(self._recorder.blocked)


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
            if queue_id in self._taken or queue_id in self._removals:
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
            if queue_id in self._taken or queue_id in self._removals:
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
            if queue_id in self._taken or queue_id in self._removals:
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
            self._recorder.corrupt(queue_id, state, str(exc))
            return None


    def _hold(self, site_name: str, items: list[tuple[str, str]]) -> None:
        """A suspended site's queued mail goes to hold: nothing leaves (in a thread)."""
        for state, queue_id in items:
            with contextlib.suppress(FileNotFoundError):
                spool.move(self.config.layout, queue_id, state, spool.HOLD)
                log.warning("held queue_id=%s site=%s reason=suspended", queue_id,
                            printable(site_name))

    async def _lane(self, run: Run, site_name: str) -> None:
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

    async def _deliver_site(self, run: Run, site_name: str,
                            queue: deque[tuple[str, str]]) -> None:
        site = self.config.site_named(site_name)
        if site is not None and self.state.suspension(site_name) is not None:
            # Suspended while queued (or by a rule just now): nothing leaves; hold it all.
            items = list(queue)
            queue.clear()
            await asyncio.to_thread(self._hold, site_name, items)
            return
        if site is None:
            while queue and not self._stopping and not self._recorder.blocked:
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
            relay = Pools(opener)
            await self._idle.make_room(lanes.MAX_SESSIONS - sum(run.lanes.values()))
        transport = config.local_transport
        local = Channel(lambda: open_local_session(transport, config.hostname)) \
            if transport is not None else None
        kept = False
        try:
            await self._serve_site(run, site, queue, relay, local)
            kept = not self._stopping and self.config is config and self._idle.keep(
                site_name, config, relay, lanes.MAX_SESSIONS - (sum(run.lanes.values()) - 1))
        finally:
            if not kept:
                await relay.close()
            if local is not None:
                await local.close()

    async def _serve_site(self, run: Run, site: Site, queue: deque[tuple[str, str]],
                          relay: Pools, local: Channel | None) -> None:
        """A lane's messages over its channels, until one of the ends _lane names."""
        site_name = site.name
        served = 0
        while queue or await self._linger(run, site_name, queue):
            if self._stopping:
                return  # shutdown: the message in hand was recorded, the rest waits
            if self._recorder.blocked:
                return  # paused: what was sent is not recorded yet
            if served and run.full() and run.waiting(site_name) and (
                    run.lanes[site_name] > 1 or served >= lanes.LANE_TURN):
                run.order.remove(site_name)  # behind the waiting site(s) now
                run.order.append(site_name)
                return  # give way to a site that waits for a session
            state, queue_id = queue.popleft()
            try:
                await self._deliver_one(site, state, queue_id, relay, local)
            except Exception as exc:  # this message's trouble, not the run's
                await asyncio.to_thread(self._recorder.internal_failure, state, queue_id,
                                        site_name, exc)
            served += 1
            if self.state.suspension(site_name) is not None:
                return  # an outbreak rule tripped: the next lane holds the rest

    async def _linger(self, run: Run, site_name: str, queue: deque[tuple[str, str]]) -> bool:
        """An empty lane's wait for the look at ``incoming/`` that a poke started (at most
        :data:`REFILL_EVERY` and a little): True when it brought this site more mail.

        Only while the run was poked (new mail arrived), nothing stops or pauses it and
        no other site waits for a session: a lingering lane holds its slot no longer than
        one look.  Then the lane's session sends the new mail at once (Postfix's queue
        manager hands a new message to a waiting delivery agent the same way).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REFILL_EVERY + LINGER_SLACK
        while not queue:
            if self._stopping or self._recorder.blocked or run.waiting(site_name) or not (
                    self._poked.is_set() or run.refilling) or run.taken >= RUN_CHUNK:
                return False
            run.arrived.clear()
            try:
                async with asyncio.timeout_at(None if run.refilling else deadline):
                    await run.arrived.wait()  # a look under way always ends with arrived
            except TimeoutError:
                break
        if queue and run.waiting(site_name):  # the look brought a site that waits for a
            run.order.remove(site_name)  # session: it goes first, this site's mail after
            run.order.append(site_name)
            return False
        return bool(queue)

    async def _deliver_one(self, site: Site, state: str, queue_id: str, pools: Pools,
                           local: Channel | None) -> None:
        """One attempt for one message: read, route, send, record."""
        try:
            env, message = spool.read_entry(self.config.layout, state, queue_id)
            status = spool.read_status(self.config.layout, queue_id)  # a missing one is new
        except FileNotFoundError:
            return  # held or deleted by the operator meanwhile
        except (OSError, ValueError) as exc:  # also a status that cannot be read as a file
            self._recorder.corrupt(queue_id, state, str(exc))
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
        entry = (env, message)
        if all(r in results and results[r].kind == OK for r in pending):
            # Every recipient delivered: the record is log lines and a removal handed to
            # removal.py's threads, no disk work, so it is written here without a hop.
            queued_bounce = self._recorder.after_attempt(state, queue_id, entry, results, None,
                                                         status)
        else:  # status, bounce or deferral: the disk, in a thread (the loop never waits)
            queued_bounce = await asyncio.to_thread(self._recorder.after_attempt, state,
                                                    queue_id, entry, results, None, status)
        await self._watch_relay_answers(site, env, relayed)
        if queued_bounce:
            self.wake.set()  # a bounce was queued: deliver it in the next run

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
        if await asyncio.to_thread(self._recorder.after_attempt, state, queue_id, entry, results,
                                   trouble, status):
            self.wake.set()  # a bounce was queued: deliver it in the next run


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

    async def _watch_relay_answers(self, site: Site, env: Envelope,
                                   results: dict[str, Outcome]) -> None:
        """Feed the relay's answers to the outbreak rules (relay_5xx_share), in groups;
        returns once they were written and the rule checked (answerbook.py)."""
        if env.origin in ("bounce", "notice"):
            return
        now = time.time()
        answers = [(site, env.uid, RELAY_OK if out.kind == OK else RELAY_5XX, now)
                   for out in results.values()
                   if out.kind == OK or (out.kind == PERM and out.code >= 500)]
        if answers:
            await self._answers.record(answers)

    def _feed_outbreak_rules(self, group: list[Answer]) -> None:
        """Write one group of answers in one state transaction, then check the rule once
        for each site in it (in the thread of one settling message, AnswerBook)."""
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

