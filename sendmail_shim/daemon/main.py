"""The daemon: hand-off socket, pickup of drop files, and the queue runner.

Trusts: the kernel's peer credentials (SO_PEERCRED) for who is calling; nothing
the peer writes.  Requests are bounded (header size, message_size_limit,
read timeouts) and parsed by protocol.py; the verdict comes from intake.py.

Connections: each peer uid has its own slots (``connections_per_uid``, default
16, handled at once); more connections of that uid wait for its slots, up to
WAITING_FACTOR times as many open; beyond that, or beyond MAX_CONNECTIONS for
all uids, a connection is answered ``421`` at once without being read, and the
front end writes a drop file instead.  There is no shared queue one uid could
fill: another site's hand-off never waits behind it.  A client must send its greeting and header
within FIRST_BYTES_TIMEOUT seconds.  The soft RLIMIT_NOFILE is raised to the
hard limit at start.

A full disk: every handler answers (storage trouble is ``451``, exit 75,
naming the spool's disk; any other failure is a ``451`` "internal error" and a
traceback in the log, never a silent close).  When the state database cannot
be opened at start, the daemon still serves its sockets, answers submissions
``451`` with the reason, and retries every STATE_RETRY seconds; pickup and the
queue runner start once it opens.
SIGHUP reloads the configuration (``systemctl reload``); a bad file is
refused and the running configuration kept.

Socket activation: when systemd passes the hand-off socket (LISTEN_FDS), the
daemon serves it instead of binding the path, and leaves it in place on exit.

Guarantees: one daemon per spool (a lock file); the reply "250" is written only
after the message is durable; interrupted writes in ``tmp/`` are removed at
start; drop files are ingested at start, on every scan and on a flush
request (``sendmail -q``).

Shutdown (SIGTERM, SIGINT), in this order: stop accepting; let in-flight
submissions finish (30 s, then they are cancelled); tell the pickup scan
(between two drop files) and the queue runner (between two messages) to
stop, and wait for them (STOP_TIMEOUT, then they are cancelled); join every
worker thread of the loop's executor, since cancelling a task that awaits
``asyncio.to_thread`` does not stop the thread; only then close the state
(SQLite) and release the lock.  So no thread ever uses a closed database, a
drop file is never left both queued and in ``maildrop/``, and a message
accepted by the relay is recorded before the daemon exits.  The signal
handlers are installed before the socket exists, so a SIGTERM that comes as
soon as a caller could connect is a clean stop too.

Every request gets a reply line: an unexpected exception in a handler is
logged with its traceback and answered ``451`` (submissions: nothing was
queued, try again) or ``500`` (mailq, control), never a closed socket that the
front end would take for a dead daemon.  Texts are encoded with escapes, so an
odd queue entry cannot break ``mailq`` or ``queue list``.

Control requests on the same socket: ``flush`` (any user, like Postfix's
``sendmail -q``) and ``mailq``, which shows root and the daemon's own user the
whole queue and every other uid only its own messages: on a shared host one
site must not read another site's correspondents.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import resource
import signal
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Awaitable

import filelock

from sendmail_shim.config import Config, ConfigError, load_config
from sendmail_shim.daemon import control, listing, pickup
from sendmail_shim.daemon.capture import CaptureHandler, start_capture
from sendmail_shim.delivery.runner import QueueRunner
from sendmail_shim.intake.accept import accept_submission, settle_submissions, storage_trouble
from sendmail_shim.policy import sanctions
from sendmail_shim.policy.identity import Caller
from sendmail_shim.store import spool
from sendmail_shim.store.outcome import Verdict
from sendmail_shim.store.state import State
from sendmail_shim.wire import paths, protocol, sysexits

log = logging.getLogger(__name__)
FIRST_BYTES_TIMEOUT = 10.0  # greeting and header; the front end sends them at once
READ_TIMEOUT = 60.0  # the message, plus one second per megabyte
MAX_CONNECTIONS = 4096  # every uid together; one uid gets config.connections_per_uid
WAITING_FACTOR = 16  # a uid may hold this many times its slots open (the rest wait); then 421
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
INFLIGHT_TIMEOUT = 30.0  # in-flight submissions get this long to finish at shutdown
STOP_TIMEOUT = 60.0  # pickup and the queue runner get this long to finish the item in hand
STATE_RETRY = 5.0  # seconds between attempts to open the state database
BUSY_LOG_INTERVAL = 10.0  # one "busy" log line per uid in this many seconds


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each connection is a descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


class AlreadyRunning(Exception):
    pass


SD_LISTEN_FDS_START = 3


def systemd_socket() -> socket.socket | None:
    """The hand-off socket passed by systemd socket activation (sendmail-shim.socket)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX:
        raise OSError("socket activation passed a socket that is not a Unix socket")
    return sock


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state: State | None = None
        self.runner: QueueRunner | None = None
        self._admin_gid: int | None = None
        self._capture_handlers: list[CaptureHandler] = []
        self._captures: list[asyncio.AbstractServer] = []
        self._unavailable: str | None = None  # why submissions are refused (state not open)
        self._per_uid: dict[int, int] = {}  # open hand-off connections by peer uid
        self._uid_slots: dict[int, asyncio.Semaphore] = {}  # connections_per_uid each
        self._connections = 0
        self._busy_logged: dict[int, tuple[float, int]] = {}  # uid -> (last log, refused)
        self._inflight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._pickup_wake = asyncio.Event()
        self._halt = threading.Event()  # seen by worker threads: stop between two items
        self._pickup = pickup.Pickup(self._halt)
        self._lock: filelock.BaseFileLock | None = None

    # -- start and stop -------------------------------------------------------
    def _take_lock(self) -> None:
        lock = filelock.FileLock(self.config.layout.lock)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise AlreadyRunning(
                f"another sendmail-shim daemon holds {self.config.layout.lock}; "
                "stop it first (one daemon per spool)") from None
        self._lock = lock

    async def serve(self) -> None:
        layout = self.config.layout
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        spool.prepare_spool(layout)
        self._take_lock()
        log.info("file descriptor limit %d", raise_fd_limit())
        self._open_state()
        for name in spool.clean_tmp(layout):
            log.info("removed interrupted write tmp/%s", name)
        inherited = systemd_socket()
        if inherited is not None:
            server = await asyncio.start_unix_server(self._on_connection, sock=inherited,
                                                     limit=protocol.MAX_HEADER_BYTES + 2)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(layout.socket)
            server = await asyncio.start_unix_server(self._on_connection, path=layout.socket,
                                                     limit=protocol.MAX_HEADER_BYTES + 2,
                                                     backlog=LISTEN_BACKLOG)
            os.chmod(layout.socket, paths.MODE_SOCKET)
        control = await self._start_control()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info("started spool=%s socket=%s relays=%s sites=%d connections_per_uid=%d",
                 layout.root, layout.socket,
                 ",".join(r.label for r in self.config.relays) or "none",
                 len(self.config.sites), self.config.connections_per_uid)
        background = [asyncio.create_task(self._background(), name="pickup and queue runner")]
        try:
            await self._stop.wait()
        finally:
            log.info("stopping: no new submissions; finishing %d in flight", len(self._inflight))
            server.close()
            control.close()
            for capture in self._captures:
                capture.close()
            await server.wait_closed()
            await control.wait_closed()
            if self._inflight:
                _done, late = await asyncio.wait(self._inflight, timeout=INFLIGHT_TIMEOUT)
                for task in late:
                    task.cancel()
                if late:
                    log.warning("stopping: cancelled %d submission(s) still unfinished after "
                                "%gs; their callers saw no verdict and use the drop area",
                                len(late), INFLIGHT_TIMEOUT)
                    await asyncio.gather(*late, return_exceptions=True)
            await self._stop_background(background)
            # An inherited socket is systemd's: it stays, and queues callers while we restart.
            for path in (layout.control_socket,) if inherited else (layout.socket,
                                                                     layout.control_socket):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            if self.state is not None:
                self.state.close()
            if self._lock is not None:
                self._lock.release()
            log.info("stopped")

    async def _stop_background(self, background: list[asyncio.Task[None]]) -> None:
        """Stop pickup and the queue runner, then join every worker thread."""
        self._halt.set()
        self._pickup_wake.set()
        if self.runner is not None:
            self.runner.stop()
        _done, late = await asyncio.wait(background, timeout=STOP_TIMEOUT)
        for task in late:
            log.warning("stopping: %s did not finish within %gs; cancelled", task.get_name(),
                        STOP_TIMEOUT)
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # A cancelled task leaves its asyncio.to_thread() call running: wait for every
        # worker thread (and refuse new ones) before anything they use is closed.
        await asyncio.get_running_loop().shutdown_default_executor()

    def _open_state(self) -> bool:
        """Open the state database; on failure (a full disk) say why and keep refusing."""
        try:
            state = State(self.config.layout)
            settle_submissions(self.config, state)
        except (sqlite3.Error, OSError) as exc:
            why = storage_trouble(self.config.layout.root, exc) or (
                f"the state database in {self.config.layout.root}/state cannot be opened "
                f"({exc})")
            if why != self._unavailable:
                log.error("cannot accept mail: %s; submissions are answered 451 (exit 75) and "
                          "the queue waits; retrying every %gs", why, STATE_RETRY)
            self._unavailable = why
            return False
        self.state = state
        self.runner = QueueRunner(self.config, state)
        if self._unavailable is not None:
            log.info("state database open again: accepting mail")
        self._unavailable = None
        return True

    async def _background(self) -> None:
        """Wait for the state (a full disk at start), then run pickup and the queue."""
        while self.state is None:
            try:  # a stop ends the wait at once
                await asyncio.wait_for(self._stop.wait(), STATE_RETRY)
                return
            except TimeoutError:
                pass
            await asyncio.to_thread(self._open_state)
        if self.config.firewall.capture_port:
            self._captures = await start_capture(self.config, self._state(),
                                                 self.config.firewall.capture_port,
                                                 self._capture_handlers)
        await asyncio.gather(self._runner().run_forever(), self._pickup_forever())

    async def _pickup_forever(self) -> None:
        while not self._halt.is_set():
            try:
                if await asyncio.to_thread(self._pickup.scan, self.config, self._state()):
                    self._runner().poke()
            except Exception:
                log.exception("pickup scan failed; retrying after the scan interval")
            if self._halt.is_set():
                break
            try:
                await asyncio.wait_for(self._pickup_wake.wait(), self.config.queue_scan_interval)
            except TimeoutError:
                pass
            self._pickup_wake.clear()

    # -- one connection ---------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        try:
            try:
                pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
            except OSError:
                writer.close()
                return
            # Slots per uid, never one queue for all: a connection waits only behind its
            # own uid's, and beyond WAITING_FACTOR times its slots it is answered at once.
            limit = self.config.connections_per_uid
            if (self._per_uid.get(uid, 0) >= limit * WAITING_FACTOR
                    or self._connections >= MAX_CONNECTIONS):
                await _respond(writer, self._busy(uid, pid), "client")
                return
            self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
            self._connections += 1
            slots = self._uid_slots.setdefault(uid, asyncio.Semaphore(limit))
            try:
                async with slots:
                    await _respond(writer, self._handle_safely(reader, pid, uid, gid),
                                   "client")
            finally:
                self._connections -= 1
                self._per_uid[uid] -= 1
                if not self._per_uid[uid]:  # nobody holds or waits for its slots now
                    del self._per_uid[uid]
                    del self._uid_slots[uid]
        finally:
            self._inflight.discard(task)

    async def _busy(self, uid: int, pid: int) -> bytes:
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
                             gid: int) -> bytes:
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
                      gid: int) -> bytes:
        try:
            async with asyncio.timeout(FIRST_BYTES_TIMEOUT):
                magic = await reader.readline()
                if magic != protocol.MAGIC:
                    raise protocol.ProtocolError("bad greeting")
                header = await reader.readuntil(b"\n\n")
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
        mode = next((v for k, v in fields if k == "mode"), "submit")
        if mode == "flush":
            self._pickup_wake.set()
            if self.runner is not None:
                self.runner.poke(force=True)
            log.info("flush requested uid=%d pid=%d", uid, pid)
            return protocol.format_reply(250, 0, "queue run started")
        if mode == "mailq":
            text = await asyncio.to_thread(self._mailq_text, uid)
            return protocol.format_reply(250, 0, "queue follows") + _encode(text)
        if mode != "submit":
            return protocol.format_reply(500, sysexits.EX_PROTOCOL, f"unknown mode {mode!r}")
        try:
            size = protocol.request_size(fields)
        except protocol.ProtocolError as exc:
            return protocol.format_reply(500, sysexits.EX_PROTOCOL, f"bad request: {exc}")
        if size > self.config.message_size_limit:
            return protocol.format_reply(
                552, sysexits.EX_DATAERR,
                f"message of {size} bytes exceeds message_size_limit "
                f"{self.config.message_size_limit}; nothing was queued")
        try:
            body = await asyncio.wait_for(reader.readexactly(size + len(protocol.TRAILER)),
                                          READ_TIMEOUT + size / 1e6)
        except asyncio.IncompleteReadError:
            log.warning("incomplete request uid=%d pid=%d: nothing queued", uid, pid)
            return protocol.format_reply(500, sysexits.EX_PROTOCOL, "incomplete request")
        except TimeoutError:
            log.warning("slow request uid=%d pid=%d: message not received in time; nothing "
                        "queued", uid, pid)
            return protocol.format_reply(451, sysexits.EX_TEMPFAIL,
                                        "4.4.2 message not received in time; nothing was queued")
        if not body.endswith(protocol.TRAILER):
            return protocol.format_reply(500, sysexits.EX_PROTOCOL, "missing END trailer")
        if self.state is None:
            return protocol.format_reply(451, sysexits.EX_TEMPFAIL,
                                        f"4.3.0 {self._unavailable}; nothing was queued, "
                                        "try again later")
        caller = Caller(uid=uid, gid=gid, pid=pid)
        verdict: Verdict = await asyncio.to_thread(
            accept_submission, self.config, self.state, fields, body[:size], caller)
        if verdict.accepted:
            self._runner().poke()
        return protocol.format_reply(verdict.code, verdict.status,
                                    f"{verdict.enhanced} {verdict.text}")

    def reload(self) -> None:
        """SIGHUP: read the configuration again; keep the old one if the new one is bad.

        Sites, quotas, policies, relays, routing and logins change at once; the
        spool, the capture port and the admin group need a restart.
        """
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if (new.spool, new.firewall.capture_port, new.admin.group) != (
                self.config.spool, self.config.firewall.capture_port, self.config.admin.group):
            log.warning("reload: spool, firewall.capture or admin.group changed; "
                        "restart the daemon for those")
        self.config = new
        if self.runner is not None:
            self.runner.reconfigure(new)
        for handler in self._capture_handlers:
            handler.config = new
        log.info("reloaded %s: %d sites, relays=%s", new.path, len(new.sites),
                 ",".join(r.label for r in new.relays) or "none")

    def _state(self) -> State:
        assert self.state is not None, "serve() creates the state"
        return self.state

    def _runner(self) -> QueueRunner:
        assert self.runner is not None, "serve() creates the runner"
        return self.runner

    # -- the control socket -------------------------------------------------------
    async def _start_control(self) -> asyncio.AbstractServer:
        layout = self.config.layout
        os.makedirs(layout.control, mode=paths.MODE_CONTROL_DIR, exist_ok=True)
        os.chmod(layout.control, paths.MODE_CONTROL_DIR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layout.control_socket)
        server = await asyncio.start_unix_server(self._on_control, path=layout.control_socket,
                                                 limit=protocol.MAX_HEADER_BYTES + 2)
        os.chmod(layout.control_socket, paths.MODE_CONTROL_SOCKET)
        if self.config.admin.group:
            self._admin_gid = grp.getgrnam(self.config.admin.group).gr_gid
            try:
                for path in (layout.control, layout.control_socket):
                    os.chown(path, -1, self._admin_gid)
            except PermissionError:
                log.warning("cannot give %s to group %s: add the daemon's user to that group",
                            layout.control, self.config.admin.group)
        return server

    def _is_operator(self, pid: int, uid: int, gid: int) -> bool:
        if uid in (0, os.geteuid()):
            return True
        if self._admin_gid is None:
            return False
        if gid == self._admin_gid:
            return True
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("Groups:"):
                        return str(self._admin_gid) in line.split()[1:]
        except OSError:
            pass
        return False

    async def _on_control(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))

        async def handle() -> bytes:
            if self._is_operator(pid, uid, gid):
                return await self._control_request(reader, uid)
            log.warning("control refused uid=%d pid=%d: not root, the daemon's user or "
                        "the admin group", uid, pid)
            return protocol.format_reply(550, sysexits.EX_NOPERM, "not permitted")

        await _respond(writer, handle(), "control client", protocol.format_reply(
            500, sysexits.EX_SOFTWARE, "internal error in the daemon; see its log"))

    async def _control_request(self, reader: asyncio.StreamReader, uid: int) -> bytes:
        try:
            if await asyncio.wait_for(reader.readline(), READ_TIMEOUT) != protocol.MAGIC:
                raise protocol.ProtocolError("bad greeting")
            fields = protocol.decode_header(
                await asyncio.wait_for(reader.readuntil(b"\n\n"), READ_TIMEOUT))
        except (protocol.ProtocolError, asyncio.LimitOverrunError, asyncio.IncompleteReadError,
                ValueError) as exc:
            return protocol.format_reply(500, sysexits.EX_PROTOCOL, f"bad request: {exc}")
        action, args = control.decode_args(fields)
        actor = f"operator uid {uid}"
        if self.state is None:
            return protocol.format_reply(451, sysexits.EX_TEMPFAIL, f"{self._unavailable}")
        try:
            text = await asyncio.to_thread(control.perform, self.config, self.state,
                                           action, args, actor)
        except sanctions.OperationError as exc:
            return protocol.format_reply(550, sysexits.EX_DATAERR, str(exc))
        except (sqlite3.Error, OSError) as exc:
            why = storage_trouble(self.config.layout.root, exc) or str(exc)
            return protocol.format_reply(451, sysexits.EX_TEMPFAIL, why)
        if action in ("queue-release", "site-resume") and self.runner is not None:
            self.runner.poke(force=True)
        return protocol.format_reply(250, 0, "ok") + _encode(text)

    def _mailq_text(self, uid: int) -> str:
        everything = uid in (0, os.getuid())
        entries = [e for e in spool.entries(self.config.layout)
                   if everything or e.envelope.uid == uid]
        return listing.format_queue(entries)


def _encode(text: str) -> bytes:
    """Reply text as UTF-8; what UTF-8 cannot carry (lone surrogates) is escaped."""
    return text.encode("utf-8", "backslashreplace")


INTERNAL_ERROR = protocol.format_reply(
    451, sysexits.EX_TEMPFAIL, "4.3.0 internal error in the daemon; nothing was queued, try "
    "again later (the operator finds the cause in the daemon's log)")


async def _respond(writer: asyncio.StreamWriter, reply: Awaitable[bytes], who: str,
                   on_error: bytes = INTERNAL_ERROR) -> None:
    """Write the reply (one line, maybe a body) and close, whatever the peer did.

    A handler that raises is logged with its traceback and answered ``on_error``.
    """
    try:
        try:
            data = await reply
        except Exception:
            log.exception("internal error answering a %s; replied with an error", who)
            data = on_error
        writer.write(data)
        await writer.drain()
    except (ConnectionError, TimeoutError) as exc:
        log.info("%s went away: %s", who, exc)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def run_daemon(config: Config) -> int:
    try:
        asyncio.run(Daemon(config).serve())
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return sysexits.EX_TEMPFAIL
    return sysexits.EX_OK
