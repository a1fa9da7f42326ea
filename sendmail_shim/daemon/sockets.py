"""The daemon's sockets: who the peer is, systemd's socket, descriptors, one reply each.

Also what its two socket servers (``submission``, ``control_server``) see of the
running daemon (:class:`Running`, read through :class:`DaemonServer`): the
configuration a reload replaces, and the state and queue runner, which are None
while the state database cannot be opened.

Trusts: the kernel alone for who is calling (SO_PEERCRED: the pid, uid and gid
of the process that connected, which the peer cannot choose); systemd's
LISTEN_PID/LISTEN_FDS only when LISTEN_PID is this process.
Guarantees: a socket passed by systemd that is not a Unix socket is refused
(OSError, the daemon does not start); every connection gets exactly one reply
and is closed, whatever the peer or the handler did (:func:`respond`: a handler
that raises is logged with its traceback and answered with the caller's error
line, never a silent close the front end would take for a dead daemon); reply
texts are UTF-8 with escapes (``wire.protocol.format_reply``), so an odd queue
entry cannot break ``mailq`` or ``queue list``; a long body (a listing) is sent
piece by piece as the peer reads it (:class:`Streamed`); the soft RLIMIT_NOFILE
is raised to the hard limit at start (``policy.peers.raise_fd_limit``, shared with
the policy service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sendmail_shim.config import Config
    from sendmail_shim.daemon.workers import IntakeWorkers
    from sendmail_shim.delivery.runner import QueueRunner
    from sendmail_shim.store.state import State

log = logging.getLogger(__name__)
READ_TIMEOUT = 60.0  # a request's next part; a message gets one more second per megabyte
SD_LISTEN_FDS_START = 3


class Running(Protocol):
    """The daemon as its socket servers see it (main.Daemon)."""

    config: Config  # replaced as a whole by a reload (SIGHUP)
    state: State | None  # None until the state database opens
    runner: QueueRunner | None  # created with the state
    unavailable: str | None  # why submissions are refused while the state is None
    pickup_wake: asyncio.Event  # set: scan the drop area now
    intake: IntakeWorkers  # the intake's threads, a share per uid (daemon/workers.py)

    async def reload_and_wait(self) -> str | None:
        """Read the configuration again; the error when it is refused (the old one kept)."""


class DaemonServer:
    """A socket server of the running daemon: what it reads is always the daemon's current."""

    def __init__(self, daemon: Running) -> None:
        self.daemon = daemon

    @property
    def config(self) -> Config:
        return self.daemon.config

    @property
    def state(self) -> State | None:
        return self.daemon.state

    @property
    def runner(self) -> QueueRunner | None:
        return self.daemon.runner

    @property
    def _unavailable(self) -> str | None:
        return self.daemon.unavailable


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


@dataclass
class Streamed:
    """A reply line, then a body made piece by piece (listings): never whole in memory.

    ``body`` is a blocking iterator (it reads the spool): :func:`respond` runs
    each step in a worker thread and writes each piece before asking for the next.
    """

    line: bytes
    body: Iterator[bytes]


class Released:
    """A body that calls ``release`` once when it ends, fails or is closed, even unstarted.

    (A generator's ``finally`` does not run when it is closed before its first step.)
    """

    def __init__(self, body: Iterator[bytes], release: Callable[[], None]) -> None:
        self._body = body
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Released:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._body)
        except BaseException:  # the end (StopIteration) or a failure: the slot is free
            self._free()
            raise

    def _free(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def close(self) -> None:
        self._free()
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


BODY_FAILED = (b"\nsendmail-shim: the listing stopped early: internal error in the daemon "
               b"(the operator finds the cause in its log)\n")


async def _send_body(writer: asyncio.StreamWriter, line: bytes, body: Iterator[bytes],
                     who: str) -> None:
    try:
        writer.write(line)
        while True:
            try:
                piece = await asyncio.to_thread(next, body, None)
            except Exception:
                log.exception("internal error while streaming a reply to a %s; the reply was "
                              "cut short with an error line", who)
                piece = BODY_FAILED
                body = iter(())
            if piece is None:
                return
            writer.write(piece)
            await writer.drain()  # the peer reads at its pace; we hold one piece at most
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            with contextlib.suppress(ValueError):  # still running in a cancelled worker
                close()


async def respond(writer: asyncio.StreamWriter, reply: Awaitable[bytes | Streamed], who: str,
                  on_error: bytes) -> None:
    """Write the reply (one line, maybe a body) and close, whatever the peer did.

    A handler that raises is logged with its traceback and answered ``on_error``;
    a :class:`Streamed` body that fails midway ends with :data:`BODY_FAILED`.
    """
    try:
        try:
            data = await reply
        except Exception:
            log.exception("internal error answering a %s; replied with an error", who)
            data = on_error
        if isinstance(data, Streamed):
            await _send_body(writer, data.line, data.body, who)
        else:
            writer.write(data)
        await writer.drain()
    except (ConnectionError, TimeoutError) as exc:
        log.info("%s went away: %s", who, exc)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
