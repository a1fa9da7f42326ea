"""The capture listener: sites' own SMTP engines, redirected here by the firewall.

Trusts: the kernel, and only for the exact connection in hand.  The firewall's
nat REDIRECT rewrites packets, not the client's socket: the client's row in
/proc/net/tcp (or tcp6) keeps the ORIGINAL destination as its remote end,
while our accepted socket sees the client as peer.  So a connection is the
site's when, read once from /proc/net/tcp and tcp6 (IPv4-mapped addresses
compared as IPv4):

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
hold the connection.  A connection that is not redirected is refused before
any /proc read; at most MAX_SESSIONS capture sessions are open at once (421
beyond), and /proc is read in a small executor of its own, so a flood of
capture connections cannot starve the submissions and the queue runner.
Guarantees: each transaction goes through the same intake as the sendmail
front end (identity -> policy -> quota -> spool -> relay with the site's
login), so a site's built-in SMTP engine keeps working under its quotas; the
reply is the intake's verdict; every message is logged with its original
destination.  It listens only on 127.0.0.1 and ::1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP

from sendmail_shim.config import Config
from sendmail_shim.intake.accept import accept_submission
from sendmail_shim.policy.identity import Caller, exempt_uids
from sendmail_shim.policy.peers import (  # the /proc/net/tcp reading, shared with other services
    ESTABLISHED,
    Endpoint,
    TcpRow,
    endpoint,
    show,
    tcp_rows,
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
MAX_SESSIONS = 256  # capture sessions at once, every site together


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


def prove_owner(conn: Connection, rows: list[TcpRow], never: frozenset[int]) -> Owner:
    """The uid owning the client end of ``conn``, or :class:`Refused`; never a guess."""
    check_redirected(conn)
    ours = [r for r in rows if r.local == conn.local and r.remote == conn.peer]
    if len(ours) != 1 or ours[0].state != ESTABLISHED or ours[0].inode != conn.inode:
        raise Refused(NOT_PROVEN, f"our own socket's row not found ({len(ours)} candidates)")
    theirs = [r for r in rows if r.local == conn.peer and r.remote == conn.original]
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


class CaptureHandler:
    def __init__(self, config: Config, state: State) -> None:
        self.config = config
        self.state = state
        self.sessions = 0  # open capture sessions, proven or being proven
        # /proc/net/tcp is read here, never in the executor that intake and the queue
        # runner share: a flood of capture connections must not delay submissions.
        self.prover = ThreadPoolExecutor(max_workers=2, thread_name_prefix="capture-proof")

    def owner(self, conn: Connection) -> Owner:
        """Read /proc now and prove who owns ``conn`` (blocking: run in a thread)."""
        try:
            rows = tcp_rows()
        except OSError as exc:
            raise Refused(NOT_PROVEN, f"cannot read /proc/net/tcp: {exc}") from exc
        return prove_owner(conn, rows, never_captured(self.config))

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        conn: Connection | None = getattr(server, "connection", None)
        first: Owner | None = getattr(server, "owner", None)
        if conn is None or first is None:  # CaptureSMTP sets both before the greeting
            return NOT_PROVEN
        try:  # the second check: the same socket still holds the connection
            again = await asyncio.get_running_loop().run_in_executor(self.prover, self.owner, conn)
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
        message = (envelope.original_content or b"").replace(b"\r\n", b"\n")
        fields = [(protocol.MODE, protocol.SUBMIT), (protocol.SENDER, envelope.mail_from)]
        fields += [(protocol.RCPT, rcpt) for rcpt in envelope.rcpt_tos]
        verdict = await asyncio.to_thread(accept_submission, self.config, self.state, fields,
                                          message, Caller(uid=uid, gid=gid, pid=None),
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
        conn = None
        try:
            try:  # socket calls here, in the loop: the descriptor cannot be reused meanwhile
                assert self.transport is not None, "set in connection_made"
                conn = describe(self.transport.get_extra_info("socket"))
            except (OSError, ValueError, AttributeError) as exc:
                raise Refused(NOT_PROVEN, f"socket gone before the greeting: {exc}") from exc
            check_redirected(conn)  # before any /proc read: direct connections cost nothing
            if self.capture.sessions > MAX_SESSIONS:
                raise Refused(BUSY, f"more than {MAX_SESSIONS} capture sessions open")
            owner = await asyncio.get_running_loop().run_in_executor(
                self.capture.prover, self.capture.owner, conn)
        except Refused as exc:
            refused(conn, exc)
            if self.transport is not None:
                await self.push(exc.reply)
                self.transport.close()
            return
        self.connection, self.owner = conn, owner
        await super()._handle_client()


async def start_capture(config: Config, state: State, port: int,
                        handlers: list[CaptureHandler]) -> list[asyncio.AbstractServer]:
    """Listen on loopback; ``handlers`` receives the handler so a reload can update it."""
    handler = CaptureHandler(config, state)
    handlers.append(handler)
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    def factory() -> SMTP:
        return CaptureSMTP(handler, hostname=config.hostname, ident="sendmail-shim capture",
                           data_size_limit=config.message_size_limit, decode_data=False,
                           enable_SMTPUTF8=True)

    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = [
        await loop.create_server(factory, host="127.0.0.1", port=port)]
    try:
        servers.append(await loop.create_server(factory, host="::1", port=port))
    except OSError as exc:
        log.warning("capture listener on [::1]:%d unavailable: %s", port, exc)
    log.info("capture listener on 127.0.0.1:%d and [::1]:%d", port, port)
    return servers
