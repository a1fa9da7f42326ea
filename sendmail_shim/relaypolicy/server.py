"""The policy service's listener: asyncio, many connections, a Unix or a TCP socket.

Trusts: whoever can connect is the relay's Postfix (a Unix socket of mode 0660,
or TCP: keep it on loopback or behind the firewall; anyone who can connect can
spend a site's quota).  Nothing of a request is trusted beyond the codec's
checks.
Guarantees: requests on one connection are answered in order, one reply each;
a malformed request is logged (the problem and the peer, no values) and its
connection closed without an answer, never guessed at; a connection idle for
``policy_service.idle_timeout`` is closed (within a few seconds more); at most
``policy_service.max_connections`` are served at once.  Decisions run on the
event loop, one at a time (the state work of one END-OF-MESSAGE is one short
transaction), so a check and its reservation are never interleaved with another
request's of this process; across processes and relays the state's transaction
makes them atomic.

The state is built in one function, :func:`open_state` (the ``state:`` backend).
With Redis the nodes' changes are followed by the state itself.  The SQLite state keeps
suspensions and overrides in memory as read at open, so the service opens it
afresh every :data:`REFRESH` seconds: a ``site suspend`` or ``quota set`` made
through another process (the shim's daemon on the same spool, the admin
command) is seen within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time

from sendmail_shim.config import Config
from sendmail_shim.relaypolicy import codec
from sendmail_shim.relaypolicy.decide import Decider
from sendmail_shim.store import state as state_backends
from sendmail_shim.store.state import State

log = logging.getLogger(__name__)

REFRESH = 1.0  # seconds between two openings of the state (suspensions seen by then)
SOCKET_MODE = 0o660


def open_state(config: Config) -> State:
    """The state the service checks and counts in (the one place it is built): the
    backend of ``state:``, so with Redis every relay and web node shares it."""
    return state_backends.open_state(config)


class PolicyServer:
    """One listening socket, its connections, the decider and the state it reopens."""

    def __init__(self, config: Config, listen: str | None = None) -> None:
        self.config = config
        self.listen = listen or config.policy_service.listen
        self.decider = Decider(config, open_state(config))
        self.opened = time.monotonic()
        self.slots = asyncio.Semaphore(config.policy_service.max_connections)
        self.served = 0
        # Connections and when each last began to wait for a request (the idle sweep's).
        self.active: dict[asyncio.StreamWriter, float] = {}

    async def sweep_idle(self) -> None:
        """Close connections idle longer than ``idle_timeout`` (checked every few seconds).

        One sweep instead of a timeout per request: a per-request timer costs
        more than the rest of a RCPT request's work.
        """
        timeout = self.config.policy_service.idle_timeout
        while True:
            await asyncio.sleep(min(5.0, timeout / 4))
            limit = time.monotonic() - timeout
            for writer, since in list(self.active.items()):
                if since < limit:
                    del self.active[writer]
                    log.debug("policy_idle peer=%s: closed after %.0fs",
                              writer.get_extra_info("peername") or "unix", timeout)
                    writer.close()

    def refresh(self) -> None:
        """Open the state afresh when it is older than :data:`REFRESH` (between requests).

        Only SQLite needs it: the Redis state follows the other nodes' changes itself
        (a generation counter polled every quarter second, store/state_redis.py).
        """
        if self.config.state_backend == "redis" or time.monotonic() - self.opened < REFRESH:
            return
        try:
            fresh = open_state(self.config)
        except Exception as exc:  # keep answering from the state already open
            log.error("policy_state_reopen_failed error=%r: answering from the state opened "
                      "%.0fs ago", exc, time.monotonic() - self.opened)
            return
        old, self.decider.state = self.decider.state, fresh
        self.opened = time.monotonic()
        old.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or "unix"
        async with self.slots:
            try:
                while True:
                    self.active[writer] = time.monotonic()
                    try:
                        block = await reader.readuntil(codec.END)
                    except asyncio.IncompleteReadError as exc:
                        if writer not in self.active:
                            return  # closed by the idle sweep
                        if exc.partial.strip():
                            log.warning("policy_malformed peer=%s problem=%r; connection "
                                        "closed", peer, "connection closed mid-request "
                                        f"({len(exc.partial)} bytes)")
                        return
                    except asyncio.LimitOverrunError:
                        log.warning("policy_malformed peer=%s problem=%r; connection closed",
                                    peer, f"request over {codec.MAX_REQUEST} bytes")
                        return
                    try:
                        attrs = codec.parse_request(block)
                    except codec.Malformed as exc:
                        log.warning("policy_malformed peer=%s problem=%r; connection closed",
                                    peer, str(exc))
                        return
                    self.refresh()
                    try:
                        reply = codec.encode_reply(self.decider.decide(attrs))
                    except Exception:
                        log.exception("policy_error peer=%s: no answer; Postfix applies its "
                                      "default_action", peer)
                        return
                    self.served += 1
                    writer.write(reply)
                    await writer.drain()
            except (ConnectionError, OSError) as exc:
                log.debug("policy_connection_lost peer=%s error=%r", peer, exc)
            finally:
                self.active.pop(writer, None)
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()

    async def start(self) -> asyncio.Server:
        limit = codec.MAX_REQUEST
        if self.listen.startswith("unix:"):
            path = self.listen[5:]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            server = await asyncio.start_unix_server(self.handle, path, limit=limit,
                                                     backlog=1024)
            os.chmod(path, SOCKET_MODE)
        else:
            host, _, port = self.listen[5:].rpartition(":")
            server = await asyncio.start_server(self.handle, host.strip("[]"), int(port),
                                                limit=limit, backlog=1024, reuse_address=True)
        log.info("policy_service_listening listen=%s sites_with_login=%d", self.listen,
                 len(self.decider.logins))
        self.sweeper = asyncio.get_running_loop().create_task(self.sweep_idle())
        gc.freeze()  # the configuration and the modules: never garbage, never walked again
        return server

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
