"""Content scoring with SpamAssassin's spamd, after the durable commit (issue 14, part 1).

The queue runner asks :meth:`Scanner.check` before a message's first delivery
attempt.  The hand-off (front end, socket, intake, commit) does not change at
all: a site's ``mail()`` never waits for a scanner, and with ``scan.enabled``
false (the default) nothing here runs.

The spamc command line and the parsing of its answer live in
``policy/content.py`` (shared with the optional ``before_ack`` mode of
intake); this module is the asynchronous scan and what follows from a score.

Client: Debian's ``spamc``, run as a process (``asyncio`` subprocess), not
aiospamc.  aiospamc would pull loguru and typer into the daemon (two more
Debian packages, typer's import alone costs more than the whole client), while
``spamc`` is one small C program from the same source package as spamd, kept in
step with it by Debian, and speaks the protocol (SPAMC/SPAMD 1.5, Unix or TCP,
``-s`` size limit, ``-t`` timeout) without any Python import.  A process per
message costs about a millisecond of fork/exec, small beside spamd's own scan,
and it is off the hand-off path.  ``spamc -c -x``: ``-c`` prints only
``score/threshold`` (``-R`` would add the report, which we do not need), and
``-x`` makes every failure an error exit instead of spamc's "safe fallback"
(which prints ``0/0`` and exits 0: a fake score of 0 that would pass spam).

Trusts: the message is hostile (it goes to spamc's stdin, never on a command
line); spamc's output is parsed strictly (:func:`parse_spamc`), anything else
is a failure.  spamd is the operator's: its score is taken as it is.
Guarantees:

* a score above ``scan.max_score`` holds the message with its reason (status
  ``last_error``), logs ``scanned ... action=hold``, tells ``admin.notify``
  (at most once per ``scan.notify_every`` per site) and counts toward the
  ``spam_score`` outbreak rule, which may suspend the site;
* a score at or below it is recorded in the status the runner goes on with
  (written to disk with any deferral; a delivered message's status goes with
  it) and logged: ``scanned queue_id=... site=... score=... action=deliver``;
* a scanned message is never scanned again: ``queue release`` of a held one
  delivers it (its status keeps ``scanned``), so the same score cannot hold it
  twice;
* spamd down, slow (``scan.timeout``) or answering nonsense: ``on_failure:
  defer`` defers the message with the queue's backoff (it is never lost, never
  crashes the runner), ``deliver`` sends it unscored (``scanned:
  unavailable``, to ``scan.unscored_pool`` once pools exist).  An outage is
  logged once (``scan_unavailable``) and its end once (``scan_available``),
  not per message; while it lasts each site probes spamd at most every
  :data:`PROBE_EVERY` seconds and its other messages fail at once.  The wait is
  per site: a failure seen with one site's message (a scan that times out on
  its content) never makes another site's mail fail unscanned or wait; that
  site tries spamd itself;
* one site's scans never delay another site's: at most one scan per site at a
  time (a lock per site), and the runner serves at most ``MAX_PARALLEL_SITES``
  sites at once, so there are never more spamc processes than that;
* a message larger than ``scan.max_size`` is scored on its first
  ``max_size`` bytes (headers and the start of the body, cut at a line end:
  ``policy.content.scanned_part``), held above the maximum like any other, and
  recorded as ``scanned: partial`` (the listing says so).  Issue 21: such mail
  used to go out unscored, so a spammer padded past the limit; scoring the
  start is what rspamd and Amavis do, spamd's cost stays bounded by
  ``max_size``, and a site's large legitimate mail (attachments) still goes out
  without waiting for the operator.  What lies past the limit is not seen;
  raise ``max_size`` to see more;
* bounces and the daemon's own notices are never scanned (a bounce quotes the
  message it returns: a GTUBE bounce would hold itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from dataclasses import dataclass

from sendmail_shim.config import Config, Site
from sendmail_shim.policy import outbreak
from sendmail_shim.policy.content import (
    KILL_GRACE,
    ScanError,
    command,
    decide,
    parse_spamc,
    scanned_part,
)
from sendmail_shim.policy.sanctions import hold_message, notify_admin_limited, suspend_site
from sendmail_shim.store import spool
from sendmail_shim.store.address import printable
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.outcome import Outcome
from sendmail_shim.store.state import State

log = logging.getLogger(__name__)

PROBE_EVERY = 5.0  # seconds: while spamd is down, one message tries it this often


@dataclass(frozen=True)
class Verdict:
    """What the runner does with a message after :meth:`Scanner.check`."""

    deliver: bool  # go on with the delivery attempt (status updated in place)
    trouble: Outcome | None = None  # not delivering and not held: defer with this


DELIVER = Verdict(True)
HELD = Verdict(False)


class Scanner:
    """spamc per message, one at a time per site, with the outage state of spamd."""

    def __init__(self, config: Config, state: State) -> None:
        self.config = config
        self.state = state
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}
        self.down_since: float | None = None  # spamd failing since (None: fine)
        self._down_reason = ""
        self._next_probe: dict[str, float] = {}  # site -> its next try while spamd is down

    def reconfigure(self, config: Config) -> None:
        self.config = config

    async def check(self, site: Site, state: str, queue_id: str, env: Envelope,
                    message: bytes, status: spool.Status) -> Verdict:
        """Scan a message not scanned yet, record the result; what the runner does next."""
        if status.scanned is not None or env.origin in ("bounce", "notice"):
            return DELIVER
        part = scanned_part(message, self.config.scan.max_size)
        try:
            score = await self._scan_as(site.name, part)
        except ScanError as exc:
            return self._failed(site, queue_id, status, str(exc))
        self._available()
        whole = len(part) == len(message)
        status.score = score
        status.scanned = spool.SCANNED_OK if whole else spool.SCANNED_PARTIAL
        action = decide(self.config, score)
        if whole:
            log.info("scanned queue_id=%s site=%s score=%.1f max_score=%g action=%s", queue_id,
                     printable(site.name), score, self.config.scan.max_score, action)
        else:
            log.info("scanned queue_id=%s site=%s score=%.1f max_score=%g action=%s "
                     "scanned_bytes=%d size=%d", queue_id, printable(site.name), score,
                     self.config.scan.max_score, action, len(part), len(message))
        await asyncio.to_thread(self._settle, site, state, queue_id, env, status, action)
        return HELD if action == "hold" else DELIVER

    async def _scan_as(self, site: str, message: bytes) -> float:
        """One scan, at most one at a time for ``site``; fails at once while spamd is down
        and no probe is due."""
        lock = self._locks.setdefault(site, asyncio.Lock())
        self._users[site] = self._users.get(site, 0) + 1
        try:
            async with lock:
                if self.down_since is not None:
                    now = time.monotonic()
                    if now < self._next_probe.get(site, 0.0):
                        raise ScanError(self._down_reason)
                    self._next_probe[site] = now + PROBE_EVERY
                return await self.scan(message)
        finally:
            self._users[site] -= 1
            if not self._users[site]:  # forget idle sites: the maps stay small
                del self._users[site]
                del self._locks[site]

    async def scan(self, message: bytes) -> float:
        """Run spamc on ``message``; its score, or :class:`ScanError`."""
        timeout = self.config.scan.timeout
        try:
            proc = await asyncio.create_subprocess_exec(
                *command(self.config), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            raise ScanError(f"cannot run {self.config.scan.spamc}: {exc.strerror}") from None
        try:
            stdout, _ = await asyncio.wait_for(proc.communicate(message), timeout + KILL_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise ScanError(f"spamc took longer than {timeout:g}s") from None
        except OSError as exc:  # spamc went away while reading (broken pipe)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise ScanError(f"spamc failed: {exc}") from None
        assert proc.returncode is not None
        return parse_spamc(proc.returncode, stdout)

    def _failed(self, site: Site, queue_id: str, status: spool.Status, why: str) -> Verdict:
        scan = self.config.scan
        where = scan.socket or f"{scan.host}:{scan.port}"
        reason = f"content scanner unavailable: {why}"
        # This site waits (a failure at once does not push its next try further away).
        self._next_probe.setdefault(site.name, time.monotonic() + PROBE_EVERY)
        if self.down_since is None:
            self.down_since = time.time()
            action = ("mail is deferred and retried with the queue's backoff" if
                      scan.on_failure == "defer" else "mail is delivered unscored")
            log.error("scan_unavailable spamd=%s reason=%r on_failure=%s action=%r", where,
                      why, scan.on_failure, f"{action}; check spamd (systemctl status spamd, "
                      "its log) and that the daemon's user may connect to it; this is "
                      "logged once per outage")
        self._down_reason = why
        if scan.on_failure == "deliver":
            status.scanned = spool.SCANNED_UNAVAILABLE
            log.info("scan_failed queue_id=%s site=%s action=deliver_unscored pool=%s",
                     queue_id, printable(site.name), scan.unscored_pool or "-")
            return DELIVER
        return Verdict(False, Outcome.network(reason))

    def _available(self) -> None:
        if self.down_since is not None:
            log.warning("scan_available after=%ds: spamd answers again; deferred mail is "
                        "scanned at its next attempt", int(time.time() - self.down_since))
            self.down_since = None
            self._next_probe.clear()

    def _settle(self, site: Site, state: str, queue_id: str, env: Envelope,
                status: spool.Status, action: str) -> None:
        """Hold and notify; count the score for the spam_score rule (in a thread).

        The hold comes first: a state database that cannot be written (full
        disk) skips the rule, logged, and never lets a held message go out.
        """
        assert status.score is not None
        if action == "hold":
            self._hold(site, state, queue_id, env, status)
        now = time.time()
        try:
            self.state.record(site.name, env.uid, outbreak.SCANNED,
                              n=outbreak.score_weight(status.score), ts=now)
            rule = outbreak.after_scan(self.state, site, now)
            if rule is not None and self.state.suspension(site.name) is None:
                suspend_site(self.config, self.state, site.name, rule, "outbreak rule")
        except (sqlite3.Error, OSError) as exc:
            log.warning("outbreak_rules_skipped queue_id=%s site=%s reason=%r action='the "
                        "state database cannot be written; free space on the spool disk'",
                        queue_id, printable(site.name), str(exc))

    def _hold(self, site: Site, state: str, queue_id: str, env: Envelope,
              status: spool.Status) -> None:
        scan = self.config.scan
        reason = (f"content score {status.score:.1f} is above scan.max_score "
                  f"{scan.max_score:g}: held for the operator")
        if not hold_message(self.config, queue_id, state, status, site.name, reason, "scan"):
            return
        try:
            self._notify(site, queue_id, env, status)
        except (sqlite3.Error, OSError) as exc:  # the hold stands; the log line tells
            log.warning("notice_failed queue_id=%s site=%s reason=%r action='the message is "
                        "held; free space on the spool disk'", queue_id, printable(site.name),
                        str(exc))

    def _notify(self, site: Site, queue_id: str, env: Envelope, status: spool.Status) -> None:
        scan, name = self.config.scan, site.name
        notify_admin_limited(
            self.config, self.state, name, "scan_hold", scan.notify_every,
            f"site {name}: message {queue_id} held (spam score {status.score:.1f})", (
                f"Site {name} (uid {env.uid}, script {env.script or '-'}) queued message "
                f"{queue_id} from <{env.sender}>; spamd scored it {status.score:.1f}, above "
                f"scan.max_score {scan.max_score:g}, so it is held and nothing was sent.\n\n"
                "What to do next:\n"
                f"  sendmail-shim-admin queue show {queue_id}      read it\n"
                f"  sendmail-shim-admin queue delete {queue_id}    drop it (spam)\n"
                f"  sendmail-shim-admin queue release {queue_id}   send it after all (it "
                "is not scanned again)\n"
                f"  sendmail-shim-admin queue list --site {name}   more held mail of the site\n\n"
                f"Further messages of {name} held within {scan.notify_every / 60:g} minutes "
                "are only logged (event scanned, action=hold).\n"))
