"""The capture listener: sites' own SMTP engines, redirected here by the firewall.

Trusts: the kernel, and only for the exact connection in hand.  The firewall's
nat REDIRECT rewrites packets, not the client's socket: the client's row in
/proc/net/tcp (or tcp6) keeps the ORIGINAL destination as its remote end,
while our accepted socket sees the client as peer.  So a connection is the
site's when, asked of the kernel (sock_diag by four-tuple; else read once from
/proc/net/tcp and tcp6, IPv4-mapped addresses compared as IPv4):

* SO_ORIGINAL_DST of our accepted socket answers, and is not the listener's
  own address and port (a connection made straight to the listener is not
  redirected, whatever conntrack says);
* our own row exists exactly once (local = listener address, remote = peer,
  ESTABLISHED) and carries the inode of the socket we accepted;
* exactly one row has local = peer and remote = original destination (the
  full four-tuple, which the kernel keeps unique), and it is ESTABLISHED with
  a non-zero inode (TIME_WAIT and orphaned sockets show inode 0 and uid 0:
  a site can bind a port left in TIME_WAIT by root, but that row never
  matches);
* its uid is not one the firewall exempts (root, the daemon's user,
  ``firewall.exempt_users``): those are never redirected, so such a claim is
  refused rather than believed.

The uid is that row's owner; nothing the client says (HELO, MAIL FROM)
decides who it is.  The decision is made when the connection is accepted,
before the greeting: a connection that is not redirected, or from an exempt
uid, gets ``554 5.7.1``; one whose owner cannot be proven (no row, several
rows, not ESTABLISHED, inode 0, /proc unreadable) gets ``421 4.7.0``; either
is closed and logged as ``capture_refused`` with the peer, the original
destination and the reason — never a guess.
At DATA the rows are read again and the same uid and socket inode must still
hold the connection.

Shares (issue 21, finding 6): one site's connections never make another
site's wait or get 421, as on the submission socket (daemon/submission.py):

* proving: a connection that is not redirected is refused before any
  lookup.  The two rows are asked of the kernel by their exact four-tuples
  (sock_diag, :func:`diag_index`): a lookup costs the same however many sockets
  the sites hold (one read of /proc/net/tcp took 60 ms under a site's
  16,000-socket flood).  Where the kernel does not answer, /proc/net/tcp is
  read instead, and ONE read serves every connection waiting at that moment.
  Proofs run on one thread of their own (never the executor that intake and
  the queue runner share), in batches (:class:`Prover`).  At most
  MAX_UNPROVEN connections wait for a proof at once (a proof takes
  milliseconds, so only a burst of thousands within one read reaches it);
* sessions: once its uid is known, a connection takes one of that uid's
  ``connections_per_uid`` session slots (the submission socket's key, default
  16) and is greeted; more connections of that uid wait, not greeted, for its
  slots (at most SLOT_WAIT seconds, then ``421``), up to WAITING_FACTOR times
  as many open; beyond that the uid's connection is answered ``421`` at once.
  MAX_SESSIONS bounds every uid together (descriptors), far above one uid's
  share.  There is no shared queue or cap that one uid can fill;
* idle: a session that sends no command for IDLE_TIMEOUT seconds is closed
  (aiosmtpd's timeout; Postfix's smtpd_timeout is 300 s, 10 s under stress:
  a captured session is a site's own engine on the same host, whose commands
  follow each other at once), so idle connections free their uid's slots;
* intake: accept_submission runs on the daemon's intake threads
  (daemon/workers.py), within the uid's share of them that every road
  shares, so a uid's parallel DATA commands take at most that many threads.
Guarantees: each transaction goes through the same intake as the sendmail
front end (identity -> line-ending rule -> policy -> quota -> spool -> relay
with the site's login), so a site's built-in SMTP engine keeps working under
its quotas and a CR inside its header block gets ``554 5.6.0`` as on every
other road; the reply is the intake's verdict; every message is logged with its original
destination.  It listens only on 127.0.0.1 and ::1.

A port someone else holds (issue 21, F2: a site listening on the capture
port's 127.0.0.1 or [::1] while the daemon restarts): each address is bound
on its own (:class:`CaptureListeners`); one that is taken is logged as
``capture_squatted`` (an error, with the holder's uid, user and site from
/proc/net/tcp) and retried every BIND_RETRY seconds, while the daemon starts
and serves everything else.  The log claims only the addresses it holds
(``capture_listening``).  That the squatter gets none of the redirected SMTP
is the firewall's part: its ``capture_guard`` chain (admin/firewall.py)
drops the handshake replies of any socket on the capture port not owned by
root or the daemon's user, so a redirected connection to a squatter never
completes, and the site's SMTP engine keeps its mail and retries.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP

from sendmail_shim.config import Config
from sendmail_shim.daemon import dropspace
from sendmail_shim.daemon.workers import IntakeWorkers, PerUid, SlotTimeout
from sendmail_shim.policy.identity import Caller, exempt_uids
from sendmail_shim.policy.peers import (  # the /proc/net/tcp reading, shared with other services
    ESTABLISHED,
    Endpoint,
    TcpRow,
    diag_row,
    endpoint,
    show,
    tcp_rows,
    who_holds,
)
from sendmail_shim.store.state import State
from sendmail_shim.wire import protocol

# The /proc/net/tcp names moved to policy/peers.py are still this module's (unit tests).
__all__ = ["ESTABLISHED", "Endpoint", "TcpRow", "endpoint", "show", "tcp_rows"]

log = logging.getLogger(__name__)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
NOT_REDIRECTED = ("554 5.7.1 this port serves only SMTP redirected by the firewall; "
                  "submit with /usr/sbin/sendmail")
NOT_PROVEN = "421 4.7.0 cannot prove which site this connection belongs to; try again later"
BUSY = "421 4.7.0 too many connections to the capture listener; try again later"
BUSY_UID = ("421 4.7.0 too many SMTP connections from this site at once; nothing was "
            "accepted from this one, try again later")
MAX_SESSIONS = 4096  # capture connections open at once, every uid together (descriptors)
MAX_UNPROVEN = 1024  # connections waiting for their /proc proof, every uid together
WAITING_FACTOR = 16  # a uid may hold this many times its slots open (the rest wait); then 421
SLOT_WAIT = 30.0  # seconds a connection waits, not greeted, for one of its uid's slots
IDLE_TIMEOUT = 60.0  # seconds without a command before a session is closed
BUSY_LOG_INTERVAL = 10.0  # one "busy" log line per uid in this many seconds
CAPTURE_HOSTS = ("127.0.0.1", "::1")
BIND_RETRY = 5.0  # seconds between two attempts to bind a capture address someone holds
SQUAT_LOG_INTERVAL = 60.0  # the capture_squatted error again this often while it lasts


def original_destination(sock: Any) -> Endpoint | None:
    """Where the client meant to connect before REDIRECT; None if conntrack has no entry."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            return endpoint(socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0])
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        return endpoint(socket.inet_ntop(socket.AF_INET6, raw[8:24]),
                        struct.unpack("!H", raw[2:4])[0])
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Connection:
    """What the kernel says about one accepted socket (read in the event loop thread)."""

    peer: Endpoint
    local: Endpoint
    original: Endpoint | None
    inode: int  # of our accepted socket


def describe(sock: Any) -> Connection:
    """The accepted socket's endpoints, original destination and inode; OSError if gone."""
    peer = sock.getpeername()
    local = sock.getsockname()
    return Connection(endpoint(peer[0], peer[1]), endpoint(local[0], local[1]),
                      original_destination(sock), os.fstat(sock.fileno()).st_ino)


class Refused(Exception):
    """The connection is not served: ``reply`` for the client, ``reason`` for the log."""

    def __init__(self, reply: str, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


@dataclass(frozen=True)
class Owner:
    uid: int
    inode: int  # of the client's socket


def check_redirected(conn: Connection) -> None:
    """:class:`Refused` unless the firewall redirected ``conn`` (cheap: no /proc read)."""
    if conn.original is None:
        raise Refused(NOT_REDIRECTED, "not redirected: no original destination (SO_ORIGINAL_DST)")
    if conn.original == conn.local:
        raise Refused(NOT_REDIRECTED, "not redirected: connected to the listener directly")


RowIndex = dict[tuple[Endpoint, Endpoint], list[TcpRow]]


def index_rows(rows: list[TcpRow]) -> RowIndex:
    """``rows`` by (local, remote): one read of /proc answers many connections cheaply."""
    index: RowIndex = {}
    for row in rows:
        index.setdefault((row.local, row.remote), []).append(row)
    return index


def prove_owner(conn: Connection, rows: list[TcpRow] | RowIndex,
                never: frozenset[int]) -> Owner:
    """The uid owning the client end of ``conn``, or :class:`Refused`; never a guess."""
    check_redirected(conn)
    index = rows if isinstance(rows, dict) else index_rows(rows)
    ours = index.get((conn.local, conn.peer), [])
    if len(ours) != 1 or ours[0].state != ESTABLISHED or ours[0].inode != conn.inode:
        raise Refused(NOT_PROVEN, f"our own socket's row not found ({len(ours)} candidates)")
    assert conn.original is not None, "check_redirected"
    theirs = index.get((conn.peer, conn.original), [])
    if len(theirs) != 1:
        raise Refused(NOT_PROVEN, f"{len(theirs)} client sockets match "
                      f"{show(conn.peer)} -> {show(conn.original)}")
    row = theirs[0]
    if row.state != ESTABLISHED:
        raise Refused(NOT_PROVEN, f"client socket not established (state {row.state:02X})")
    if row.inode == 0:
        raise Refused(NOT_PROVEN, "client socket has no owner (closed or orphaned, inode 0)")
    if row.uid in never:
        raise Refused(NOT_REDIRECTED, f"uid {row.uid} is exempt from the firewall and never "
                      "redirected")
    return Owner(row.uid, row.inode)


def never_captured(config: Config) -> frozenset[int]:
    """uids the firewall never redirects: root, the daemon's user, ``exempt_users``."""
    uids = {0, os.geteuid()}
    try:
        uids.update(exempt_uids(config))
    except (KeyError, OSError):  # a user removed since the configuration was loaded
        pass
    return frozenset(uids)


def diag_index(conn: Connection) -> RowIndex:
    """The two rows :func:`prove_owner` reads, asked of the kernel by their four-tuples
    (sock_diag): a lookup costs the same however many sockets the sites hold, where one
    read of /proc/net/tcp grows with them (12 ms, 60 ms under a 16,000-socket flood).
    OSError when the kernel does not answer."""
    check_redirected(conn)
    assert conn.original is not None, "check_redirected"
    index: RowIndex = {}
    for local, remote in ((conn.local, conn.peer), (conn.peer, conn.original)):
        row = diag_row(local, remote)
        index[(local, remote)] = [] if row is None else [row]
    return index


def prove_batch(conns: list[Connection], never: frozenset[int]) -> list[Owner | Refused]:
    """Each connection's owner (blocking: run in a thread): by sock_diag, else from ONE
    read of /proc for the connections the kernel did not answer for."""
    results: list[Owner | Refused | None] = []
    for conn in conns:
        try:
            results.append(prove_owner(conn, diag_index(conn), never))
        except Refused as exc:
            results.append(exc)
        except OSError:
            results.append(None)  # no sock_diag here: /proc below
    if any(result is None for result in results):
        try:
            index = index_rows(tcp_rows())
        except OSError as exc:
            return [Refused(NOT_PROVEN, f"cannot read /proc/net/tcp: {exc}") if r is None
                    else r for r in results]
        for i, conn in enumerate(conns):
            if results[i] is None:
                try:
                    results[i] = prove_owner(conn, index, never)
                except Refused as exc:
                    results[i] = exc
    return [r for r in results if r is not None]


class Prover:
    """Proofs of ownership, batched on a thread of their own (:func:`prove_batch`: by
    sock_diag, else one /proc read for every connection waiting then).

    A connection is added to the batch after it was accepted, and the batch's
    lookups start after that, so they see the connection's rows.
    """

    def __init__(self, never: Callable[[], frozenset[int]]) -> None:
        self._never = never
        # Its own thread: a flood of capture connections must not delay submissions.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture-proof")
        self._waiting: list[tuple[Connection, asyncio.Future[Owner]]] = []
        self._task: asyncio.Task[None] | None = None

    async def owner(self, conn: Connection) -> Owner:
        """Who owns ``conn``, or :class:`Refused`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Owner] = loop.create_future()
        self._waiting.append((conn, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                results = await loop.run_in_executor(
                    self._executor, prove_batch, [conn for conn, _ in batch], self._never())
            except Exception as exc:  # every waiter gets an answer
                results = [Refused(NOT_PROVEN, f"proof failed: {exc!r}")] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # its client went away meanwhile
                    continue
                if isinstance(result, Refused):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class CaptureHandler:
    def __init__(self, config: Config, state: State, intake: IntakeWorkers | None = None
                 ) -> None:
        self.config = config
        self.state = state
        self.sessions = 0  # open capture connections, proven or being proven
        self.unproven = 0  # connections waiting for their proof
        self.prover = Prover(lambda: never_captured(self.config))
        self.connections = PerUid()  # connections_per_uid session slots each
        self.intake = intake or IntakeWorkers()  # the daemon's: one share per uid on all roads
        self._busy_logged: dict[int, tuple[float, int]] = {}  # uid -> (last log, refused)

    def busy(self, conn: Connection, uid: int, why: str) -> Refused:
        """The refusal of one connection over ``uid``'s share, logged once per interval."""
        now = time.monotonic()
        last, count = self._busy_logged.get(uid, (0.0, 0))
        if now - last >= BUSY_LOG_INTERVAL:
            limit = self.config.connections_per_uid
            log.warning("capture_busy uid=%d peer=%s original_dst=%s reason=%r open=%d "
                        "limit=%d waiting_limit=%d refused_since_last_line=%d action='this "
                        "uid's SMTP connections beyond its share get 421; other sites are not "
                        "affected; find the script holding them, or raise connections_per_uid "
                        "if the site really needs more'", uid, show(conn.peer),
                        show(conn.original), why, self.connections.open(uid), limit,
                        limit * WAITING_FACTOR, count + 1)
            self._busy_logged = {u: v for u, v in self._busy_logged.items()
                                 if now - v[0] < BUSY_LOG_INTERVAL}
            self._busy_logged[uid] = (now, 0)
        else:
            self._busy_logged[uid] = (last, count + 1)
        return Refused(BUSY_UID, why)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        conn: Connection | None = getattr(server, "connection", None)
        first: Owner | None = getattr(server, "owner", None)
        if conn is None or first is None:  # CaptureSMTP sets both before the greeting
            return NOT_PROVEN
        try:  # the second check: the same socket still holds the connection
            again = await self.prover.owner(conn)
            if again != first:
                raise Refused(NOT_PROVEN, f"owner changed from uid {first.uid} to {again.uid}")
        except Refused as exc:
            refused(conn, exc)
            return exc.reply
        uid = first.uid
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = -1
        message = envelope.original_content or b""  # CRLF: intake applies wire/lineends.py
        fields = [(protocol.MODE, protocol.SUBMIT), (protocol.SENDER, envelope.mail_from)]
        fields += [(protocol.RCPT, rcpt) for rcpt in envelope.rcpt_tos]
        verdict = await self.intake.run(uid, dropspace.accept_relieved, self.config, self.state,
                                        fields, message, Caller(uid=uid, gid=gid, pid=None),
                                        "capture")
        log.info("captured uid=%d peer=%s original_dst=%s helo=%r status=%d reply=%r",
                 uid, show(conn.peer), show(conn.original), session.host_name, verdict.code,
                 verdict.text)
        return f"{verdict.code} {verdict.enhanced} {verdict.text}"


def refused(conn: Connection | None, exc: Refused) -> None:
    log.warning("capture_refused peer=%s original_dst=%s reason=%r reply=%r: nothing was "
                "accepted from this connection; if a site's port-25 mail should have been "
                "captured, run 'sendmail-shim-admin firewall check'",
                show(conn.peer) if conn else "unknown", show(conn.original) if conn else "none",
                exc.reason, exc.reply[:3])


class CaptureSMTP(SMTP):
    """aiosmtpd's SMTP that proves the client's owner before it greets."""

    def __init__(self, handler: CaptureHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.capture = handler
        self.connection: Connection | None = None
        self.owner: Owner | None = None

    async def _handle_client(self) -> None:
        self.capture.sessions += 1
        try:
            await self._prove_then_serve()
        finally:
            self.capture.sessions -= 1

    async def _prove_then_serve(self) -> None:
        capture = self.capture
        conn = None
        try:
            try:  # socket calls here, in the loop: the descriptor cannot be reused meanwhile
                assert self.transport is not None, "set in connection_made"
                conn = describe(self.transport.get_extra_info("socket"))
            except (OSError, ValueError, AttributeError) as exc:
                raise Refused(NOT_PROVEN, f"socket gone before the greeting: {exc}") from exc
            check_redirected(conn)  # before any /proc read: direct connections cost nothing
            if capture.sessions > MAX_SESSIONS or capture.unproven >= MAX_UNPROVEN:
                raise Refused(BUSY, f"{capture.sessions} capture connections open, "
                              f"{capture.unproven} being proven (limits {MAX_SESSIONS}, "
                              f"{MAX_UNPROVEN})")
            capture.unproven += 1
            try:
                owner = await capture.prover.owner(conn)
            finally:
                capture.unproven -= 1
            uid, limit = owner.uid, self.capture.config.connections_per_uid
            if capture.connections.open(uid) >= limit * WAITING_FACTOR:
                raise capture.busy(conn, uid, f"uid {uid} holds {limit * WAITING_FACTOR} "
                                   "capture connections")
            try:  # this uid's own slots: another uid's connections never wait here
                async with capture.connections.slot(uid, limit, SLOT_WAIT):
                    self.connection, self.owner = conn, owner
                    self._reset_timeout()  # the idle timeout counts from the greeting
                    await super()._handle_client()
            except SlotTimeout:
                raise capture.busy(conn, uid, f"no session slot of uid {uid} free within "
                                   f"{SLOT_WAIT:g}s ({limit} in use)") from None
        except Refused as exc:
            if exc.reply != BUSY_UID:  # busy: logged by capture.busy, once per interval
                refused(conn, exc)
            if self.transport is not None:
                await self.push(exc.reply)
                self.transport.close()


class CaptureListeners:
    """The capture listener's sockets on 127.0.0.1 and [::1]: each address is bound on
    its own; one that cannot be bound (a site listens there: issue 21, F2) is logged as
    an error naming the holder and retried every BIND_RETRY seconds until it is ours.
    Only addresses actually held are ever logged as listening (``capture_listening``)."""

    def __init__(self, config: Config, port: int, factory: Callable[[], SMTP]) -> None:
        self.config = config
        self.port = port
        self.factory = factory
        self.servers: list[asyncio.AbstractServer] = []
        self._retry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        missing = [host for host in CAPTURE_HOSTS if not await self._bind(host, True)]
        if missing:
            self._retry = asyncio.get_running_loop().create_task(self._retry_forever(missing))

    async def _bind(self, host: str, first: bool) -> bool:
        """True when ``host`` is held now, or can never be (no such address: nobody can
        bind it either); False when someone else holds it (logged when ``first``)."""
        try:
            server = await asyncio.get_running_loop().create_server(
                self.factory, host=host, port=self.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                log.warning("capture_unavailable address=%s error=%r: this address is not "
                            "served (the host has no such loopback address)",
                            show(endpoint(host, self.port)), str(exc))
                return exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
            if first:
                self._squatted(host)
            return False
        self.servers.append(server)
        log.info("capture_listening address=%s", show(endpoint(host, self.port)))
        return True

    def _squatted(self, host: str) -> None:
        holder = who_holds(host, self.port, lambda uid: [
            s.name for s in self.config.sites_of_uid(uid)])
        log.error("capture_squatted address=%s holder=%r: another process listens on the "
                  "capture port, so redirected port-25 SMTP of the sites cannot reach the "
                  "daemon there; the firewall's capture_guard chain drops its replies (no "
                  "site's SMTP reaches it; sites' port-25 mail waits in their own queues), "
                  "retrying every %gs; stop that process (and suspend its site), and use a "
                  "capture port below 1024 so no site can take it",
                  show(endpoint(host, self.port)), holder, BIND_RETRY)

    async def _retry_forever(self, missing: list[str]) -> None:
        since = time.monotonic()
        while missing:
            await asyncio.sleep(BIND_RETRY)
            missing = [host for host in missing if not await self._bind(host, False)]
            if missing and time.monotonic() - since >= SQUAT_LOG_INTERVAL:
                since = time.monotonic()
                for host in missing:
                    self._squatted(host)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        for server in self.servers:
            server.close()


async def start_capture(config: Config, state: State, port: int,
                        handlers: list[CaptureHandler], intake: IntakeWorkers | None = None
                        ) -> CaptureListeners:
    """Listen on loopback; ``handlers`` receives the handler so a reload can update it."""
    handler = CaptureHandler(config, state, intake)
    handlers.append(handler)
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    def factory() -> SMTP:
        return CaptureSMTP(handler, hostname=config.hostname, ident="sendmail-shim capture",
                           data_size_limit=config.message_size_limit, decode_data=False,
                           enable_SMTPUTF8=True, timeout=IDLE_TIMEOUT)

    listeners = CaptureListeners(config, port, factory)
    await listeners.start()
    return listeners
