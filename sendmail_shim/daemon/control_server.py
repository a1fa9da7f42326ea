"""The control socket: who is an operator, and one operator request per connection.

Trusts: the kernel's peer credentials (SO_PEERCRED) and, for supplementary
groups, the kernel's ``/proc/<pid>/status`` of that peer; nothing the peer
writes.  An operator is root, the daemon's own user, or (when ``admin.group``
is set) a process whose primary or supplementary group is that group.
Guarantees: the socket lives in ``control/`` (mode 0750, given to
``admin.group`` when the daemon may), so other users cannot even reach it; a
peer that is not an operator is answered ``550`` and logged, its request
unread; a request is read with READ_TIMEOUT per part and handed to
``control.perform``, whose :class:`OperationError` is ``550`` with its text,
storage trouble ``451`` naming the disk, and any other failure ``500`` with a
traceback in the daemon's log, never a silent close.  Releasing or resuming
pokes the queue runner so the mail goes now; burning or restoring a relay
flushes the deferred mail of that relay's pool (onto its new active relays),
``relay-list`` gets the runner's in-memory answers of each relay, and ``reload``
reloads the configuration as SIGHUP does, answering ``554`` (78) with the
loader's error when the new one is refused (the running one is kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import sqlite3

from sendmail_shim.daemon import control, listing
from sendmail_shim.daemon.sockets import (
    READ_TIMEOUT,
    DaemonServer,
    Running,
    Streamed,
    peer_credentials,
    respond,
)
from sendmail_shim.intake.accept import storage_trouble
from sendmail_shim.policy import relays, sanctions
from sendmail_shim.wire import paths, protocol, sysexits

log = logging.getLogger(__name__)
PROC_STATUS = "/proc/{pid}/status"
INTERNAL_ERROR = protocol.format_reply(500, sysexits.EX_SOFTWARE,
                                       "internal error in the daemon; see its log")


def in_group(pid: int, gid: int, status_path: str | None = None) -> bool:
    """Whether process ``pid`` has ``gid`` among its supplementary groups (``Groups:``).

    False when the process is gone or its status cannot be read.
    """
    try:
        with open((status_path or PROC_STATUS).format(pid=pid)) as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return str(gid) in line.split()[1:]
    except OSError:
        pass
    return False


class ControlServer(DaemonServer):
    """The control socket of one daemon; it reads the daemon's current configuration."""

    def __init__(self, daemon: Running) -> None:
        super().__init__(daemon)
        self._admin_gid: int | None = None  # admin.group, looked up at start

    async def start(self) -> asyncio.AbstractServer:
        """Listen on ``control/control.sock``, given to admin.group when there is one."""
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

    def is_operator(self, pid: int, uid: int, gid: int) -> bool:
        """Root, the daemon's user, or a member of admin.group (primary or supplementary)."""
        if uid in (0, os.geteuid()):
            return True
        if self._admin_gid is None:
            return False
        if gid == self._admin_gid:
            return True
        return in_group(pid, self._admin_gid)

    async def _on_control(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))

        async def handle() -> bytes | Streamed:
            if self.is_operator(pid, uid, gid):
                return await self._control_request(reader, uid)
            log.warning("control refused uid=%d pid=%d: not root, the daemon's user or "
                        "the admin group", uid, pid)
            return protocol.format_reply(550, sysexits.EX_NOPERM, "not permitted")

        await respond(writer, handle(), "control client", INTERNAL_ERROR)

    async def _control_request(self, reader: asyncio.StreamReader,
                               uid: int) -> bytes | Streamed:
        try:
            protocol.check_greeting(await asyncio.wait_for(reader.readline(), READ_TIMEOUT))
            fields = protocol.decode_header(
                await asyncio.wait_for(reader.readuntil(protocol.HEADER_END), READ_TIMEOUT))
        except (protocol.ProtocolError, asyncio.LimitOverrunError, asyncio.IncompleteReadError,
                ValueError) as exc:
            return protocol.format_reply(500, sysexits.EX_PROTOCOL, f"bad request: {exc}")
        action, args = protocol.decode_control(fields)
        actor = f"operator uid {uid}"
        if action == "reload":  # the admin command's site add/change/remove, after a write
            log.info("reload asked by %s", actor)
            refused = await self.daemon.reload_and_wait()
            if refused is not None:
                return protocol.format_reply(554, sysexits.EX_CONFIG,
                                             f"reload refused, the running configuration is "
                                             f"kept: {refused}")
            return protocol.format_reply(250, 0, "ok", f"reloaded: {len(self.config.sites)} "
                                                       "sites\n")
        if self.state is None:
            return protocol.format_reply(451, sysexits.EX_TEMPFAIL, f"{self._unavailable}")
        try:
            stats = self.runner.relay_stats if self.runner is not None else None
            text = await asyncio.to_thread(control.perform, self.config, self.state,
                                           action, args, actor, stats)
        except sanctions.OperationError as exc:
            return protocol.format_reply(550, sysexits.EX_DATAERR, str(exc))
        except (sqlite3.Error, OSError) as exc:
            why = storage_trouble(self.config.layout.root, exc) or str(exc)
            return protocol.format_reply(451, sysexits.EX_TEMPFAIL, why)
        if action in ("queue-release", "site-resume") and self.runner is not None:
            self.runner.poke(force=True)
        if action in ("relay-burn", "relay-restore") and self.runner is not None:
            # That pool's deferred mail goes now, on the relays it has now.
            with contextlib.suppress(sanctions.OperationError, KeyError):
                pool = relays.relay_named(self.config, args["relay"][0]).pool
                self.runner.poke(force=True, pool=pool)
        if not isinstance(text, str):  # a listing: sent piece by piece as it is read
            return Streamed(protocol.format_reply(250, 0, "ok"), listing.chunks(text))
        return protocol.format_reply(250, 0, "ok", text)
