"""The hand-off socket: one submission per connection, answered after the commit.

Trusts: the kernel's peer credentials (SO_PEERCRED) for who is calling; nothing
the peer writes.  Requests are bounded (header size, message_size_limit,
read timeouts) and parsed by ``wire.protocol``; the verdict comes from
``intake.accept``, which commits the message before it returns.

Connections: each peer uid has its own slots (``connections_per_uid``, default
16, handled at once); more connections of that uid wait for its slots, up to
WAITING_FACTOR times as many open; beyond that, or beyond MAX_CONNECTIONS for
all uids, a connection is answered ``421`` at once without being read, and the
front end writes a drop file instead.  There is no shared queue one uid could
fill: another site's hand-off never waits behind it.

The accept loop is the daemon's own, not asyncio's server: it takes at most
ACCEPT_BATCH connections per turn of the event loop, reads each one's peer
credentials from the bare socket, and only then spends anything on it.  A
connection over its uid's slots waits as a bare socket in that uid's queue (no
transport, no task; served in order as the uid's slots free), one beyond its
waiting share is answered 421 with one non-blocking send and closed.  So a
uid that churns connections (connect, send nothing, close, again) costs an
accept and a getsockopt each beyond its slots, the kernel's listen queue
stays short, and another uid's connection is accepted and served between
two batches (asyncio's server accepted up to the whole backlog, 4,096, and
set up a transport and a task for each before it looked at the uid: four
churning processes delayed another site by 9.5 s).  A client must send its
greeting and header within FIRST_BYTES_TIMEOUT seconds, its message within
READ_TIMEOUT plus a second per megabyte.

Guarantees: the reply "250" is written only after the message is durable;
every connection gets a reply line: storage trouble (a full disk) is ``451``,
exit 75, naming the spool's disk; while the state database cannot be opened a
submission is ``451`` with the reason; any other failure is a ``451``
"internal error" and a traceback in the log, never a silent close.  In-flight
connections are in :attr:`SubmissionServer.inflight`, which the daemon's
shutdown waits for.  The listening socket is systemd's when it passed one
(socket activation), else ``public/submit.sock`` with its mode.

Two requests besides a submission, for any user: ``flush`` and ``mailq``.
``flush`` (Postfix's ``sendmail -q``; ``-qR``/``-qS``/``-q<interval>`` are the
same request) scans the drop area and retries deferred mail now: for root and
the daemon's own user the whole queue, for any other uid only that uid's own
mail (a site must not make the relay retry another site's mail), and for a
site uid at most once per FLUSH_INTERVAL seconds.  A flush within the interval
is answered ``250`` "flush ignored" (exit 0) and does nothing: as Postfix's
queue manager merges flush triggers that arrive while it is busy, a repeated
``sendmail -q`` is not an error for the caller, only a no-op (logged once per
interval per uid, with how many were ignored).  And ``mailq``,
which shows root and the daemon's own user the whole queue and every other
uid only its own messages, without their content scores and hold reasons
(daemon/listing.py): on a shared host one site must not read another site's
correspondents, nor its own scores against the limit.  Texts are encoded with
escapes, so an odd queue entry cannot break ``mailq``.  The mailq listing is
streamed: read entry by entry (only each queue file's envelope line and its
status) and written in pieces as the client reads, so the daemon's memory
does not grow with the queue.
A listing reads the whole queue whoever asks (about 20 µs of CPU per queued
message; 7 µs when the queue's envelopes are kept from the last listing, up to
5,000 messages: store/spool.py), so a site uid gets one listing at a time: a second ``mailq`` of the
same uid while its first is still being sent is answered ``451`` at once
(exit 75), and a site looping on ``mailq`` cannot take the worker threads
that other sites' hand-offs need.  Root and the daemon's user are not limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator

from sendmail_shim.daemon import dropspace, listing
from sendmail_shim.daemon.sockets import (
    READ_TIMEOUT,
    DaemonServer,
    Released,
    Running,
    Streamed,
    peer_credentials,
    respond,
    systemd_socket,
)
from sendmail_shim.delivery.runner import QueueRunner
from sendmail_shim.intake.accept import storage_trouble
from sendmail_shim.policy.identity import Caller
from sendmail_shim.store import spool
from sendmail_shim.store.outcome import Verdict
from sendmail_shim.wire import paths, protocol, sysexits

log = logging.getLogger(__name__)
FIRST_BYTES_TIMEOUT = 10.0  # greeting and header; the front end sends them at once
MAX_CONNECTIONS = 4096  # every uid together; one uid gets config.connections_per_uid
WAITING_FACTOR = 16  # a uid may hold this many times its slots open (the rest wait); then 421
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
BUSY_LOG_INTERVAL = 10.0  # one "busy" log line per uid in this many seconds
FLUSH_INTERVAL = 60.0  # a site uid's flush runs at most once in this many seconds
ACCEPT_BATCH = 32  # connections accepted per turn of the event loop
ACCEPT_PAUSE = 1.0  # after EMFILE/ENFILE/ENOMEM: accept again after this many seconds
INTERNAL_ERROR = protocol.format_reply(
    451, sysexits.EX_TEMPFAIL, "4.3.0 internal error in the daemon; nothing was queued, try "
    "again later (the operator finds the cause in the daemon's log)")


class SubmissionServer(DaemonServer):
    """The hand-off socket of one daemon; it reads the daemon's current configuration."""

    def __init__(self, daemon: Running) -> None:
        super().__init__(daemon)
        self.inherited = False  # the socket is systemd's: it stays when the daemon exits
        self.inflight: set[asyncio.Task[None]] = set()
        self._per_uid: dict[int, int] = {}  # open hand-off connections by peer uid
        self._active: dict[int, int] = {}  # of those, being served (connections_per_uid each)
        self._waiting: dict[int, deque[tuple[socket.socket, int, int, int]]] = {}
        self._connections = 0
        self._listener: Listener | None = None
        self._busy_logged: dict[int, tuple[float, int]] = {}  # uid -> (last log, refused)
        self._listing: set[int] = set()  # site uids with a mailq listing being sent
        self._flushed: dict[int, tuple[float, int]] = {}  # uid -> (last flush run, ignored)

    @property
    def _pickup_wake(self) -> asyncio.Event:
        return self.daemon.pickup_wake

    def _runner(self) -> QueueRunner:
        assert self.runner is not None, "the runner is created with the state"
        return self.runner

    async def start(self) -> Listener:
        """Listen: on systemd's socket when it passed one, else on ``public/submit.sock``."""
        layout = self.config.layout
        sock = systemd_socket()
        if sock is not None:
            self.inherited = True
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(layout.socket)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(layout.socket)
            os.chmod(layout.socket, paths.MODE_SOCKET)
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self._listener = Listener(sock, self._accept_some, self._close_waiting)
        return self._listener

    # -- accepting: the uid first, then any cost ----------------------------------
    def _accept_some(self, listener: Listener) -> None:
        """At most ACCEPT_BATCH connections, each admitted, queued or refused by its uid."""
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s; accepting again in %gs (raise the file "
                              "descriptor limit?)", exc, ACCEPT_PAUSE)
                    listener.pause(ACCEPT_PAUSE)
                return  # ECONNABORTED and the like: the next turn tries again
            try:
                pid, uid, gid = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            self._admit(conn, pid, uid, gid)

    def _admit(self, conn: socket.socket, pid: int, uid: int, gid: int) -> None:
        # Slots per uid, never one queue for all: a connection waits only behind its
        # own uid's, and beyond WAITING_FACTOR times its slots it is answered at once.
        limit = self.config.connections_per_uid
        if (self._per_uid.get(uid, 0) >= limit * WAITING_FACTOR
                or self._connections >= MAX_CONNECTIONS):
            _send_and_close(conn, self._busy(uid, pid))
            return
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        self._connections += 1
        if self._active.get(uid, 0) < limit:
            self._serve(conn, pid, uid, gid)
        else:
            self._waiting.setdefault(uid, deque()).append((conn, pid, uid, gid))

    def _serve(self, conn: socket.socket, pid: int, uid: int, gid: int) -> None:
        self._active[uid] = self._active.get(uid, 0) + 1
        task = asyncio.get_running_loop().create_task(self._on_connection(conn, pid, uid, gid))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    def _done(self, uid: int) -> None:
        """A connection of ``uid`` ended: its slot goes to the uid's next waiting one."""
        self._connections -= 1
        self._per_uid[uid] -= 1
        self._active[uid] -= 1
        waiting = self._waiting.get(uid)
        if waiting:
            self._serve(*waiting.popleft())
            if not waiting:
                del self._waiting[uid]
        if not self._per_uid[uid]:  # nobody holds or waits for its slots now
            del self._per_uid[uid]
            del self._active[uid]

    def _close_waiting(self) -> None:
        """Stopping: a connection still waiting for its uid's slot is told to try again."""
        for waiting in self._waiting.values():
            for conn, _pid, uid, _gid in waiting:
                _send_and_close(conn, protocol.format_reply(
                    protocol.BUSY, sysexits.EX_TEMPFAIL,
                    "4.3.2 the daemon is stopping; nothing was read, try again later"))
                self._connections -= 1
                self._per_uid[uid] -= 1
        self._waiting.clear()

    # -- one connection ---------------------------------------------------------
    async def _on_connection(self, conn: socket.socket, pid: int, uid: int, gid: int) -> None:
        try:
            try:
                reader, writer = await asyncio.open_unix_connection(
                    sock=conn, limit=protocol.MAX_HEADER_BYTES + 2)
            except OSError:
                conn.close()
                return
            await respond(writer, self._handle_safely(reader, pid, uid, gid), "client",
                          INTERNAL_ERROR)
        finally:
            self._done(uid)

    def _busy(self, uid: int, pid: int) -> bytes:
        limit = self.config.connections_per_uid
        now = time.monotonic()
        last, refused = self._busy_logged.get(uid, (0.0, 0))
        if now - last >= BUSY_LOG_INTERVAL:
            log.warning("busy uid=%d pid=%d open=%d limit=%d waiting_limit=%d "
                        "refused_since_last_line=%d action='connections beyond the limit get "
                        "421 (the front end writes a drop file); raise connections_per_uid if "
                        "this uid is a real site'", uid, pid, self._per_uid.get(uid, 0), limit,
                        limit * WAITING_FACTOR, refused + 1)
            self._busy_logged[uid] = (now, 0)
        else:
            self._busy_logged[uid] = (last, refused + 1)
        if self._connections >= MAX_CONNECTIONS:
            text = f"too many connections to the daemon ({MAX_CONNECTIONS}); try again later"
        else:
            text = (f"too many connections from uid {uid} ({limit} at once, "
                    f"{limit * WAITING_FACTOR} open); nothing was read, try again later")
        return protocol.format_reply(protocol.BUSY, sysexits.EX_TEMPFAIL, f"4.7.0 {text}")

    async def _handle_safely(self, reader: asyncio.StreamReader, pid: int, uid: int,
                             gid: int) -> bytes | Streamed:
        """The verdict, or a 451 that says why: a handler never dies without an answer."""
        try:
            return await self._handle(reader, pid, uid, gid)
        except Exception as exc:
            why = storage_trouble(self.config.layout.root, exc)
            if why is not None:
                log.error("tempfail uid=%d pid=%d reason=%r", uid, pid, why)
            else:
                log.exception("internal error uid=%d pid=%d: nothing was queued; the caller "
                              "was told to try again", uid, pid)
                why = "internal error in the daemon (see its log)"
            return protocol.format_reply(451, sysexits.EX_TEMPFAIL,
                                        f"4.3.0 {why}; nothing was queued, try again later")

    async def _handle(self, reader: asyncio.StreamReader, pid: int, uid: int,
                      gid: int) -> bytes | Streamed:
        try:
            async with asyncio.timeout(FIRST_BYTES_TIMEOUT):
                protocol.check_greeting(await reader.readline())
                header = await reader.readuntil(protocol.HEADER_END)
            fields = protocol.decode_header(header)
        except TimeoutError:
            log.info("idle client uid=%d pid=%d: no request within %gs, closed", uid, pid,
                     FIRST_BYTES_TIMEOUT)
            return protocol.format_reply(protocol.BUSY, sysexits.EX_TEMPFAIL,
                                        f"4.4.2 no request within {FIRST_BYTES_TIMEOUT:g}s")
        except (protocol.ProtocolError, asyncio.LimitOverrunError, asyncio.IncompleteReadError,
                ValueError) as exc:
            log.warning("bad request uid=%d pid=%d reason=%r", uid, pid, str(exc))
            return protocol.format_reply(500, sysexits.EX_PROTOCOL, f"bad request: {exc}")
        mode = protocol.request_mode(fields)
        if mode == protocol.FLUSH:
            return self._flush(uid, pid)
        if mode == protocol.MAILQ:
            return self._mailq(uid, pid)
        if mode != protocol.SUBMIT:
            return protocol.format_reply(500, sysexits.EX_PROTOCOL, f"unknown mode {mode!r}")
        try:
            size = protocol.body_size(fields)
        except protocol.ProtocolError as exc:
            return protocol.format_reply(500, sysexits.EX_PROTOCOL, f"bad request: {exc}")
        if size > self.config.message_size_limit:
            # Read the body before answering, as an SMTP server reads DATA before its 552:
            # a Unix socket closed with unread bytes resets the peer, whose front end would
            # then lose this reply and take the drop road with the message.
            # Time-bounded as a message at four times the limit: a writer slower than that
            # is cut off (its front end then drops it, and pickup bounces the drop file).
            await _discard(reader, size + len(protocol.TRAILER),
                           READ_TIMEOUT + 4 * self.config.message_size_limit / 1e6)
            return protocol.format_reply(
                552, sysexits.EX_DATAERR,
                f"message of {size} bytes exceeds message_size_limit "
                f"{self.config.message_size_limit}; nothing was queued")
        try:
            async with asyncio.timeout(READ_TIMEOUT + size / 1e6):  # no extra task, unlike wait_for
                tail = await reader.readexactly(size + len(protocol.TRAILER))
        except asyncio.IncompleteReadError:
            log.warning("incomplete request uid=%d pid=%d: nothing queued", uid, pid)
            return protocol.format_reply(500, sysexits.EX_PROTOCOL, "incomplete request")
        except TimeoutError:
            log.warning("slow request uid=%d pid=%d: message not received in time; nothing "
                        "queued", uid, pid)
            return protocol.format_reply(451, sysexits.EX_TEMPFAIL,
                                        "4.4.2 message not received in time; nothing was queued")
        try:
            message = protocol.check_trailer(tail, size)
        except protocol.ProtocolError as exc:
            return protocol.format_reply(500, sysexits.EX_PROTOCOL, str(exc))
        if self.state is None:
            return protocol.format_reply(451, sysexits.EX_TEMPFAIL,
                                        f"4.3.0 {self._unavailable}; nothing was queued, "
                                        "try again later")
        caller = Caller(uid=uid, gid=gid, pid=pid)
        # One hop to an intake thread, within this uid's share (daemon/workers.py), for
        # the whole hand-off: state, compose, commit, bookkeeping (and, on a full disk,
        # a sweep of maildrop/ and one more try: daemon/dropspace.py).
        verdict: Verdict = await self.daemon.intake.run(
            uid, dropspace.accept_relieved, self.config, self.state, fields, message, caller)
        if verdict.accepted:
            self._runner().poke()
        return protocol.format_reply(verdict.code, verdict.status,
                                    f"{verdict.enhanced} {verdict.text}")

    def _flush(self, uid: int, pid: int) -> bytes:
        """Retry deferred mail now: all of it for root and the daemon, else the caller's own,
        at most once per FLUSH_INTERVAL per uid (see the module docstring)."""
        everything = uid in (0, os.getuid())
        if not everything:
            now = time.monotonic()
            last, ignored = self._flushed.get(uid, (-FLUSH_INTERVAL, 0))
            if now - last < FLUSH_INTERVAL:
                if not ignored:  # one line per uid and interval; the count comes later
                    log.info("flush_ignored uid=%d pid=%d last_flush=%.0fs_ago interval=%gs "
                             "reason='one flush per uid per interval: this one and further "
                             "ones within it do nothing'", uid, pid, now - last,
                             FLUSH_INTERVAL)
                self._flushed[uid] = (last, ignored + 1)
                return protocol.format_reply(250, 0, (
                    f"flush ignored: uid {uid} flushed its mail {now - last:.0f}s ago; one "
                    f"flush per {FLUSH_INTERVAL:g}s, deferred mail is retried on its schedule"))
            if ignored:
                log.info("flush_ignored uid=%d count=%d: flushes ignored in the last "
                         "interval", uid, ignored)
            self._flushed = {u: v for u, v in self._flushed.items()
                             if now - v[0] < FLUSH_INTERVAL or v[1]}
            self._flushed[uid] = (now, 0)
        self._pickup_wake.set()
        if self.runner is not None:
            self.runner.poke(force=True, uid=None if everything else uid)
        log.info("flush requested uid=%d pid=%d scope=%s", uid, pid,
                 "all" if everything else "own")  # own: this uid's mail
        return protocol.format_reply(250, 0, "queue run started" if everything else
                                     f"queue run started for the mail of uid {uid}")

    def _mailq(self, uid: int, pid: int) -> bytes | Streamed:
        """The listing for ``uid``; a site uid gets one at a time (see the module docstring)."""
        body = listing.chunks(self._mailq_text(uid))
        if uid in (0, os.getuid()):
            return Streamed(protocol.format_reply(250, 0, "queue follows"), body)
        if uid in self._listing:
            log.info("mailq refused uid=%d pid=%d reason='a listing for this uid is still "
                     "being sent'", uid, pid)
            return protocol.format_reply(451, sysexits.EX_TEMPFAIL, (
                f"4.3.2 a mailq listing for uid {uid} is still being sent; one at a time, "
                "try again when it has finished"))
        self._listing.add(uid)
        return Streamed(protocol.format_reply(250, 0, "queue follows"),
                        Released(body, lambda: self._listing.discard(uid)))

    def _mailq_text(self, uid: int) -> Iterator[str]:
        """The listing for ``uid``, made as it is sent: root and the daemon see every entry
        and its content score; a site its own entries without scores or hold reasons."""
        everything = uid in (0, os.getuid())
        return listing.queue_text((e for e in spool.entries(self.config.layout)
                                   if everything or e.envelope.uid == uid),
                                  operator=everything)



def _send_and_close(conn: socket.socket, line: bytes) -> None:
    """One reply line with one non-blocking send (a fresh socket's buffer holds it), closed."""
    with contextlib.suppress(OSError):
        conn.send(line)
    conn.close()


class Listener:
    """The listening socket, read by the event loop: ``accept`` runs when it is readable.

    ``close`` stops accepting and answers the connections still waiting for a slot;
    ``wait_closed`` is there for the daemon's shutdown, as on asyncio's servers.
    """

    def __init__(self, sock: socket.socket, accept: Callable[[Listener], None],
                 on_close: Callable[[], None]) -> None:
        self.sock = sock
        self._accept = accept
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._resume: asyncio.TimerHandle | None = None
        self._loop.add_reader(sock.fileno(), self._accept, self)

    def pause(self, seconds: float) -> None:
        """Stop accepting for ``seconds`` (out of descriptors: the loop must not spin)."""
        self._loop.remove_reader(self.sock.fileno())
        self._resume = self._loop.call_later(seconds, self._restart)

    def _restart(self) -> None:
        self._resume = None
        if not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._accept, self)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self._on_close()

    async def wait_closed(self) -> None:
        return None


async def _discard(reader: asyncio.StreamReader, count: int, timeout: float) -> None:
    """Read and forget up to ``count`` bytes (until EOF or ``timeout``)."""
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(timeout):
            while count > 0:
                chunk = await reader.read(min(count, 1 << 16))
                if not chunk:
                    return
                count -= len(chunk)
