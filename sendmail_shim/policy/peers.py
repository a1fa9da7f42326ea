"""Who is at the other end of a TCP connection: /proc/net/tcp rows and the peer gate.

Used by the capture listener (daemon/capture.py: a redirected connection's
owner), the metrics endpoint (daemon/metrics.py) and the relay's policy
service (relaypolicy/server.py): the services a site uid must not reach; and,
from the client's side, by delivery/loopback.py: the owner of the server socket
that a relay or local_transport connection on a local address reached.

Trusts: the kernel's /proc/net/tcp and tcp6 of this network namespace, and
only for the exact connection in hand (the four-tuple is unique while it is
open); the configuration's allow-lists.
Guarantees: :func:`loopback_owner` names the uid of a local client's socket
only when the kernel (sock_diag, by the exact four-tuple; /proc/net/tcp when
it does not answer) has exactly one ESTABLISHED socket with a non-zero inode
at the connection's two ends; anything else (no row, several, /proc unreadable) is
None, never a guess.  :class:`PeerGate` answers a connection with (allowed,
who, why): a peer on a local address is allowed only when its owner uid is
in ``uids``; a peer on another host only when its address is in
``networks``.  An unknown owner is refused (fail closed).  :class:`LogLimit`
lets a repeated line through at most once per interval per key, and counts
the rest, so a flood of refused connections cannot flood the log.
:func:`who_holds` names the uid, user and site of the socket listening on a
port the daemon could not bind (a site squatting a listener's port).
"""

from __future__ import annotations

import ipaddress
import logging
import pwd
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PROC_TCP = ("/proc/net/tcp", "/proc/net/tcp6")
ESTABLISHED = 0x01  # TCP_ESTABLISHED in the "st" column
LISTEN = 0x0A  # TCP_LISTEN

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[Address, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _plain(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def endpoint(host: str, port: int) -> Endpoint:
    """A socket address as compared with /proc rows (no scope id, mapped -> IPv4)."""
    return _plain(ipaddress.ip_address(host.split("%")[0])), int(port)


def show(where: Endpoint | None) -> str:
    if where is None:
        return "none"
    address, port = where
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _decode_proc_address(text: str) -> Endpoint:
    hex_addr, hex_port = text.split(":")
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        address: Address = ipaddress.IPv4Address(raw[::-1])
    else:  # four host-order 32-bit words
        address = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return _plain(address), int(hex_port, 16)


@dataclass(frozen=True)
class TcpRow:
    """One line of /proc/net/tcp or tcp6."""

    local: Endpoint
    remote: Endpoint
    state: int
    uid: int
    inode: int


def tcp_rows(paths: tuple[str, ...] = PROC_TCP, port: int | None = None) -> list[TcpRow]:
    """Every TCP socket of this network namespace; OSError if /proc/net/tcp is unreadable.

    With ``port``, only rows that have it at one end (a text filter before parsing:
    a flood of connections makes the file long, and most rows are not wanted).
    """
    needle = None if port is None else f":{port:04X} "
    rows = []
    for path in paths:
        try:
            fh = open(path)  # noqa: SIM115 - closed below; a missing tcp6 is "no IPv6"
        except FileNotFoundError:
            if path.endswith("6"):
                continue
            raise
        with fh:
            next(fh, None)
            for line in fh:
                if needle is not None and needle not in line:
                    continue
                fields = line.split()
                rows.append(TcpRow(_decode_proc_address(fields[1]),
                                   _decode_proc_address(fields[2]), int(fields[3], 16),
                                   int(fields[7]), int(fields[9])))
    return rows


def port_holders(host: str, port: int, paths: tuple[str, ...] = PROC_TCP) -> list[TcpRow]:
    """The listening sockets that take ``host``:``port`` (bound to that address, or to
    the wildcard of its family; an IPv6 wildcard also takes IPv4 unless V6ONLY, which
    /proc does not show, so it is counted).  Empty when /proc is unreadable."""
    want = endpoint(host.strip("[]"), port)[0]
    wild = {ipaddress.IPv4Address(0), ipaddress.IPv6Address(0)}
    try:
        rows = tcp_rows(paths, port=port)
    except OSError:
        return []
    return [r for r in rows if r.state == LISTEN and r.local[1] == port
            and (r.local[0] == want or r.local[0] in wild)]


def who_holds(host: str, port: int, sites_of: Callable[[int], list[str]],
              paths: tuple[str, ...] = PROC_TCP) -> str:
    """``host``:``port``'s holders for an operator: uid, user name and site(s), e.g.
    ``uid 1001 (shimsite1, site site1)``; ``unknown (...)`` when /proc shows none (a
    socket of another network namespace, or a port being closed)."""
    names = []
    for uid in sorted({row.uid for row in port_holders(host, port, paths)}):
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = "no user"
        sites = sites_of(uid)
        names.append(f"uid {uid} ({user}, " + (f"site {', '.join(sites)})" if sites
                                                else "no site)"))
    return ", ".join(names) or "unknown (no listening socket found in /proc/net/tcp)"


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): one socket looked up by its four-tuple
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF


def diag_row(local: Endpoint, remote: Endpoint) -> TcpRow | None:
    """The TCP socket whose own end is ``local`` and other end ``remote``, asked of the
    kernel by its four-tuple (sock_diag): one lookup, whatever the number of sockets
    (reading /proc/net/tcp costs 20 ms with a few thousand).  None: no such socket;
    OSError: the kernel does not answer (the caller reads /proc instead)."""
    family = socket.AF_INET if local[0].version == 4 else socket.AF_INET6
    sockid = (struct.pack("!HH", local[1], remote[1]) + local[0].packed.ljust(16, b"\0")
              + remote[0].packed.ljust(16, b"\0")
              + struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.send(header + request)
        data = nl.recv(65536)
    if len(data) < 16 + 72 or struct.unpack_from("=H", data, 4)[0] != SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: no such socket
    state = data[16 + 1]
    uid, inode = struct.unpack_from("=II", data, 16 + 64)
    return TcpRow(local, remote, state, uid, inode)


def loopback_owner(local: Endpoint, peer: Endpoint,
                   paths: tuple[str, ...] = PROC_TCP) -> int | None:
    """The uid of the local client socket at ``peer`` connected to our ``local``; None
    when it cannot be proven (no such socket or several, not ESTABLISHED, inode 0)."""
    try:
        row = diag_row(peer, local)
        theirs = [] if row is None else [row]
    except OSError:
        try:
            theirs = [r for r in tcp_rows(paths, port=peer[1])
                      if r.local == peer and r.remote == local]
        except OSError:
            return None
    if len(theirs) != 1 or theirs[0].state != ESTABLISHED or theirs[0].inode == 0:
        return None
    return theirs[0].uid


def is_local_address(address: Address) -> bool:
    """An address of this host: loopback, or one of its interfaces' (a client there is a
    local process whose uid /proc knows)."""
    if address.is_loopback:
        return True
    try:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_DGRAM)
    except OSError:
        return False
    with probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def uids_of(users: Iterable[str]) -> set[int]:
    """The uids of these user names (and numeric uids); names that do not exist are left
    out (``prometheus`` is allowed only where that user exists)."""
    uids: set[int] = set()
    for user in users:
        if user.isdigit():
            uids.add(int(user))
            continue
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            continue
    return uids


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    who: str  # "uid:1008" or the remote address: for logs and per-peer shares
    why: str


@dataclass(frozen=True)
class PeerGate:
    """Who may use a TCP service: local uids, and remote networks."""

    uids: frozenset[int]
    networks: tuple[Network, ...] = ()

    def judge(self, local: Endpoint, peer: Endpoint) -> Verdict:
        address = peer[0]
        if is_local_address(address):
            uid = loopback_owner(local, peer)
            if uid is None:
                return Verdict(False, show(peer), "the client socket's owner cannot be proven "
                                                  "from /proc/net/tcp")
            if uid in self.uids:
                return Verdict(True, f"uid:{uid}", "allowed user")
            return Verdict(False, f"uid:{uid}", f"uid {uid} is not an allowed user")
        if any(address in network for network in self.networks):
            return Verdict(True, str(address), "allowed network")
        return Verdict(False, str(address), f"{address} is in no allowed network")


def networks(texts: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


class LogLimit:
    """At most one line per ``every`` seconds per key; the lines held back are counted
    and their number is said in the next line let through."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """None: stay silent; else the number of lines held back since the last one."""
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (-1e18, 0))
            if now - last < self.every:
                self._last[key] = (last, held + 1)
                return None
            if len(self._last) > 10_000:  # keys are peers: bounded memory under a flood
                self._last.clear()
            self._last[key] = (now, 0)
            return held


def log_limited(logger: logging.Logger, limit: LogLimit, key: str, level: int, text: str,
                *args: object) -> None:
    """``logger.log`` through ``limit`` (``held=N`` added when lines were held back)."""
    held = limit.allow(key)
    if held is None:
        return
    if held:
        text += " held=%d (similar lines not logged in the last %gs)"
        args = (*args, held, limit.every)
    logger.log(level, text, *args)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each connection is a descriptor):
    the daemon and the policy service do it at start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft
