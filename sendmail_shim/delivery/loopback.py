"""Who answers on a local address: the owner of a relay's or local_transport's socket.

A relay with ``tls: none`` or a ``local_transport`` on 127.0.0.1 (or ::1, or any
address of this host) on a port at or above 1024 can be taken by any user
while the real server is down (a restart, a crash): a site listening there
would receive the other sites' logins (AUTH PLAIN) and their mail, answer
250, and the daemon would count the mail delivered.

Trusts: the kernel (sock_diag, else /proc/net/tcp: policy/peers.py) for the
owner of the server's accepted socket of the exact connection in hand; the
configuration's ``loopback_server_users``.
Guarantees: :func:`prove_server` is called by relay.py (every relay and SMTP
local_transport session) and local.py (LMTP) after the server's greeting (so
the server has accepted the connection: a socket still in the accept queue
has no owner yet) and before anything else is written but EHLO/STARTTLS (no
AUTH, no MAIL, no message byte).  A server on a local address is trusted only
when the owner uid of its accepted socket (that of the process that accepted
it) is root, the daemon's own user or a user named in ``loopback_server_users``
(default postfix and dovecot, where they exist).  Any other owner, or one that
cannot be proven, raises :class:`UntrustedServer` (a ConnectionError): the
connection is closed, that relay counts as unreachable (the next relay is
tried, the mail is deferred, never bounced), and one warning per relay per
minute names the relay, the owner uid, its sites and what to do.  A server on
another host and a Unix socket are not looked at here (TLS and the socket
file's mode guard those).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterable
from typing import ClassVar

from sendmail_shim.config import Config
from sendmail_shim.policy.peers import (
    LogLimit,
    endpoint,
    is_local_address,
    log_limited,
    loopback_owner,
    uids_of,
)

log = logging.getLogger(__name__)
_LIMIT = LogLimit(60.0)


class UntrustedServer(ConnectionError):
    """The server on a local address is not owned by a trusted user."""


class _Trust:
    extra: ClassVar[frozenset[int]] = frozenset()
    sites: ClassVar[dict[int, list[str]]] = {}


def configure(config: Config) -> None:
    """Take the trusted users and the sites' uids from ``config`` (daemon start, reload)."""
    _Trust.extra = frozenset(uids_of(config.loopback_server_users))
    sites: dict[int, list[str]] = {}
    for site in config.sites.values():
        for uid in site.uids:
            sites.setdefault(uid, []).append(site.name)
    _Trust.sites = sites


def trusted_uids(extra: Iterable[int] | None = None) -> set[int]:
    """Root, the daemon's own user and ``loopback_server_users``."""
    return {0, os.geteuid(), *(_Trust.extra if extra is None else extra)}


def server_owner(sock: socket.socket) -> tuple[bool, int | None]:
    """(on a local address?, owner uid of the server's accepted socket or None)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False, None
    ours = endpoint(*sock.getsockname()[:2])
    theirs = endpoint(*sock.getpeername()[:2])
    if not is_local_address(theirs[0]):
        return False, None
    # From our side the "peer" of loopback_owner is the server's accepted socket.
    return True, loopback_owner(ours, theirs)


async def prove_server(sock: socket.socket | None, label: str) -> None:
    """Raise UntrustedServer unless the server at the other end of ``sock`` (if it is on a
    local address) is owned by a trusted user; see the module docstring."""
    if sock is None:
        raise UntrustedServer(f"{label}: no socket to check the server's owner of")
    local, uid = await asyncio.to_thread(server_owner, sock)
    if not local:
        return
    if uid is not None and uid in trusted_uids():
        return
    if uid is None:
        why = "the owner of the server's socket cannot be proven from the kernel"
        todo = "check that the real server is up and answers on this port"
    else:
        sites = ",".join(_Trust.sites.get(uid, [])) or "none"
        why = f"the server's socket belongs to uid {uid} (sites: {sites}), not a trusted user"
        todo = ("a process of that uid is listening on the relay's port (a site squatting it "
                "while the real server is down): suspend the site and stop the process; move "
                "the server to a port below 1024 or a Unix socket; or, if this user runs the "
                "real server, name it in loopback_server_users")
    log_limited(log, _LIMIT, label, logging.ERROR,
                "loopback_server_untrusted relay=%s owner=%s reason=%r action=%r: no login and "
                "no mail was sent, the mail waits", label, "unknown" if uid is None else uid,
                why, todo)
    raise UntrustedServer(f"{label}: {why}; nothing was sent")
