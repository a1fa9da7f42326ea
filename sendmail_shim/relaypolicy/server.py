"""The policy service's listener: asyncio, many connections, a Unix or a TCP socket.

Trusts: the kernel about who connects.  A Unix socket (mode 0660, group
``policy_service.socket_group``) is served to whoever the file lets in.  Over TCP
a client on this host is served only when /proc/net/tcp proves its socket's
owner is root, the service's user or one of ``policy_service.allow_users``
(``postfix``); a client on another host only when its address is in
``policy_service.allow_networks`` (the relay): a site uid of a web node cannot
spend another site's quota or suspend it with forged requests
(``policy/peers.py``; ``firewall render`` also drops such connections).
Nothing of a request is trusted beyond the codec's checks.
Guarantees: requests on one connection are answered in order, one reply each;
a malformed request is logged (the problem and the peer, no values) and its
connection closed without an answer, never guessed at; a connection idle for
``policy_service.idle_timeout`` is closed (within a few seconds more), one
still waiting for a free slot too; at most ``policy_service.max_connections``
are served at once and one client (uid or address) holds at most
``policy_service.connections_per_peer`` (more are closed at once); the soft
RLIMIT_NOFILE is raised to the hard limit at start; lines about clients
(refused, over their share, malformed, idle) and asyncio's own accept errors are
logged at most once per :data:`LOG_EVERY` per client and kind, with the number
held back, so a flood cannot fill the disk with log.  Decisions run on the
event loop, one at a time (the state work of one END-OF-MESSAGE is one short
transaction), so a check and its reservation are never interleaved with another
request's of this process; across processes and relays the state's transaction
makes them atomic.

The state is built in one function, :func:`open_state` (the ``state:`` backend).
With Redis the nodes' changes are followed by the state itself.  The SQLite
state keeps suspensions and overrides in memory; between requests, at most
every :data:`REFRESH` seconds, the service asks it to follow the file
(``State.follow``: one ``PRAGMA data_version`` when nothing changed), so a
``site suspend`` or ``quota set`` made through another process is seen within
that time; and the daemon on the same spool follows the suspensions this
service writes the same way (its ``suspended`` line, held mail, notice).

A TCP port someone else holds (a site listening on it while the service
restarts, issue 21 F3) does not end the service: it logs
``policy_service_unavailable`` naming the holder (uid, user, site) and binds
again every BIND_RETRY seconds, so systemd's start limit never leaves it down
for good.  While the port is held, the holder answers the relay's Postfix:
that is why ``inet:`` on a port any user may bind is a ``config check``
warning and the packaged default is a Unix socket (``unix:``), which no site
can take.  Other bind errors (a bad address, permission) still exit (71/77).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import grp
import logging
import os
import signal
import time

from sendmail_shim.config import Config
from sendmail_shim.policy import peers
from sendmail_shim.policy.peers import raise_fd_limit
from sendmail_shim.relaypolicy import codec
from sendmail_shim.relaypolicy.decide import Decider
from sendmail_shim.store import state as state_backends
from sendmail_shim.store.state import State

log = logging.getLogger(__name__)

REFRESH = 0.25  # seconds between two looks at the state's changes (suspensions seen by then)
LOG_EVERY = 60.0  # seconds: one line per client and kind of trouble in this time
SOCKET_MODE = 0o660
BIND_RETRY = 5.0  # seconds between two attempts to bind a TCP port another process holds
SQUAT_LOG_EVERY = 60.0  # the policy_service_unavailable error again this often


def open_state(config: Config) -> State:
    """The state the service checks and counts in (the one place it is built): the
    backend of ``state:``, so with Redis every relay and web node shares it."""
    return state_backends.open_state(config)


class PolicyServer:
    """One listening socket, its connections, the decider and the state it follows."""

    def __init__(self, config: Config, listen: str | None = None) -> None:
        self.config = config
        settings = config.policy_service
        self.listen = listen or settings.listen
        self.decider = Decider(config, open_state(config))
        self.followed = time.monotonic()
        self.slots = asyncio.Semaphore(settings.max_connections)
        self.served = 0
        # Connections and when each last began to wait for a request (the idle sweep's).
        self.active: dict[asyncio.StreamWriter, float] = {}
        self.per_peer: dict[str, int] = {}  # open connections by client (uid or address)
        self.gate = peers.PeerGate(
            frozenset({0, os.geteuid()} | peers.uids_of(settings.allow_users)),
            peers.networks(settings.allow_networks))
        self.log_limit = peers.LogLimit(LOG_EVERY)

    def note(self, key: str, level: int, text: str, *args: object) -> None:
        """A line about a client or a failure, at most once per LOG_EVERY per key."""
        peers.log_limited(log, self.log_limit, key, level, text, *args)

    async def sweep_idle(self) -> None:
        """Close connections idle longer than ``idle_timeout`` (checked every few seconds),
        those still waiting for a slot included.

        One sweep instead of a timeout per request: a per-request timer costs
        more than the rest of a RCPT request's work.
        """
        timeout = self.config.policy_service.idle_timeout
        while True:
            await asyncio.sleep(min(5.0, timeout / 4))
            limit = time.monotonic() - timeout
            closed = 0
            for writer, since in list(self.active.items()):
                if since < limit:
                    del self.active[writer]
                    closed += 1
                    writer.close()
            if closed:
                self.note("idle", logging.INFO, "policy_idle closed=%d: connections idle "
                          "over %.0fs (policy_service.idle_timeout)", closed, timeout)

    def follow(self) -> None:
        """Between requests, at most every :data:`REFRESH` seconds: the state's changes by
        other processes (one cheap read when there are none; the Redis state follows the
        other nodes by itself)."""
        now = time.monotonic()
        if now - self.followed < REFRESH:
            return
        self.followed = now
        try:
            self.decider.state.follow()
        except Exception as exc:  # keep answering from what was read last
            self.note("follow", logging.ERROR, "policy_state_follow_failed error=%r: "
                      "answering from the suspensions read before", exc)

    def admit(self, writer: asyncio.StreamWriter) -> str | None:
        """The client's key (uid or address) when it may be served, else None (logged)."""
        if self.listen.startswith("unix:"):
            who = "unix"  # the socket file's mode and group decide who connects
        else:
            local, peer = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
            try:
                verdict = self.gate.judge(peers.endpoint(local[0], local[1]),
                                          peers.endpoint(peer[0], peer[1]))
            except (TypeError, ValueError):
                verdict = peers.Verdict(False, str(peer), "peer unknown")
            if not verdict.allowed:
                self.note("refused " + verdict.who, logging.WARNING,
                          "policy_refused_client peer=%s reason=%r: closed unanswered; add "
                          "the relay's user to policy_service.allow_users or its address to "
                          "allow_networks if it is Postfix", verdict.who, verdict.why)
                return None
            who = verdict.who
        share = self.config.policy_service.connections_per_peer
        if self.per_peer.get(who, 0) >= share:
            self.note("share " + who, logging.WARNING,
                      "policy_busy peer=%s connections=%d: over "
                      "policy_service.connections_per_peer; closed", who, share)
            return None
        self.per_peer[who] = self.per_peer.get(who, 0) + 1
        return who

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        who = self.admit(writer)
        if who is None:
            writer.close()
            return
        peer = writer.get_extra_info("peername") or "unix"
        self.active[writer] = time.monotonic()  # the sweep closes it while it waits, too
        try:
            async with self.slots:
                await self.serve(reader, writer, who, peer)
        except (ConnectionError, OSError) as exc:
            log.debug("policy_connection_lost peer=%s error=%r", peer, exc)
        finally:
            self.per_peer[who] -= 1
            if not self.per_peer[who]:
                del self.per_peer[who]
            self.active.pop(writer, None)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    who: str, peer: object) -> None:
        """Requests of one connection, in order, one reply each."""
        while True:
            if writer not in self.active:
                return  # closed by the idle sweep while it waited for a slot
            self.active[writer] = time.monotonic()
            try:
                block = await reader.readuntil(codec.END)
            except asyncio.IncompleteReadError as exc:
                if writer in self.active and exc.partial.strip():
                    self.note("malformed " + who, logging.WARNING,
                              "policy_malformed peer=%s problem=%r; connection closed", peer,
                              f"connection closed mid-request ({len(exc.partial)} bytes)")
                return
            except asyncio.LimitOverrunError:
                self.note("malformed " + who, logging.WARNING,
                          "policy_malformed peer=%s problem=%r; connection closed",
                          peer, f"request over {codec.MAX_REQUEST} bytes")
                return
            try:
                attrs = codec.parse_request(block)
            except codec.Malformed as exc:
                self.note("malformed " + who, logging.WARNING,
                          "policy_malformed peer=%s problem=%r; connection closed", peer,
                          str(exc))
                return
            self.follow()
            try:
                reply = codec.encode_reply(self.decider.decide(attrs))
            except Exception:
                log.exception("policy_error peer=%s: no answer; Postfix applies its "
                              "default_action", peer)
                return
            self.served += 1
            writer.write(reply)
            await writer.drain()

    def loop_trouble(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        """asyncio's own errors (an accept failing with EMFILE, retried every second):
        logged at most once per LOG_EVERY per kind, not once per attempt."""
        self.note("loop " + str(context.get("message")), logging.ERROR,
                  "policy_loop_error message=%r error=%r", context.get("message"),
                  context.get("exception"))

    async def start(self) -> asyncio.Server:
        limit = codec.MAX_REQUEST
        log.info("policy_service file descriptor limit %d", raise_fd_limit())
        asyncio.get_running_loop().set_exception_handler(self.loop_trouble)
        if self.listen.startswith("unix:"):
            path = self.listen[5:]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            server = await asyncio.start_unix_server(self.handle, path, limit=limit,
                                                     backlog=1024)
            group = self.config.policy_service.socket_group
            if group:
                try:
                    os.chown(path, -1, grp.getgrnam(group).gr_gid)
                except (KeyError, OSError) as exc:
                    server.close()
                    raise OSError(errno.EPERM, f"cannot give {path} to group {group} "
                                  "(policy_service.socket_group: the service's user must be "
                                  f"a member of it): {exc}") from exc
            os.chmod(path, SOCKET_MODE)
        else:
            server = await self.bind_tcp()
        log.info("policy_service_listening listen=%s sites_with_login=%d", self.listen,
                 len(self.decider.logins))
        self.sweeper = asyncio.get_running_loop().create_task(self.sweep_idle())
        gc.freeze()  # the configuration and the modules: never garbage, never walked again
        return server

    async def bind_tcp(self) -> asyncio.Server:
        """The ``inet:`` listener; while another process holds its port (a site, during a
        restart: issue 21, F3), an error naming the holder every SQUAT_LOG_EVERY seconds
        and a new attempt every BIND_RETRY seconds, rather than an exit that systemd's
        start limit would make final."""
        host, _, port = self.listen[5:].rpartition(":")
        host = host.strip("[]")
        logged = None
        while True:
            try:
                return await asyncio.start_server(self.handle, host, int(port),
                                                  limit=codec.MAX_REQUEST, backlog=1024,
                                                  reuse_address=True)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                now = time.monotonic()
                if logged is None or now - logged >= SQUAT_LOG_EVERY:
                    logged = now
                    holder = peers.who_holds(host, int(port), lambda uid: [
                        site.name for site in self.config.sites_of_uid(uid)])
                    log.error("policy_service_unavailable listen=%s holder=%r action='the "
                              "relay gets no answer from this service meanwhile (or the "
                              "holder's); stop that process (suspend its site if it is one), "
                              "and listen on unix:/run/sendmail-shim-policy/policy.sock, which "
                              "no site can take'; retrying every %gs", self.listen, holder,
                              BIND_RETRY)
                await asyncio.sleep(BIND_RETRY)

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        server = await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()
        self.sweeper.cancel()
        self.decider.state.close()
        log.info("policy_service_stopped served=%d", self.served)


def serve(config: Config, listen: str | None = None) -> int:
    asyncio.run(PolicyServer(config, listen).run())
    return 0
